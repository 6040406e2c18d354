"""Property tests (hypothesis) of the int8 linear's numerics and of the rewrite pass.

The "ci" profile registered in conftest.py runs 200 examples per property.
Strategies keep data legal: shape caps, scales away from zero, and injected
outlier channels.
"""

from __future__ import annotations

import math
from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st

from quaff_compile import numerics
from quaff_compile.numerics import (
    QUANT_MAX,
    QUANT_MIN,
    int8_matmul,
    quantize_per_token,
    quantize_weight_per_channel,
    quaff_linear,
    smoothed_quaff_linear,
    updated_smooth_scale,
)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
multiples_of_8 = st.integers(min_value=2, max_value=12).map(lambda n: 8 * n)


@st.composite
def outlier_layers(draw):
    """Draw an activation with injected outlier channels, a weight and a smooth_scale >= 1."""
    rows = draw(st.integers(min_value=1, max_value=24))
    in_features = draw(multiples_of_8)
    out_features = draw(multiples_of_8)
    generator = torch.Generator().manual_seed(draw(seeds))
    count = draw(st.integers(min_value=1, max_value=3))
    channels = sorted(draw(st.sets(st.integers(0, in_features - 1), min_size=count, max_size=count)))
    gain = draw(st.floats(min_value=1.0, max_value=1e4))
    x = torch.randn(rows, in_features, generator=generator, dtype=torch.float64)
    x[:, channels] *= gain
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64) * 0.05
    smooth_scale = torch.tensor(draw(st.lists(st.floats(1.0, 1e3), min_size=count, max_size=count)), dtype=torch.float64)
    return x, weight, channels, smooth_scale


def smoothed_input(x, channels, smooth_scale):
    divisor = torch.ones(x.shape[1], dtype=x.dtype)
    divisor[channels] = smooth_scale.to(x.dtype)
    return x / divisor


def forward_bound(x_hat, weight):
    """Bound on the int8 product's error, from the activation and weight scales.

    With x_hat = a*q + e_x (|e_x| <= a/2 per row) and W = w*Wq + e_w
    (|e_w| <= w/2 per output channel), each output element's error is at most
    w_n/2 * (sum_k |x_hat[m, k]| + K*a_m/2) + a_m/2 * sum_k |W[n, k]|.
    """
    _, act_scale = quantize_per_token(x_hat)
    _, weight_scale = quantize_weight_per_channel(weight)
    act_scale = act_scale.double()
    weight_scale = weight_scale.double()
    in_features = x_hat.shape[1]
    x_term = (x_hat.abs().sum(dim=1, keepdim=True) + in_features * act_scale / 2) * (weight_scale / 2)
    return x_term + (act_scale / 2) * weight.abs().sum(dim=1)


@given(seeds, st.integers(1, 32), st.integers(1, 96), st.floats(1e-3, 1e4))
def test_per_token_round_trip_property(seed, rows, columns, magnitude):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator, dtype=torch.float64) * magnitude
    qdata, act_scale = quantize_per_token(x)
    assert int(qdata.min()) >= QUANT_MIN
    assert int(qdata.max()) <= QUANT_MAX
    # Half a step, plus the fp32 rounding of x and of the scale.
    error = (qdata.double() * act_scale.double() - x).abs()
    tolerance = act_scale.double() / 2 + 1e-6 * x.abs().amax(dim=1, keepdim=True)
    assert (error <= tolerance).all()


@given(seeds, st.integers(1, 16), multiples_of_8, st.lists(st.integers(0, 15), min_size=1, max_size=4))
def test_zero_rows_property(seed, rows, in_features, zero_rows):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    zero_rows = sorted({row % rows for row in zero_rows})
    x[zero_rows] = 0
    weight = torch.randn(24, in_features, generator=generator)
    bias = torch.randn(24, generator=generator)
    qdata, act_scale = quantize_per_token(x)
    assert torch.count_nonzero(qdata[zero_rows]) == 0
    assert (act_scale[zero_rows] == 0).all()

    weight_qdata, weight_scale = quantize_weight_per_channel(weight)
    y = quaff_linear(x, weight_qdata, weight_scale, bias, "emulated")
    assert not torch.isnan(y).any()
    assert torch.equal(y[zero_rows], bias.expand(len(zero_rows), -1))


@st.composite
def int8_operands(draw):
    """Draw int8 operands of _int_mm in one of several memory layouts."""
    rows = draw(st.integers(17, 40))
    inner = draw(multiples_of_8)
    columns = draw(multiples_of_8)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    generator = torch.Generator().manual_seed(draw(seeds))

    def rand(*shape):
        return torch.randint(QUANT_MIN, QUANT_MAX + 1, shape, dtype=torch.int8, generator=generator)

    if layout == "contiguous":
        return layout, rand(rows, inner), rand(inner, columns)
    if layout == "transposed":
        return layout, rand(inner, rows).t(), rand(columns, inner).t()
    if layout == "sliced":
        return layout, rand(rows + 5, inner + 8)[3:3 + rows, 8:], rand(inner + 3, columns * 2)[1:1 + inner, ::2]
    return layout, rand(1, inner).expand(rows, inner), rand(inner, 1).expand(inner, columns)


