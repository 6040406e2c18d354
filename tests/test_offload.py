"""The `offload_weights` option: float weights move to memory-mapped files and keep their values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from quaff_compile import layer_states
from quaff_compile.config import QuaffConfig
from quaff_compile.offload import offload_weight, page_out
from tests.conftest import TINY_OPTIONS, tiny_peft_llama


def mapped_files(folder: Path) -> list[str]:
    """Return the lines of this process's memory maps that map a deleted file from `folder`."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in lines if str(folder) in line and line.endswith("(deleted)")]


def mapping_resident_kib(tensor: torch.Tensor) -> int:
    """Return the resident KiB of the memory map that contains `tensor`'s first element."""
    address, resident, inside = tensor.data_ptr(), None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and all(c in "0123456789abcdef-" for c in first):
            low, high = (int(part, 16) for part in first.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("Rss:"):
            resident = int(line.split()[1])
    if resident is None:
        raise AssertionError(f"no memory map contains address {address:#x}")
    return resident


def test_offload_keeps_values_no_file(tmp_path):
    weight = torch.nn.Parameter(torch.randn(512, 1024), requires_grad=False)
    original = weight.detach().clone()

    assert offload_weight(weight, tmp_path)

    assert torch.equal(weight, original)
    assert isinstance(weight, torch.nn.Parameter)
    assert not weight.requires_grad
    assert list(tmp_path.iterdir()) == []
    assert len(mapped_files(tmp_path)) == 1


def test_offload_pages_stay_out_of_memory(tmp_path):
    weight = torch.nn.Parameter(torch.randn(4096, 4096), requires_grad=False)  # 64 MiB

    assert offload_weight(weight, tmp_path)

    # The comparison after writing read the file; its pages were handed back.
    assert mapping_resident_kib(weight) < 16 * 1024
    # Reading pages the file in, and page_out hands the pages back again.
    weight.sum()
    assert mapping_resident_kib(weight) > 48 * 1024
    page_out(weight)
    assert mapping_resident_kib(weight) < 16 * 1024
    # A write goes to a private copy of its page, which paging out keeps.
    weight.data[0, 0] = 7.0
    page_out(weight)
    assert weight[0, 0] == 7.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offload_keeps_dtype_and_bits(tmp_path, dtype):
    weight = torch.nn.Parameter(torch.randn(64, 96).to(dtype), requires_grad=False)
    original = weight.detach().clone()
    assert offload_weight(weight, tmp_path)
    assert weight.dtype == dtype
    assert torch.equal(weight.view(torch.uint8), original.view(torch.uint8))


def test_unwritable_folder_keeps_weight(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    pointer = weight.data_ptr()
    with caplog.at_level(logging.WARNING, logger="quaff_compile.offload"):
        assert not offload_weight(weight, blocker / "offload")
    assert weight.data_ptr() == pointer
    assert "weights stay in memory" in caplog.text


def test_non_contiguous_weight_stays(tmp_path):
    weight = torch.nn.Parameter(torch.randn(96, 64).t(), requires_grad=False)
    stride = weight.stride()
    assert not offload_weight(weight, tmp_path)
    assert weight.stride() == stride
    assert mapped_files(tmp_path) == []


@pytest.mark.parametrize("value", ["", 3, None])
def test_invalid_offload_option(value):
    with pytest.raises(ValueError, match="offload_weights must be True, False or a folder path"):
        QuaffConfig.from_options({"offload_weights": value})


@pytest.mark.parametrize("value", ["False", "true"])
def test_boolean_string_offload_option(value):
    with pytest.raises(ValueError, match="pass the boolean"):
        QuaffConfig.from_options({"offload_weights": value})


def test_unusable_folder_warns_once(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    weights = [torch.nn.Parameter(torch.randn(16, 16), requires_grad=False) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="quaff_compile.offload"):
        for weight in weights:
            assert not offload_weight(weight, blocker)
    assert caplog.text.count("cannot create a file") == 1


def _train(model, options, steps=2):
    compiled = torch.compile(model, backend="quaff", options=options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 24), generator=generator)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return compiled, losses


def test_offload_training_and_checkpoints(tmp_path):
    folder = tmp_path / "offload"
    model = tiny_peft_llama()
    reference = tiny_peft_llama()
    original = {name: value.clone() for name, value in model.state_dict().items() if "lora" not in name}

    _, losses = _train(model, {**TINY_OPTIONS, "offload_weights": str(folder)})
    torch._dynamo.reset()
    _, reference_losses = _train(reference, TINY_OPTIONS)

    assert losses == reference_losses
    assert len(layer_states(model)) == 14
    assert len(mapped_files(folder)) == 14
    assert list(folder.iterdir()) == []
    # The frozen weights read back bit for bit, through state_dict and save_pretrained.
    state = model.state_dict()
    for name, value in original.items():
        assert torch.equal(state[name], value), name
    model.base_model.model.save_pretrained(tmp_path / "full")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "full" / "model.safetensors")
    reference_state = reference.base_model.model.state_dict()
    for name, value in saved.items():
        assert torch.equal(value, reference_state[name]), name
    # The adapter saves as without offloading.
    model.save_pretrained(tmp_path / "adapter")
    reference.save_pretrained(tmp_path / "reference_adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference_adapter = load_file(tmp_path / "reference_adapter" / "adapter_model.safetensors")
    assert adapter.keys() == reference_adapter.keys()
    for name in adapter:
        assert torch.equal(adapter[name], reference_adapter[name]), name


def test_merge_and_eager_after_offload(tmp_path):
    model = tiny_peft_llama()
    reference = tiny_peft_llama()
    _train(model, {**TINY_OPTIONS, "offload_weights": str(tmp_path)})
    torch._dynamo.reset()
    _train(reference, TINY_OPTIONS)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        eager = model(input_ids=ids).logits
        eager_reference = reference(input_ids=ids).logits
    assert torch.equal(eager, eager_reference)

    merged = model.merge_and_unload()
    merged_reference = reference.merge_and_unload()
    for (name, value), (_, expected) in zip(merged.state_dict().items(), merged_reference.state_dict().items()):
        assert torch.equal(value, expected), name
