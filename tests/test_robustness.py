"""Linear forms, dtypes, failure policy and training modes beyond the plain LoRA case."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.utils.checkpoint

from quaff_compile import backend, layer_states
from quaff_compile.numerics import MAX_INNER, int_mm_refusal, quaff_linear, quantize_weight_per_channel
from tests.conftest import TINY_OPTIONS, tiny_llama, tiny_peft_llama

INPUTS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_gpt2():
    """A two-layer GPT-2 without dropout, whose linears are transformers' Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    return GPT2LMHeadModel(config)


def test_gpt2_conv1d_goes_int8_and_checkpoint_is_unchanged():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    expected = model(input_ids=INPUTS, labels=INPUTS)

    compiled = torch.compile(model, backend="quaff")
    output = compiled(input_ids=INPUTS, labels=INPUTS)
    output.loss.backward()

    names = {fqn.removeprefix("base_model.model.transformer.") for fqn in layer_states(model)}
    assert names == {
        f"h.{layer}.{name}" for layer in (0, 1) for name in ("attn.c_attn.base_layer", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    # Conv1D stores its weight as [in, out]; the int8 copy is the [out, in] linear weight.
    c_fc = model.base_model.model.transformer.h[0].mlp.c_fc
    assert layer_states(model)["base_model.model.transformer.h.0.mlp.c_fc"].weight_qdata.shape == c_fc.weight.t().shape
    torch.testing.assert_close(output.loss, expected.loss, rtol=0.01, atol=0.0)
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_conv1d_output_is_the_int8_linear_of_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(48, 64).requires_grad_(False)  # nf=48 outputs, nx=64 inputs
    x = torch.randn(3, 5, 64)
    weight_qdata, weight_scale = quantize_weight_per_channel(layer.weight.t())
    expected = quaff_linear(x, weight_qdata, weight_scale, layer.bias, "emulated")
    compiled = torch.compile(layer, backend="quaff", options={"matmul": "emulated"})
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matmul", ["emulated", "int_mm"])
def test_autocast_gives_eager_dtype_and_keeps_the_int8_product_exact(matmul):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64).requires_grad_(False)
    x = torch.randn(8, 256) * 10
    weight_qdata, weight_scale = quantize_weight_per_channel(layer.weight)
    expected = quaff_linear(x, weight_qdata, weight_scale, layer.bias, "emulated")

    compiled = torch.compile(layer, backend="quaff", options={"matmul": matmul})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = compiled(x)
        eager = layer(x)
    assert output.dtype == eager.dtype == torch.bfloat16
    # The only rounding is the final cast to bf16; computing the fp32 emulation
    # under autocast would add errors of about 0.04 here.
    torch.testing.assert_close(output, expected.to(torch.bfloat16), rtol=0.0, atol=0.0)


def test_autocast_training_of_a_tiny_llama():
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = compiled(input_ids=INPUTS, labels=INPUTS)
        eager = model(input_ids=INPUTS, labels=INPUTS)
    output.loss.backward()
    assert output.logits.dtype == eager.logits.dtype
    torch.testing.assert_close(output.loss, eager.loss, rtol=0.01, atol=0.0)
    grads = [parameter.grad for parameter in model.parameters() if parameter.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    # fp16 overflows on the injected 2000x outliers in eager as well, so it gets none.
    model = tiny_peft_llama(outlier_channels=() if dtype == torch.float16 else (3, 17)).to(dtype)
    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    output = compiled(input_ids=INPUTS, labels=INPUTS)
    eager = model(input_ids=INPUTS, labels=INPUTS)
    assert torch.isfinite(eager.loss)
    output.loss.backward()
    assert len(layer_states(model)) == 14
    assert output.logits.dtype == dtype
    torch.testing.assert_close(output.loss.float(), eager.loss.float(), rtol=0.01, atol=0.0)
    grads = [parameter.grad for parameter in model.parameters() if parameter.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)


def test_fp16_activations_in_the_hundreds_stay_finite():
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64).half().requires_grad_(False)
    x = (torch.randn(4, 128) * 300).half()
    output = torch.compile(layer, backend="quaff")(x)
    reference = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert output.dtype == torch.float16
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_int32_accumulator_limit():
    assert MAX_INNER * 127 * 127 <= 2**31 - 1 < (MAX_INNER + 1) * 127 * 127
    assert int_mm_refusal(in_features=MAX_INNER - MAX_INNER % 8, out_features=64) is None
    assert "overflow" in int_mm_refusal(in_features=MAX_INNER + 8 - MAX_INNER % 8, out_features=64)
    assert "overflow" in int_mm_refusal(in_features=64, out_features=MAX_INNER + 8 - MAX_INNER % 8)


def test_linear_too_wide_for_int32_stays_in_float(caplog):
    in_features = MAX_INNER + 8 - MAX_INNER % 8
    layer = torch.nn.Linear(in_features, 16).requires_grad_(False)
    x = torch.randn(2, in_features)
    with caplog.at_level(logging.DEBUG, logger="quaff_compile.passes.find_linears"):
        output = torch.compile(layer, backend="quaff")(x)
    assert layer_states(layer) == {}
    assert any("overflow" in record.getMessage() for record in caplog.records)
    torch.testing.assert_close(output, layer(x))


def _break_rewrite(monkeypatch):
    def failing_rewrite(*args, **kwargs):
        raise RuntimeError("rewrite exploded")

    monkeypatch.setattr(backend, "rewrite_linears", failing_rewrite)
    monkeypatch.setattr(backend, "_FALLBACK_WARNED", set())


def test_failing_pass_falls_back_to_float_and_warns_once(monkeypatch):
    _break_rewrite(monkeypatch)
    layers = [torch.nn.Linear(64, 32).requires_grad_(False) for _ in range(2)]
    x = torch.randn(4, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [torch.compile(layer, backend="quaff")(x) for layer in layers]
    messages = [str(warning.message) for warning in caught if "rewrite exploded" in str(warning.message)]
    assert len(messages) == 1, messages
    assert "strict" in messages[0]
    for layer, output in zip(layers, outputs):
        torch.testing.assert_close(output, layer(x))
        assert layer_states(layer) == {}


def test_strict_raises_when_the_pass_fails(monkeypatch):
    _break_rewrite(monkeypatch)
    layer = torch.nn.Linear(64, 32).requires_grad_(False)
    compiled = torch.compile(layer, backend="quaff", options={"strict": True})
    with pytest.raises(Exception, match="rewrite exploded"):
        compiled(torch.randn(4, 64))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recompute_does_not_move_momentum_twice(use_reentrant):
    """An eager checkpoint around a compiled block runs the block again in backward.

    Reentrant checkpointing runs the first forward under no_grad, so the
    recompute is the one that moves the state. Non-reentrant checkpointing
    moves it in the first forward; early stop is off so that its recompute
    runs the whole block, state update included.
    """
    model = tiny_peft_llama()
    layer = model.base_model.model.model.layers[0]
    compiled = torch.compile(layer.mlp, backend="quaff", options=TINY_OPTIONS)
    hidden = torch.randn(2, 8, 64, requires_grad=True) * torch.tensor([1.0] * 3 + [300.0] + [1.0] * 60)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        output = torch.utils.checkpoint.checkpoint(compiled, hidden, use_reentrant=use_reentrant)
        output.sum().backward()
    states = layer_states(model)
    assert states, "the MLP's linears should be int8"
    assert {state.updates for state in states.values() if state.num_outliers} == {1}
