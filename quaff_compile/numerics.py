"""Numeric primitives of the Quaff linear, shared by the passes and the tests.

For a frozen linear `Y = X W^T` with outlier input channels O and a
`smooth_scale` s (1 off O), the rewritten linear computes

    X_hat = X / s
    Y = dequant(int8(X_hat) @ int8(W)^T) + bias + X_hat[:, O] @ ((s_O - 1) * W[:, O])^T

which equals `X W^T` in exact arithmetic, so the int8 weight is quantized once
and never touched again when s moves. Activations are quantized per token
(one `act_scale` per row), weights per output channel (one `weight_scale` per
row of W), both symmetric in [-127, 127]. Every scale is computed in fp32,
because a half-precision scale times an int32 accumulator overflows.

The backward gives `grad_input` from a second int8 matmul: the output gradient
is multiplied by `weight_scale` (which lives on the contracted dimension, so it
cannot be applied after the matmul), quantized per token, and multiplied with
the same int8 W. W gets no gradient.

These functions are traced by AOTAutograd into aten ops that Inductor fuses:
the quantization of an operand becomes one kernel, `_int_mm` an extern call,
and the dequantization, correction and bias one more kernel.
"""

from __future__ import annotations

import inspect
import math

import torch

QUANT_MIN = -127
QUANT_MAX = 127

# The fp32 emulation of an int8 matmul sums at most this many products per
# fp32 matmul: 1024 * 127 * 127 = 16,516,096 < 2**24, so every partial sum is
# an integer that fp32 represents exactly, whatever order the BLAS adds in.
EMULATED_CHUNK = 1024

# The largest inner size whose int32 sums cannot overflow: 133,144 products of
# two int8 values in [-127, 127] reach at most 2,147,479,576 < 2**31 - 1.
MAX_INNER = (2**31 - 1) // (QUANT_MAX * QUANT_MAX)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor row by row to symmetric int8.

    Returns `(qdata, act_scale)` with `qdata` int8 in [-127, 127] and
    `act_scale` fp32 of shape [rows, 1], so `qdata * act_scale` approximates x.
    An all-zero row gets `act_scale` 0 and `qdata` 0, never 0/0.
    """
    x = x.float()
    act_scale = x.abs().amax(dim=1, keepdim=True) / QUANT_MAX
    # A zero row divides by 1 instead of 0; its qdata is 0 either way.
    divisor = torch.where(act_scale == 0, torch.ones_like(act_scale), act_scale)
    qdata = torch.round(x / divisor).clamp(QUANT_MIN, QUANT_MAX).to(torch.int8)
    return qdata, act_scale


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight per output channel; returns `(qdata, weight_scale[N])`."""
    qdata, scale = quantize_per_token(weight.detach())
    return qdata, scale.reshape(-1)


def int_mm_refusal(in_features: int, out_features: int) -> str | None:
    """Return why `torch._int_mm` cannot serve a linear of this size, or None.

    CUDA's `_int_mm` rejects an inner size below 16 or not a multiple of 8,
    and an output size not a multiple of 8. The CPU kernel of torch 2.13
    accepts them, but applying one rule keeps behaviour the same on both
    devices. The backward multiplies over the output size, so it must meet the
    inner-size rule too. Neither size may exceed MAX_INNER, so that the int32
    sums cannot overflow.
    """
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size > MAX_INNER:
            return (
                f"{name}={size} exceeds {MAX_INNER}, beyond which the int32 accumulator of an int8 matmul "
                "can overflow"
            )
    if in_features < 16 or in_features % 8:
        return f"in_features={in_features} must be at least 16 and a multiple of 8 for torch._int_mm"
    if out_features < 16 or out_features % 8:
        return (
            f"out_features={out_features} must be at least 16 and a multiple of 8 for torch._int_mm "
            "(it is the inner size of the backward matmul)"
        )
    return None


