"""Forward and backward time of one quaff linear against fp32 and raw torch._int_mm.

Shapes (M tokens, K in_features, N out_features): the linears of SmolLM2-135M
at M = 4 * 256 = 1024 tokens (q/o, k/v, gate/up, down), and a large one,
M = 2048, K = N = 4096. Variants, each timed as a training forward and as a
forward plus the input gradient (the weight is frozen, so it gets none):

- fp32_mm: `x @ w.t()`, and `g @ w` for the backward;
- int_mm_raw: `torch._int_mm` on operands already in int8, laid out as
  quaff's graphs pass them: x [M, K] row-major with the [N, K] weight
  transposed by `.t()`, then the [M, N] gradient with the weight as stored.
  This is the limit, the int8 matmul alone;
- quaff: a module holding one frozen bias-free nn.Linear, compiled with
  `backend="quaff"`, `matmul="int_mm"` and `outlier_max_ratio=0` (no outlier
  slots);
- quaff_smoothed: the same with the default `outlier_max_ratio` (0.01) and an
  input with a few outlier channels, so the layer gets outlier slots;
- inductor_fp32: the same module compiled with the default backend.

Each time is the median of `--repeats` calls after warm-up. The int8 peak is
the best rate of raw `_int_mm` over a few large square shapes, and "% int8
peak" is the variant's rate of int8-equivalent operations (2*M*K*N per matmul,
one matmul forward, two forward plus backward) as a share of it. It prints a
table and ends with one JSON line.

NOTE: on a CPU shared with other jobs, each OpenMP parallel region waits for
its slowest thread, and a thread that the OS has descheduled can cost a
scheduler tick. On a loaded 2-core machine with a 250 Hz kernel, the small
shapes' times clustered at multiples of 4 ms, so they measured those waits
more than the kernels. OMP_NUM_THREADS=1 avoids the waits.

    python bench/linear.py --json runs/linear.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quaff_compile  # noqa: E402
from bench.harness import finish, median_time, print_table, set_seed  # noqa: E402
from quaff_compile.numerics import quantize_per_token, quantize_weight_per_channel  # noqa: E402

SMALL_SHAPES = {
    "q/o": (1024, 576, 576),
    "k/v": (1024, 576, 192),
    "gate/up": (1024, 576, 1536),
    "down": (1024, 1536, 576),
}
LARGE_SHAPES = {"large": (2048, 4096, 4096)}
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096))
VARIANTS = ("fp32_mm", "int_mm_raw", "quaff", "quaff_smoothed", "inductor_fp32")

# Outputs and input gradients of a compiled variant must match fp32 within this
# relative Frobenius error, so that a broken int8 path cannot give a fast row.
# Per-token int8 on both operands of these random inputs lands near 1%. The
# output error is taken relative to the output of the input without outlier
# channels: relative to its own output, which the outliers dominate, an int8
# linear with no smoothing at all would pass too.
MAX_RELATIVE_ERROR = 0.02
# Outlier channels injected into the input of quaff_smoothed, and their gain
# over the other channels: far above the backend's default outlier_threshold
# of 100 times the mean |x|.
OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 1000.0
# Warm-up calls before timing a compiled module: the first compiles, and
# quaff_smoothed chooses its outlier channels over its first 8 training
# forwards (the default online_calibration_steps), which must not be timed.
COMPILED_WARMUP = 10
# The goal for the large shape: quaff's forward plus backward at most this
# many times the two raw int8 matmuls it contains.
LARGE_TARGET_VS_INT_MM_RAW = 1.3


class FrozenLinear(torch.nn.Module):
    """One bias-free nn.Linear with a frozen weight, as SmolLM2's linears are under LoRA."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features, bias=False)
        self.linear.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Return ||actual - expected|| / ||scale||, with `scale` defaulting to `expected` (Frobenius norms)."""
    scale = expected if scale is None else scale
    return (torch.linalg.norm(actual.float() - expected) / torch.linalg.norm(scale)).item()


def measure_peak_tops(repeats: int) -> tuple[float, tuple[int, int, int]]:
    """Return the best int8 rate of raw `_int_mm` over PEAK_SHAPES, in TOPS, and its shape."""
    best_tops, best_shape = 0.0, PEAK_SHAPES[0]
    for m, k, n in PEAK_SHAPES:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        seconds = median_time(lambda: torch._int_mm(a, b.t()), repeats=repeats, warmup=1)
        tops = 2 * m * k * n / seconds / 1e12
        if tops > best_tops:
            best_tops, best_shape = tops, (m, k, n)
    return best_tops, best_shape


def time_fp32_mm(x, weight, grad_output, repeats: int) -> tuple[float, float]:
    def forward():
        return x @ weight.t()

    def forward_backward():
        forward()
        return grad_output @ weight

    return median_time(forward, repeats, warmup=1), median_time(forward_backward, repeats, warmup=1)


def time_int_mm_raw(x, weight, grad_output, repeats: int) -> tuple[float, float]:
    x_qdata, _ = quantize_per_token(x)
    weight_qdata, _ = quantize_weight_per_channel(weight)
    grad_qdata, _ = quantize_per_token(grad_output)

    def forward():
        return torch._int_mm(x_qdata, weight_qdata.t())

    def forward_backward():
        forward()
        return torch._int_mm(grad_qdata, weight_qdata)

    return median_time(forward, repeats, warmup=1), median_time(forward_backward, repeats, warmup=1)


def compile_variant(variant: str, weight: torch.Tensor) -> torch.nn.Module:
    """Return a train-mode FrozenLinear holding a copy of `weight`, compiled for `variant`."""
    module = FrozenLinear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        module.linear.weight.copy_(weight)
    module.train()
    # Each variant and shape compiles from scratch: a cached graph of another
    # shape would make Dynamo recompile with dynamic shapes.
    torch._dynamo.reset()
    if variant == "inductor_fp32":
        return torch.compile(module, dynamic=False)
    options = {"matmul": "int_mm", "strict": True}
    if variant == "quaff":
        options["outlier_max_ratio"] = 0.0
    return torch.compile(module, backend="quaff", options=options, dynamic=False)


def time_compiled(variant, weight, x, plain_output, grad_output, repeats: int) -> tuple[float, float, dict]:
    """Time a compiled FrozenLinear, then check its output and input gradient against fp32.

    `plain_output` is the fp32 output of the input without outlier channels,
    the scale of the output error. Returns the forward time, the forward plus
    backward time, and the checks: relative errors, and for quaff variants the
    number of outlier channels the layer chose.
    """
    module = compile_variant(variant, weight)
    x = x.detach().requires_grad_(True)

    def forward():
        return module(x)

    def forward_backward():
        return torch.autograd.grad(module(x), x, grad_output)

    forward_seconds = median_time(forward, repeats, warmup=COMPILED_WARMUP)
    forward_backward_seconds = median_time(forward_backward, repeats, warmup=2)

    output = module(x)
    (grad_input,) = torch.autograd.grad(output, x, grad_output)
    with torch.no_grad():
        checks = {
            "output_relative_error": relative_error(output.detach(), x.detach() @ weight.t(), plain_output),
            "grad_input_relative_error": relative_error(grad_input, grad_output @ weight),
        }
    for name in ("output_relative_error", "grad_input_relative_error"):
        if not checks[name] <= MAX_RELATIVE_ERROR:
            raise AssertionError(
                f"{variant}: {name} is {checks[name]:.4f}, above {MAX_RELATIVE_ERROR}, "
                "so the compiled linear does not compute x @ w.t()"
            )

    if variant.startswith("quaff"):
        states = quaff_compile.layer_states(module)
        if "linear" not in states:
            raise AssertionError(f"{variant}: the linear has no Quaff state, so it did not run in int8")
        checks["outlier_channels"] = states["linear"].num_outliers
        if variant == "quaff_smoothed" and checks["outlier_channels"] == 0:
            raise AssertionError("quaff_smoothed: the backend chose no outlier channels for the injected ones")
    return forward_seconds, forward_backward_seconds, checks


def make_operands(m: int, k: int, n: int) -> dict[str, torch.Tensor]:
    """Return the weight, the plain input, an input with outlier channels, and the output gradient."""
    weight = torch.nn.Linear(k, n, bias=False).weight.detach()
    x = torch.randn(m, k)
    x_outliers = x.clone()
    channels = torch.randperm(k)[:OUTLIER_CHANNELS]
    x_outliers[:, channels] *= OUTLIER_GAIN
    return {"weight": weight, "x": x, "x_outliers": x_outliers, "grad_output": torch.randn(m, n)}


def measure_shape(m: int, k: int, n: int, repeats: int) -> dict[str, dict]:
    """Time every variant on one shape, and return per variant the times in seconds and the checks."""
    operands = make_operands(m, k, n)
    weight, grad_output = operands["weight"], operands["grad_output"]
    plain_output = operands["x"] @ weight.t()
    results = {}
    for variant in VARIANTS:
        x = operands["x_outliers"] if variant == "quaff_smoothed" else operands["x"]
        checks = {}
        if variant == "fp32_mm":
            forward_seconds, forward_backward_seconds = time_fp32_mm(x, weight, grad_output, repeats)
        elif variant == "int_mm_raw":
            forward_seconds, forward_backward_seconds = time_int_mm_raw(x, weight, grad_output, repeats)
        else:
            forward_seconds, forward_backward_seconds, checks = time_compiled(
                variant, weight, x, plain_output, grad_output, repeats
            )
        results[variant] = {"forward_s": forward_seconds, "forward_backward_s": forward_backward_seconds, **checks}
        print(
            f"  {variant}: forward {forward_seconds * 1e3:.3f} ms, "
            f"forward+backward {forward_backward_seconds * 1e3:.3f} ms",
            flush=True,
        )
    return results


def add_ratios(results: dict[str, dict], m: int, k: int, n: int, peak_tops: float) -> None:
    """Add to each variant its time over int_mm_raw and over fp32_mm, and its share of the int8 peak."""
    raw, fp32 = results["int_mm_raw"], results["fp32_mm"]
    for entry in results.values():
        for phase, matmuls in (("forward", 1), ("forward_backward", 2)):
            seconds = entry[f"{phase}_s"]
            entry[f"{phase}_vs_int_mm_raw"] = seconds / raw[f"{phase}_s"]
            entry[f"{phase}_vs_fp32_mm"] = seconds / fp32[f"{phase}_s"]
            entry[f"{phase}_percent_of_int8_peak"] = 100 * 2 * m * k * n * matmuls / seconds / 1e12 / peak_tops


def table_rows(name: str, m: int, k: int, n: int, results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for variant, entry in results.items():
        rows.append(
            [
                name,
                f"{m}x{k}x{n}",
                variant,
                f"{entry['forward_s'] * 1e3:.3f}",
                f"{entry['forward_backward_s'] * 1e3:.3f}",
                f"{entry['forward_vs_int_mm_raw']:.2f}",
                f"{entry['forward_backward_vs_int_mm_raw']:.2f}",
                f"{entry['forward_vs_fp32_mm']:.2f}",
                f"{entry['forward_backward_vs_fp32_mm']:.2f}",
                f"{entry['forward_percent_of_int8_peak']:.0f}",
                f"{entry['forward_backward_percent_of_int8_peak']:.0f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        choices=("small", "large", "all"),
        default="all",
        help="small: SmolLM2-135M's linears at 1024 tokens; large: 2048x4096x4096 (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed calls per variant and phase; the median counts (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    shapes = {}
    if args.shapes in ("small", "all"):
        shapes.update(SMALL_SHAPES)
    if args.shapes in ("large", "all"):
        shapes.update(LARGE_SHAPES)

    set_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    peak_tops, peak_shape = measure_peak_tops(args.repeats)
    print(f"int8 peak of raw _int_mm: {peak_tops:.3f} TOPS at {'x'.join(map(str, peak_shape))}", flush=True)

    all_results = {}
    rows = []
    for name, (m, k, n) in shapes.items():
        print(f"{name}: M={m} K={k} N={n}", flush=True)
        results = measure_shape(m, k, n, args.repeats)
        add_ratios(results, m, k, n, peak_tops)
        all_results[name] = {"m": m, "k": k, "n": n, "variants": results}
        rows.extend(table_rows(name, m, k, n, results))

    print()
    print_table(
        [
            "shape",
            "MxKxN",
            "variant",
            "fwd ms",
            "fwd+bwd ms",
            "fwd /raw",
            "fwd+bwd /raw",
            "fwd /fp32",
            "fwd+bwd /fp32",
            "fwd % peak",
            "fwd+bwd % peak",
        ],
        rows,
    )
    summary = {}
    if "large" in all_results:
        ratio = all_results["large"]["variants"]["quaff"]["forward_backward_vs_int_mm_raw"]
        summary = {
            "large_quaff_vs_int_mm_raw": ratio,
            "large_target_vs_int_mm_raw": LARGE_TARGET_VS_INT_MM_RAW,
            "large_target_met": ratio <= LARGE_TARGET_VS_INT_MM_RAW,
        }
        print(
            f"large: quaff forward+backward is {ratio:.2f} times int_mm_raw "
            f"(target at most {LARGE_TARGET_VS_INT_MM_RAW}: {'met' if summary['large_target_met'] else 'not met'})"
        )
    finish(
        {
            **summary,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "int8_peak_tops": peak_tops,
            "int8_peak_shape": list(peak_shape),
            "repeats": args.repeats,
            "shapes": all_results,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
