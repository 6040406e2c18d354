"""Shared pieces of the benchmarks: the model and data of the main job, tables and the closing JSON line."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from quaff_compile.data import load_examples, pack_sequences, split_held_out, tokenize_examples
from quaff_compile.models import load_model_and_tokenizer


def load_main_job(model_path=None, data_path=None, seq_len: int = 128, seed: int = 0):
    """Return (model, tokenizer, train_rows, held_out_rows) as quaff-finetune builds them."""
    model, tokenizer = load_model_and_tokenizer(model_path)
    train, held_out = split_held_out(load_examples(data_path), fraction=0.1, seed=seed)
    train_rows = pack_sequences(tokenize_examples(tokenizer, train), seq_len)
    held_out_rows = pack_sequences(tokenize_examples(tokenizer, held_out), seq_len)
    return model, tokenizer, train_rows, held_out_rows


def median_time(function, repeats: int = 5, warmup: int = 1) -> float:
    """Return the median wall time of `function()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def finish(results: dict, json_path: Path | None) -> None:
    """Print `results` as the last line, as JSON, and write it to `json_path` if given."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