@given(int8_operands(), st.sampled_from(["int_mm", "emulated"]))
def test_int_mm_exact_property(operands, matmul):
    layout, a, b = operands
    exact = (a.long() @ b.long()).int()
    assert torch.equal(int8_matmul(a, b, matmul), exact), layout
    if matmul == "int_mm" and layout != "expanded":
        # torch's own kernel too, except on expanded operands, which its CPU
        # kernel gets wrong on CPUs with AVX512-VNNI or AMX (int8_matmul copies them).
        assert torch.equal(torch._int_mm(a, b), exact), layout


def identity_quantize(x):
    return x.float(), torch.ones(x.shape[0], 1)


def float_matmul(a, b, matmul):
    return a.double() @ b.double()


@given(outlier_layers())
def test_decomposition_exact_property(layer):
    """With quantization replaced by the identity, the rewritten linear is X W^T.

    The weight "quantization" keeps W with weight_scale 1, so what remains is
    the code's division by s and its correction term, in fp32 arithmetic.
    """
    x64, weight64, channels, smooth_scale = layer
    x, weight = x64.float(), weight64.float()
    index = torch.tensor(channels)
    with mock.patch.object(numerics, "quantize_per_token", identity_quantize), mock.patch.object(
        numerics, "int8_matmul", float_matmul
    ):
        y, _, _ = smoothed_quaff_linear(
            x, weight, torch.ones(weight.shape[0]), None, index, weight[:, index],
            weight[:, index].abs().amax(dim=0), smooth_scale.float(), torch.tensor(False), 0.9, "emulated",
        )
    reference = x.double() @ weight.double().T
    # fp32 rounding only: relative to the sum of absolute products.
    tolerance = 1e-5 * (x.double().abs() @ weight.double().abs().T) + 1e-30
    assert ((y.double() - reference).abs() <= tolerance).all()


@given(outlier_layers())
def test_smoothing_never_raises_act_scale_property(layer):
    x, _, channels, smooth_scale = layer
    _, plain_scale = quantize_per_token(x)
    _, smoothed_scale = quantize_per_token(smoothed_input(x, channels, smooth_scale))
    assert (smoothed_scale <= plain_scale).all()


@given(outlier_layers(), st.sampled_from(["int_mm", "emulated"]))
def test_int8_linear_error_bound_property(layer, matmul):
    """Forward and grad_input stay within the int8 bound of the scales.

    Forward: see `forward_bound`, applied to x_hat = X / s; the float
    correction adds only fp32 rounding. grad_input: with g' = grad * w
    quantized per token (scale b_m) and W = w*Wq + e_w, the error is at most
    b_m/2 * sum_n |Wq[n, k]| + sum_n |grad[m, n]| * w_n/2.
    """
    x64, weight64, channels, smooth_scale = layer
    x = x64.float().requires_grad_(True)
    weight = weight64.float()
    weight_qdata, weight_scale = quantize_weight_per_channel(weight)
    index = torch.tensor(channels)
    outlier_weight = weight[:, index]
    y, used, _ = smoothed_quaff_linear(
        x, weight_qdata, weight_scale, None, index, outlier_weight, outlier_weight.abs().amax(dim=0).clamp_min(1e-12),
        smooth_scale.float(), torch.tensor(False), 0.9, matmul,
    )
    x_hat = smoothed_input(x.detach().double(), channels, used.double())
    reference = x.detach().double() @ weight.double().T
    rounding = 1e-5 * (x.detach().double().abs() @ weight.double().abs().T)
    assert ((y.double() - reference).abs() <= forward_bound(x_hat, weight.double()) + rounding).all()

    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    scaled = grad_output.double() * weight_scale.double()
    _, grad_scale = quantize_per_token(scaled)
    bound = (grad_scale.double() / 2) * weight_qdata.double().abs().sum(dim=0)
    bound = bound + grad_output.double().abs() @ (weight_scale.double()[:, None] / 2).expand_as(weight)
    grad_reference = grad_output.double() @ weight.double()
    grad_rounding = 1e-5 * (grad_output.double().abs() @ weight.double().abs())
    assert ((x.grad.double() - grad_reference).abs() <= bound + grad_rounding).all()


@given(
    seeds,
    st.floats(0.01, 1.0),
    st.lists(st.floats(1.0, 1e3), min_size=1, max_size=4),
    st.floats(0.0, 1e6),
)
def test_momentum_keeps_scale_at_least_one_property(seed, momentum, old, magnitude):
    count = len(old)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 32, generator=generator) * magnitude
    channels = torch.arange(count)
    weight_absmax = torch.rand(count, generator=generator) + 1e-3
    moved = updated_smooth_scale(x, channels, weight_absmax, torch.tensor(old), momentum)
    assert (moved >= 1).all()
    assert torch.isfinite(moved).all()


@given(seeds, st.floats(0.01, 1.0), st.floats(0.0, 1e6))
def test_padding_slots_stay_at_one_property(seed, momentum, magnitude):
    """Unused outlier slots have an infinite weight maximum, which pins s to 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 32, generator=generator) * magnitude
    channels = torch.zeros(3, dtype=torch.long)
    moved = updated_smooth_scale(x, channels, torch.full((3,), math.inf), torch.ones(3), momentum)
    assert torch.equal(moved, torch.ones(3))
