"""The quaff backend with the libraries around it: PEFT methods, the Hugging Face Trainer and DDP."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from quaff_compile import layer_states
from tests import ddp_worker
from tests.conftest import TINY_OPTIONS, tiny_llama, tiny_peft_llama

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
INPUTS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LAYERS = 2


def adapter_base_layers() -> set[str]:
    """Return the fqns of the frozen linears that LoRA, DoRA and IA3 wrap as `base_layer`."""
    return {f"base_model.model.model.layers.{layer}.{projection}.base_layer" for layer in range(LAYERS) for projection in PROJECTIONS}


def prompt_model_linears() -> set[str]:
    """Return the fqns of the decoder linears under a prompt-learning PeftModel, which wraps no layer."""
    return {f"base_model.model.layers.{layer}.{projection}" for layer in range(LAYERS) for projection in PROJECTIONS}


PEFT_METHODS = {
    "lora": (lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"), adapter_base_layers),
    # DoRA's base linears reach Dynamo's graphs only through the tracing
    # substitute in quaff_compile/compat.py: without it, peft 0.21.2's
    # dequantize_module_weight breaks the graph inside the LoRA layer's adapter
    # loop, and Dynamo runs each DoRA layer eagerly.
    "dora": (
        lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", use_dora=True),
        adapter_base_layers,
    ),
    "ia3": (
        lambda: IA3Config(
            target_modules=[projection.split(".")[1] for projection in PROJECTIONS], feedforward_modules=["down_proj"]
        ),
        adapter_base_layers,
    ),
    "prompt_tuning": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), prompt_model_linears),
    "p_tuning": (
        lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=64),
        prompt_model_linears,
    ),
}

@dataclasses.dataclass
class TrainingRun:
    model: torch.nn.Module
    losses: list[float]
    reference_loss: float
    last_gradients: dict[str, torch.Tensor | None]
    fallback_warnings: list[str]


def is_fallback_warning(warning: warnings.WarningMessage) -> bool:
    return issubclass(warning.category, RuntimeWarning) and str(warning.message).startswith("quaff:")


@functools.cache
def train_with_peft_method(method: str) -> TrainingRun:
    """Train a compiled tiny Llama with one PEFT method for 2 AdamW steps.

    The result is cached, so the tests of one method share a single run.
    """
    make_config, _ = PEFT_METHODS[method]
    base = tiny_llama()
    base.config.use_cache = False
    model = get_peft_model(base, make_config())

    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference_loss = reference(input_ids=INPUTS, labels=INPUTS).loss.item()

    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = compiled(input_ids=INPUTS, labels=INPUTS).loss
            loss.backward()
            gradients = {
                name: None if parameter.grad is None else parameter.grad.detach().clone()
                for name, parameter in model.named_parameters()
                if parameter.requires_grad
            }
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    fallbacks = [str(warning.message) for warning in caught if is_fallback_warning(warning)]
    return TrainingRun(model, losses, reference_loss, gradients, fallbacks)


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_gradients_reach_every_trainable_parameter(method):
    run = train_with_peft_method(method)
    assert run.last_gradients, "the PEFT model has no trainable parameters"
    # The second step's gradients are checked because LoRA and DoRA start
    # with B = 0, so A gets a zero gradient on the first step.
    for name, gradient in run.last_gradients.items():
        assert gradient is not None, f"{name} got no gradient"
        assert torch.isfinite(gradient).all(), f"{name} has a non-finite gradient"
        assert gradient.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_first_loss_matches_eager_float(method):
    run = train_with_peft_method(method)
    assert all(math.isfinite(loss) for loss in run.losses), run.losses
    assert run.losses[0] == pytest.approx(run.reference_loss, rel=0.02)


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_frozen_linears_run_int8(method):
    run = train_with_peft_method(method)
    _, expected_linears = PEFT_METHODS[method]
    assert run.fallback_warnings == []
    states = layer_states(run.model)
    assert states, "no linear was rewritten to int8"
    assert set(states) == expected_linears()


def token_rows_dataset(rows: int = 8, length: int = 24) -> list[dict[str, torch.Tensor]]:
    """Return an in-memory dataset of random token rows, each row its own labels."""
    token_rows = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in token_rows]


def trainer_arguments(output_dir: Path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**settings, **overrides})


def test_trainer_fine_tunes_compiled_lora_model(tmp_path):
    model = tiny_peft_llama()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    # TrainingArguments has no field for backend options, and accelerate
    # rejects the name "quaff" (see the xfail test below), so the model is
    # compiled in place and the Trainer's own torch_compile stays off.
    model.compile(backend="quaff", options=TINY_OPTIONS)
    trainer = Trainer(model=model, args=trainer_arguments(tmp_path), train_dataset=token_rows_dataset())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()

    assert [str(warning.message) for warning in caught if is_fallback_warning(warning)] == []
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    logged_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged_losses) == 3
    assert all(math.isfinite(loss) for loss in logged_losses), logged_losses

    assert trainer.model is model
    assert set(layer_states(trainer.model)) == adapter_base_layers()

    unchanged = [
        name for name, parameter in model.named_parameters() if parameter.requires_grad and torch.equal(parameter, before[name])
    ]
    assert unchanged == []


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason=(
        "accelerate 1.16's TorchDynamoPlugin converts the backend name to its DynamoBackend enum and raises "
        "ValueError: 'QUAFF' is not a valid DynamoBackend, so Trainer(...) fails before training"
    ),
)
def test_trainer_accepts_quaff_backend_name(tmp_path):
    arguments = trainer_arguments(tmp_path, torch_compile=True, torch_compile_backend="quaff")
    model = tiny_peft_llama()
    trainer = Trainer(model=model, args=arguments, train_dataset=token_rows_dataset())
    trainer.train()
    assert layer_states(model)


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ddp_worker(output: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run tests/ddp_worker.py on two CPU processes through torchrun, killing the whole group on timeout."""
    port = free_local_port()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1",
        "--master_port", str(port),
        str(REPOSITORY_ROOT / "tests" / "ddp_worker.py"), str(output),
    ]  # fmt: skip
    # One thread per rank: the two ranks share the machine's cores.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    process = subprocess.Popen(
        command,
        cwd=REPOSITORY_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        pytest.fail(f"the DDP worker timed out after {timeout} s; its output ends with:\n{stdout[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, None)


def test_ddp_matches_single_process(tmp_path):
    output = tmp_path / "ddp.json"
    result = run_ddp_worker(output, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads(output.read_text())
    ranks = report["ranks"]
    assert report["world_size"] == 2

    for rank in ranks:
        assert rank["int8_layers"] == len(adapter_base_layers())
        assert len(rank["losses"]) == ddp_worker.STEPS
    # DDP averages the gradients, so every replica takes the same steps.
    assert ranks[0]["trainable_sum"] == ranks[1]["trainable_sum"]

    model = ddp_worker.build_model()
    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    single_losses = ddp_worker.train(compiled, model, ddp_worker.BATCH)
    ddp_losses = [sum(step_losses) / len(step_losses) for step_losses in zip(*(rank["losses"] for rank in ranks))]
    print("DDP mean losses", ddp_losses, "single-process losses", single_losses)

    # Every rank has the same number of label tokens, so the mean of the rank
    # losses is the whole batch's loss and the averaged gradient is the whole
    # batch's gradient. Only the int8 rounding differs, because each layer's
    # outlier channels and smooth_scale come from the max |x| of the rows a
    # process trains on, and test_backend.py bounds the loss change from int8
    # rounding by 0.02. Measured on a 2-core CPU: 0.0003, 0.0005 and 0.006 at
    # steps 1 to 3, but 0.03 and 0.05 at steps 2 and 3 when the ranks skip
    # DDP and each steps on its own gradients.
    for step, (ddp_loss, single_loss) in enumerate(zip(ddp_losses, single_losses)):
        assert abs(ddp_loss - single_loss) < 0.02, f"step {step}: DDP {ddp_loss:.5f}, one process {single_loss:.5f}"
