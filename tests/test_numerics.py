"""Emulation tests of the int8 linear against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from quaff_compile.numerics import (
    QUANT_MAX,
    QUANT_MIN,
    int8_matmul,
    int_mm_refusal,
    quantize_per_token,
    quantize_weight_per_channel,
    smoothed_quaff_linear,
    quaff_linear,
    updated_smooth_scale,
)

MATMULS = ["int_mm", "emulated"]


def outlier_input(rows=48, in_features=96, channels=(5, 40), gain=300.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    x[:, list(channels)] *= gain
    return x


def layer_tensors(weight, channels):
    weight_qdata, weight_scale = quantize_weight_per_channel(weight)
    index = torch.tensor(channels, dtype=torch.long)
    outlier_weight = weight[:, index]
    return weight_qdata, weight_scale, index, outlier_weight, outlier_weight.abs().amax(dim=0)


def forward_error_bound(x_hat, act_scale, weight, weight_scale):
    """Bound on |dequant(int8(x_hat) @ int8(W)^T) - x_hat @ W^T| per element.

    With x_hat = a*q + e_x (|e_x| <= a/2) and W = w*Wq + e_w (|e_w| <= w/2):
    |err[m, n]| <= w_n/2 * (sum_k |x_hat[m, k]| + K*a_m/2) + a_m/2 * sum_k |W[n, k]|.
    """
    in_features = x_hat.shape[1]
    x_term = (x_hat.abs().sum(dim=1, keepdim=True) + in_features * act_scale / 2) * (weight_scale / 2)
    w_term = (act_scale / 2) * weight.abs().sum(dim=1)
    return x_term + w_term


def test_per_token_range_and_zero_rows():
    x = torch.randn(6, 32) * 10
    x[2] = 0
    qdata, act_scale = quantize_per_token(x)
    assert qdata.dtype == torch.int8
    assert int(qdata.min()) >= QUANT_MIN
    assert int(qdata.max()) <= QUANT_MAX
    assert act_scale.dtype == torch.float32
    assert float(act_scale[2]) == 0.0
    assert torch.count_nonzero(qdata[2]) == 0
    assert torch.isfinite(act_scale).all()


def test_per_token_round_trip_half_step():
    x = torch.randn(16, 64, dtype=torch.float64) * 3
    qdata, act_scale = quantize_per_token(x)
    error = (qdata.double() * act_scale.double() - x).abs()
    assert (error <= act_scale.double() / 2 + 1e-6).all()


def test_bf16_scales_stay_fp32():
    x = (torch.randn(8, 32) * 200).to(torch.bfloat16)
    _, act_scale = quantize_per_token(x)
    assert act_scale.dtype == torch.float32


@pytest.mark.parametrize("inner", [16, 1024, 1536, 2056])
def test_emulated_matmul_equals_int_mm(inner):
    generator = torch.Generator().manual_seed(inner)
    a = torch.randint(-127, 128, (24, inner), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (inner, 32), dtype=torch.int8, generator=generator)
    exact = (a.long() @ b.long()).int()
    assert torch.equal(int8_matmul(a, b, "int_mm"), exact)
    assert torch.equal(int8_matmul(a, b, "emulated"), exact)


def test_int8_matmul_saturated_values_exact():
    a = torch.full((4, 2048), 127, dtype=torch.int8)
    b = torch.full((2048, 8), -127, dtype=torch.int8)
    expected = torch.full((4, 8), -127 * 127 * 2048, dtype=torch.int32)
    assert torch.equal(int8_matmul(a, b, "emulated"), expected)
    assert torch.equal(int8_matmul(a, b, "int_mm"), expected)


@pytest.mark.parametrize(
    "in_features, out_features, refused",
    [(64, 64, False), (8, 64, True), (20, 64, True), (64, 20, True), (64, 8, True), (16, 16, False)],
)
def test_int_mm_refusal(in_features, out_features, refused):
    assert (int_mm_refusal(in_features, out_features) is not None) == refused


@pytest.mark.parametrize("matmul", MATMULS)
def test_linear_without_outliers_within_bound(matmul):
    torch.manual_seed(0)
    x = torch.randn(40, 96)
    weight = torch.randn(64, 96) * 0.05
    bias = torch.randn(64)
    weight_qdata, weight_scale = quantize_weight_per_channel(weight)

    y = quaff_linear(x, weight_qdata, weight_scale, bias, matmul)
    reference = x.double() @ weight.double().T + bias.double()

    _, act_scale = quantize_per_token(x)
    bound = forward_error_bound(x.double(), act_scale.double(), weight.double(), weight_scale.double())
    assert ((y.double() - reference).abs() <= bound + 1e-4).all()


@pytest.mark.parametrize("matmul", MATMULS)
def test_smoothed_linear_forward_within_bound(matmul):
    channels = [5, 40]
    x = outlier_input(channels=channels)
    torch.manual_seed(1)
    weight = torch.randn(64, 96) * 0.05
    tensors = layer_tensors(weight, channels)
    smooth_scale = torch.ones(2)
    update = torch.tensor(True)

    y, used, _ = smoothed_quaff_linear(x, *tensors[:2], None, *tensors[2:], smooth_scale, update, 0.9, matmul)
    reference = x.double() @ weight.double().T

    assert (used > 1).all()
    divisor = torch.ones(96, dtype=torch.float64)
    divisor[channels] = used.double()
    x_hat = x.double() / divisor
    _, act_scale = quantize_per_token(x_hat)
    bound = forward_error_bound(x_hat, act_scale.double(), weight.double(), tensors[1].double())
    # The correction term is float: its rounding is far below the int8 bound.
    assert ((y.double() - reference).abs() <= bound + 1e-3).all()


def test_smoothing_reduces_error_on_outlier_channels():
    channels = [5, 40]
    x = outlier_input(channels=channels, gain=1000.0)
    torch.manual_seed(2)
    weight = torch.randn(64, 96) * 0.05
    tensors = layer_tensors(weight, channels)
    reference = x.double() @ weight.double().T

    plain = quaff_linear(x, *tensors[:2], None, "emulated")
    smoothed, _, _ = smoothed_quaff_linear(
        x, *tensors[:2], None, *tensors[2:], torch.ones(2), torch.tensor(True), 1.0, "emulated"
    )

    plain_error = (plain.double() - reference).pow(2).mean()
    smoothed_error = (smoothed.double() - reference).pow(2).mean()
    print(f"mean squared error: plain {plain_error:.4g}, smoothed {smoothed_error:.4g}")
    assert smoothed_error < plain_error / 4


def test_correction_term_is_exact_in_float64():
    """With int8 rounding taken out, the smoothed decomposition reproduces X W^T."""
    channels = [5, 40]
    x = outlier_input(channels=channels).double()
    weight = torch.randn(64, 96, dtype=torch.float64)
    s = torch.tensor([3.5, 17.0], dtype=torch.float64)
    divisor = torch.ones(96, dtype=torch.float64)
    divisor[channels] = s
    x_hat = x / divisor
    decomposed = x_hat @ weight.T + x_hat[:, channels] @ ((s - 1) * weight[:, channels]).T
    torch.testing.assert_close(decomposed, x @ weight.T, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("matmul", MATMULS)
def test_grad_input_within_bound(matmul):
    channels = [5, 40]
    x = outlier_input(channels=channels).requires_grad_(True)
    torch.manual_seed(3)
    weight = torch.randn(64, 96) * 0.05
    tensors = layer_tensors(weight, channels)
    grad_output = torch.randn(48, 64)

    y, _, _ = smoothed_quaff_linear(x, *tensors[:2], None, *tensors[2:], torch.ones(2), torch.tensor(True), 0.9, matmul)
    y.backward(grad_output)
    reference = grad_output.double() @ weight.double()

    weight_qdata, weight_scale = tensors[:2]
    scaled = grad_output.double() * weight_scale.double()
    _, grad_scale = quantize_per_token(scaled)
    # grad = sum_n g'[m,n] Wq[n,k] + sum_n g[m,n] e_w[n,k], with g' quantized per token.
    bound = (grad_scale.double() / 2) @ weight_qdata.double().abs().sum(dim=0, keepdim=True)
    bound = bound + grad_output.double().abs() @ (weight_scale.double()[:, None] / 2).expand(64, 96)
    assert x.grad is not None
    assert ((x.grad.double() - reference).abs() <= bound + 1e-4).all()


def test_bias_gradient_when_trainable():
    x = torch.randn(8, 32, requires_grad=True)
    weight = torch.randn(16, 32)
    bias = torch.zeros(16, requires_grad=True)
    weight_qdata, weight_scale = quantize_weight_per_channel(weight)
    quaff_linear(x, weight_qdata, weight_scale, bias, "emulated").sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((16,), 8.0))


def test_smooth_scale_update_rule():
    channels = torch.tensor([1])
    x = torch.zeros(4, 8)
    x[2, 1] = 400.0
    weight_absmax = torch.tensor([4.0])
    old = torch.tensor([2.0])
    moved = updated_smooth_scale(x, channels, weight_absmax, old, momentum=0.9)
    # s_new = sqrt(400 / 4) = 10; 0.9 * 10 + 0.1 * 2 = 9.2
    torch.testing.assert_close(moved, torch.tensor([9.2]))


def test_smooth_scale_stays_at_least_one_and_finite():
    channels = torch.tensor([0, 1])
    x = torch.full((4, 8), 1e-3)
    x[0, 1] = float("nan")
    moved = updated_smooth_scale(x, channels, torch.tensor([5.0, 5.0]), torch.tensor([1.0, 3.0]), momentum=0.9)
    assert moved[0] == 1.0
    # The NaN channel keeps its old value instead of poisoning the state.
    torch.testing.assert_close(moved[1], torch.tensor(3.0))


def test_zero_rows_give_bias_only_output():
    x = torch.zeros(4, 32)
    x[1] = torch.randn(32)
    weight = torch.randn(16, 32)
    bias = torch.randn(16)
    weight_qdata, weight_scale = quantize_weight_per_channel(weight)
    y = quaff_linear(x, weight_qdata, weight_scale, bias, "emulated")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], bias)
    torch.testing.assert_close(y[3], bias)
