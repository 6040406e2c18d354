"""Training-step time, compile time and peak memory of LoRA fine-tuning, variant by variant.

SmolLM2-135M-Instruct with LoRA r=8 on all seven projections of every layer,
batch 4, sequence 256, AdamW, on the same batches for every variant:

- eager_fp32: no compilation;
- inductor_fp32: `torch.compile` with the default backend;
- inductor_bf16_autocast: the same, with the step under bf16 autocast;
- torchao_int8_dynamic: torchao's `Int8DynamicActivationInt8WeightConfig` on
  the frozen base linears, then the default backend;
- eager_module_swap: the method as a plain-torch module swap, not compiled
  (`bench/module_swap.py`);
- quaff: `backend="quaff"`.

Step times come from one process, variant after variant: the median of
`--steps` steps after `--warmup` untimed ones. `compile_time_s` is the first
step's time minus that median. Peak memory cannot be told apart inside one
process, so each variant also runs alone in a child process (compilation and
`--memory-steps` steps), which reports its peak RSS.

    python bench/finetune_step.py --json runs/finetune_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import finish, load_main_job, print_table  # noqa: E402
from quaff_compile.finetune import _make_peft_model, compile_model  # noqa: E402

VARIANTS = (
    "eager_fp32",
    "inductor_fp32",
    "inductor_bf16_autocast",
    "torchao_int8_dynamic",
    "eager_module_swap",
    "quaff",
)
REFERENCE = "inductor_fp32"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def apply_torchao_int8_dynamic(model: torch.nn.Module) -> int:
    """Quantize the frozen base linears of the LoRA layers with torchao; return how many."""
    from peft.tuners.lora import LoraLayer
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    bases = {
        module.base_layer
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "lm_head" not in name.split(".")
    }
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda module, fqn: module in bases)
    return len(bases)


def build_variant(name: str, model, args):
    """Prepare `model` for variant `name`; return (callable model, context manager factory for each step)."""
    step_context = contextlib.nullcontext
    if name == "eager_fp32":
        return model, step_context
    if name == "eager_module_swap":
        from bench.module_swap import swap_frozen_linears

        swap_frozen_linears(model)
        return model, step_context
    if name == "torchao_int8_dynamic":
        apply_torchao_int8_dynamic(model)
    if name == "inductor_bf16_autocast":

        def step_context():
            return torch.autocast("cpu", dtype=torch.bfloat16)

    backend = "quaff" if name == "quaff" else "inductor"
    return compile_model(model, backend, {}, args.compile), step_context


def train_steps(compiled, model, step_context, batches, lr: float) -> tuple[list[float], list[float]]:
    """Run one AdamW step per batch; return the step times and losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        with step_context():
            loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return times, losses


def fixed_batches(rows: torch.Tensor, batch_size: int, count: int) -> list[dict]:
    """Return `count` batches of consecutive rows, the same for every variant."""
    if rows.shape[0] < batch_size:
        raise SystemExit(f"only {rows.shape[0]} rows of text for a batch of {batch_size}; lower --seq-len")
    batches = []
    for index in range(count):
        start = (index * batch_size) % (rows.shape[0] - batch_size + 1)
        ids = rows[start:start + batch_size]
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def time_variant(name: str, base_model, batches, args) -> dict:
    torch._dynamo.reset()
    model = _make_peft_model(base_model, args.lora_r, seed=0)
    model.train()
    compiled, step_context = build_variant(name, model, args)
    times, losses = train_steps(compiled, model, step_context, batches, args.lr)
    timed = times[1 + args.warmup:]
    step_time = sorted(timed)[len(timed) // 2]
    tokens = batches[0]["input_ids"].numel()
    print(f"{name}: first step {times[0]:.2f} s, median step {step_time:.3f} s, losses {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {
        "step_time_s": step_time,
        "compile_time_s": max(times[0] - step_time, 0.0),
        "first_step_s": times[0],
        "tokens_per_s": tokens / step_time,
        "losses": losses,
    }


def measure_memory_here(name: str, args) -> dict:
    """In a child process: load the model, run the variant for a few steps, report the peak RSS."""
    from peft import LoraConfig, get_peft_model

    base_model, _, rows, _ = load_main_job(seq_len=args.seq_len)
    loaded_rss = current_rss_mb()
    torch.manual_seed(0)
    base_model.config.use_cache = False
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base_model, lora)
    model.train()
    compiled, step_context = build_variant(name, model, args)
    train_steps(compiled, model, step_context, fixed_batches(rows, args.batch_size, 1 + args.memory_steps), args.lr)
    return {"peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded_rss}


def measure_memory(name: str, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        name,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--lora-r",
        str(args.lora_r),
        "--memory-steps",
        str(args.memory_steps),
        "--compile",
        args.compile,
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the memory run of {name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--compile", choices=("regional", "full"), default="regional")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps after the first in each memory run")
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes that measure peak memory")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_child:
        print(json.dumps(measure_memory_here(args.memory_child, args)))
        return 0
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    base_model, _, rows, _ = load_main_job(seq_len=args.seq_len)
    batches = fixed_batches(rows, args.batch_size, 1 + args.warmup + args.steps)
    results = {name: time_variant(name, base_model, batches, args) for name in names}
    del base_model
    if not args.no_memory:
        for name in names:
            results[name].update(measure_memory(name, args))
            print(f"{name}: peak RSS {results[name]['peak_rss_mb']:.0f} MiB")

    reference = results.get(REFERENCE)
    header = ["variant", "step s", "vs inductor_fp32", "compile s", "vs inductor_fp32", "tokens/s", "peak RSS MiB", "vs inductor_fp32"]
    rows_out = []
    for name, result in results.items():

        def ratio(key):
            if reference is None or key not in result or key not in reference:
                return ""
            return f"{result[key] / reference[key]:.2f}" if reference[key] else ""

        rows_out.append(
            [
                name,
                f"{result['step_time_s']:.3f}",
                ratio("step_time_s"),
                f"{result['compile_time_s']:.1f}",
                ratio("compile_time_s"),
                f"{result['tokens_per_s']:.0f}",
                f"{result['peak_rss_mb']:.0f}" if "peak_rss_mb" in result else "",
                ratio("peak_rss_mb"),
            ]
        )
    print_table(header, rows_out)
    for result in results.values():
        if not all(math.isfinite(loss) for loss in result["losses"]):
            raise SystemExit("a variant's loss became NaN or infinite")
    finish({"results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