def int_mm_is_fast(device: torch.device) -> bool:
    """Return whether `torch._int_mm` runs on an int8 matrix unit on this device.

    On CPUs without AVX512-VNNI or AMX (AVX2-only ones, for example), torch
    2.13's `_int_mm` falls back to a scalar loop that measured about 30 times
    slower than an fp32 matmul, so "auto" emulates it with fp32 there instead.
    """
    if device.type == "cuda":
        return True
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def int8_matmul(a: torch.Tensor, b: torch.Tensor, matmul: str) -> torch.Tensor:
    """Return the int32 product of int8 `a` [M, K] and int8 `b` [K, N].

    `matmul="int_mm"` calls `torch._int_mm`; `"emulated"` computes the same
    integers with fp32 matmuls over chunks of at most EMULATED_CHUNK inner
    elements, each of which is exact.
    """
    if matmul == "int_mm":
        # torch 2.13's CPU _int_mm returns wrong sums for an operand with a
        # zero stride (an expanded tensor) on CPUs with AVX512-VNNI or AMX.
        if 0 in a.stride():
            a = a.contiguous()
        if 0 in b.stride():
            b = b.contiguous()
        rows = a.shape[0]
        if a.is_cuda and rows <= 16:
            # CUDA's _int_mm rejects 16 rows or fewer; pad with zero rows.
            a = torch.nn.functional.pad(a, (0, 0, 0, 17 - rows))
            return torch._int_mm(a, b)[:rows]
        return torch._int_mm(a, b)

    inner = a.shape[1]
    total = None
    for start in range(0, inner, EMULATED_CHUNK):
        stop = min(start + EMULATED_CHUNK, inner)
        part = (a[:, start:stop].float() @ b[start:stop].float()).to(torch.int32)
        total = part if total is None else total + part
    if total is None:
        total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    return total


def updated_smooth_scale(
    x: torch.Tensor,
    outlier_channels: torch.Tensor,
    outlier_weight_absmax: torch.Tensor,
    smooth_scale: torch.Tensor,
    momentum: float,
) -> torch.Tensor:
    """Return the momentum update of `smooth_scale` for the activation x.

    `s_new = max(1, sqrt(max over tokens |x_O| / max over outputs |W_O|))`, and
    the result is `momentum * s_new + (1 - momentum) * smooth_scale`. A channel
    whose `s_new` is not finite (a NaN or inf in x) keeps its old value, so one
    bad batch cannot poison the running state; an empty batch keeps it too.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()
    x_outliers = x.index_select(1, outlier_channels).abs()
    # A row of -inf changes no maximum, and gives an empty batch -inf, which
    # the finiteness check below turns into "keep the old value".
    floor = torch.full((1, x_outliers.shape[1]), -math.inf, device=x.device)
    x_absmax = torch.cat([x_outliers, floor]).amax(dim=0)
    s_new = torch.sqrt(x_absmax / outlier_weight_absmax).clamp_min(1.0)
    s_new = torch.where(torch.isfinite(s_new), s_new, smooth_scale)
    return momentum * s_new + (1.0 - momentum) * smooth_scale


class QuaffLinearFunction(torch.autograd.Function):
    """The int8 linear with outlier smoothing; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight_qdata, weight_scale, bias, outlier_channels, outlier_weight, smooth_scale, matmul):
        # Under autocast, eager linear returns the autocast dtype, so this does
        # too. The arithmetic runs with autocast off: autocast would compute the
        # fp32 emulation and the correction term in half precision.
        device_type = x.device.type
        output_dtype = x.dtype
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            output_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y = QuaffLinearFunction._forward(
                x, weight_qdata, weight_scale, bias, outlier_channels, outlier_weight, smooth_scale, matmul
            )
        ctx.save_for_backward(weight_qdata, weight_scale)
        ctx.matmul = matmul
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return y.to(output_dtype)

    @staticmethod
    def _forward(x, weight_qdata, weight_scale, bias, outlier_channels, outlier_weight, smooth_scale, matmul):
        in_features = x.shape[-1]
        out_features = weight_qdata.shape[0]
        x_2d = x.reshape(-1, in_features).float()

        if outlier_channels is not None:
            divisor = torch.ones(in_features, device=x.device, dtype=torch.float32)
            divisor = divisor.index_copy(0, outlier_channels, smooth_scale.float())
            x_2d = x_2d / divisor

        qdata, act_scale = quantize_per_token(x_2d)
        accumulator = int8_matmul(qdata, weight_qdata.t(), matmul)
        y = accumulator.float() * act_scale * weight_scale
        # The bias goes in before the correction term: Inductor then fuses it
        # into the dequantization kernel, and the correction matmul adds onto
        # that kernel's output (an addmm), with no elementwise kernel of its own.
        if bias is not None:
            y = y + bias.float()
        if outlier_channels is not None:
            correction_weight = (smooth_scale.float() - 1.0).unsqueeze(0) * outlier_weight.float()
            y = y + x_2d.index_select(1, outlier_channels) @ correction_weight.t()
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_output):
        with torch.autocast(grad_output.device.type, enabled=False):
            return QuaffLinearFunction._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        weight_qdata, weight_scale = ctx.saved_tensors
        out_features = weight_qdata.shape[0]
        grad_2d = grad_output.reshape(-1, out_features).float()

        grad_input = None
        if ctx.needs_input_grad[0]:
            qdata, grad_scale = quantize_per_token(grad_2d * weight_scale)
            grad_input = int8_matmul(qdata, weight_qdata, ctx.matmul).float() * grad_scale
            grad_input = grad_input.to(ctx.x_dtype).reshape(ctx.x_shape)

        grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(dim=0)

        return grad_input, None, None, grad_bias, None, None, None, None


def quaff_linear(
    x: torch.Tensor,
    weight_qdata: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    matmul: str,
) -> torch.Tensor:
    """Int8 linear of a layer without outlier channels."""
    return QuaffLinearFunction.apply(x, weight_qdata, weight_scale, bias, None, None, None, matmul)


def outlier_hits(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Count, per input channel, the tokens where |x| exceeds `threshold` times the mean |x| of the input."""
    magnitude = x.detach().reshape(-1, x.shape[-1]).float().abs()
    # The mean is summed in float64: Inductor's CPU code sums fp32 over more
    # than 4096 elements another way, and guards on that count, which would
    # recompile the graph when a sequence length crosses it.
    mean = magnitude.sum(dtype=torch.float64) / magnitude.numel()
    return (magnitude > threshold * mean.float()).sum(dim=0)


def smoothed_quaff_linear(
    x: torch.Tensor,
    weight_qdata: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    outlier_channels: torch.Tensor,
    outlier_weight: torch.Tensor,
    outlier_weight_absmax: torch.Tensor,
    smooth_scale: torch.Tensor,
    update: torch.Tensor,
    momentum: float,
    matmul: str,
    threshold: float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int8 linear of a layer with outlier channels.

    Where the 0-dim bool tensor `update` is true, the `smooth_scale` used is
    the momentum update from this batch, else the stored one. Returns the
    output, the `smooth_scale` used (which the caller stores when training),
    and `outlier_hits(x, threshold)` for online calibration and the stability
    monitor.
    """
    moved = updated_smooth_scale(x, outlier_channels, outlier_weight_absmax, smooth_scale, momentum)
    used = torch.where(update, moved, smooth_scale)
    y = QuaffLinearFunction.apply(
        x, weight_qdata, weight_scale, bias, outlier_channels, outlier_weight, used, matmul
    )
    return y, used, outlier_hits(x, threshold)


def run_mha_forward(args, kwargs, out_projection):
    """Run `F.multi_head_attention_forward(*args, **kwargs)` with its output projection replaced.

    `out_projection(x, weight, bias)` is called in place of the
    `linear(x, out_proj_weight, out_proj_bias)` inside; every other linear
    stays the builtin. This runs a copy of the function whose global `linear`
    is swapped, so nothing in torch is patched. The graph rewrite calls it
    only while AOTAutograd traces the graph, never per step.
    """
    import types

    function = torch.nn.functional.multi_head_attention_forward
    bound = inspect.signature(function).bind(*args, **kwargs)
    out_weight = bound.arguments["out_proj_weight"]
    calls = []

    def linear(x, weight, bias=None):
        if weight is out_weight:
            calls.append(weight)
            return out_projection(x, weight, bias)
        return torch._C._nn.linear(x, weight, bias)

    scope = dict(function.__globals__, linear=linear, has_torch_function=lambda *_: False)
    copy = types.FunctionType(function.__code__, scope, function.__name__, function.__defaults__)
    result = copy(*args, **kwargs)
    if len(calls) != 1:
        raise RuntimeError(
            f"multi_head_attention_forward called its output projection {len(calls)} times, not once"
        )
    return result


def quaff_mha_forward(args, kwargs, layer, update, momentum: float, matmul: str, threshold: float):
    """`F.multi_head_attention_forward` with its output projection as the int8 linear.

    `layer` is `(weight_qdata, weight_scale)`, or for a layer with outlier
    slots `(weight_qdata, weight_scale, outlier_slots, outlier_weight,
    outlier_weight_absmax, smooth_scale)`. Returns the attention output and
    weights, then for a smoothed layer the `smooth_scale` used and the hits.
    """
    extra = []

    def out_projection(x, weight, bias):
        if len(layer) == 2:
            return quaff_linear(x, layer[0], layer[1], bias, matmul)
        y, used, hits = smoothed_quaff_linear(x, *layer[:2], bias, *layer[2:], update, momentum, matmul, threshold)
        extra.extend([used, hits])
        return y

    output, weights = run_mha_forward(args, kwargs, out_projection)
    return (output, weights, *extra)
