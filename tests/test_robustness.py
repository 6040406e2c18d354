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

# A fallback to float would hide a failure of the int8 path behind a passing
# comparison with float. The tests of the fallback record the warning instead.
pytestmark = pytest.mark.filterwarnings("error:quaff. the int8 pass failed:RuntimeWarning")

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


def test_conv1d_uses_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(48, 64).requires_grad_(False)  # nf=48 outputs, nx=64 inputs
    x = torch.randn(3, 5, 64)
    weight_qdata, weight_scale = quantize_weight_per_channel(layer.weight.t())
    expected = quaff_linear(x, weight_qdata, weight_scale, layer.bias, "emulated")
    compiled = torch.compile(layer, backend="quaff", options={"matmul": "emulated"})
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matmul", ["emulated", "int_mm"])
def test_autocast_dtype_and_exact_product(matmul):
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


def test_failing_pass_falls_back_once(monkeypatch):
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


def _train_with_checkpointing(checkpointing: str | None, scope: str, steps: int = 3):
    """Train a tiny LoRA Llama, compiled whole or per decoder layer, with or without HF gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    from quaff_compile.finetune import compile_model

    torch._dynamo.reset()
    model = tiny_llama()
    model.config.use_cache = False
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    compiled = compile_model(model, "quaff", TINY_OPTIONS, scope)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    losses = []
    # transformers sets a context variable inside each checkpointed layer; without
    # this Dynamo flag it runs those layers eagerly, in float, for any backend.
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        for _ in range(steps):
            loss = compiled(input_ids=INPUTS, labels=INPUTS).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses, layer_states(model)


@pytest.mark.parametrize("scope", ["full", "regional"])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_matches_a_run_without_it(checkpointing, scope):
    expected_losses, expected_states = _train_with_checkpointing(None, scope)
    losses, states = _train_with_checkpointing(checkpointing, scope)
    # The linears inside Dynamo's checkpoint region are int8 too.
    assert len(states) == len(expected_states) == 14
    # Each training step moves each layer's state exactly once.
    assert {state.updates for state in states.values() if state.num_outliers} == {3}
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=0.0)


def _smoothed_layer(seed: int = 0):
    """A frozen 128-to-64 linear with outlier slots under TINY_OPTIONS, and an input with outliers on channel 5."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(128, 64).requires_grad_(False)
    gain = torch.ones(128)
    gain[5] = 500.0
    return layer, gain


@pytest.mark.parametrize("rows", [0, 1, 16, 17])
@pytest.mark.parametrize("training", [False, True])
def test_row_counts(rows, training):
    layer, gain = _smoothed_layer()
    compiled = torch.compile(layer, backend="quaff", options=TINY_OPTIONS)
    compiled(torch.randn(32, 128) * gain)  # the first batch chooses the outlier channels
    x = (torch.randn(rows, 128) * gain).requires_grad_(training)
    output = compiled(x) if training else compiled(x.detach())
    assert output.shape == (rows, 64)
    torch.testing.assert_close(output, layer(x), rtol=0.02, atol=0.02 * max(1.0, layer(x).abs().max().item() if rows else 1.0))
    if training:
        output.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()
    state = layer_states(layer)[""]
    assert state.num_outliers >= 1
    assert torch.isfinite(state.smooth_scale).all()


@pytest.mark.parametrize(
    "in_features, out_features", [(0, 16), (64, 0), (60, 32), (64, 36), (12, 16)]
)
def test_sizes_int8_cannot_take_stay_in_float(in_features, out_features):
    layer = torch.nn.Linear(in_features, out_features).requires_grad_(False)
    x = torch.randn(3, 5, in_features)
    output = torch.compile(layer, backend="quaff")(x)
    assert layer_states(layer) == {}
    torch.testing.assert_close(output, layer(x))


def test_input_layouts():
    """2-D, 3-D, transposed (non-contiguous) and expanded (stride-0) inputs give the same rows."""
    layer, gain = _smoothed_layer()
    compiled = torch.compile(layer, backend="quaff", options=TINY_OPTIONS)
    base = torch.randn(6, 128) * gain
    compiled(base)  # chooses the outlier channels
    with torch.no_grad():  # no_grad keeps the momentum state still between calls
        check_layouts(compiled, base)


def check_layouts(compiled, base):
    expected = compiled(base)
    torch.testing.assert_close(compiled(base.reshape(2, 3, 128)), expected.reshape(2, 3, 64))
    transposed = base.t().contiguous().t()
    assert not transposed.is_contiguous()
    torch.testing.assert_close(compiled(transposed), expected)
    expanded = base[:1].expand(6, 128)
    assert expanded.stride(0) == 0
    torch.testing.assert_close(compiled(expanded), expected[:1].expand(6, 64))


def test_varying_lengths_do_not_recompile_per_shape(caplog):
    model = tiny_peft_llama()
    model.eval()
    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    with caplog.at_level(logging.INFO, logger="quaff_compile.backend"), torch.no_grad():
        for length in (1, 2, 3, 17, 64, 130, 256, 512):
            for batch in (1, 3):
                inputs = torch.randint(0, 256, (batch, length))
                logits = compiled(input_ids=inputs).logits
                assert logits.shape == (batch, length, 256)
    compiles = sum("quaff: rewrote" in record.getMessage() for record in caplog.records)
    # Dynamo specializes sizes of 1, so batch 1, length 1, both and neither
    # give at most four graphs, as with plain Inductor.
    assert 1 <= compiles <= 4, compiles


def test_nan_and_inf_rows_leave_other_rows_alone():
    layer, gain = _smoothed_layer()
    compiled = torch.compile(layer, backend="quaff", options=TINY_OPTIONS)
    clean = torch.randn(8, 128) * gain
    compiled(clean)
    with torch.no_grad():
        expected = compiled(clean)
        for bad in (float("nan"), float("inf")):
            x = clean.clone()
            x[2, 7] = bad
            output = compiled(x)
            keep = [row for row in range(8) if row != 2]
            torch.testing.assert_close(output[keep], expected[keep], rtol=0.0, atol=0.0)
            assert not torch.isfinite(output[2]).all()
            assert not torch.isfinite(layer(x)[2]).all()  # as in float


def test_nan_batch_keeps_momentum_state():
    layer, gain = _smoothed_layer()
    compiled = torch.compile(layer, backend="quaff", options=TINY_OPTIONS)
    x = (torch.randn(8, 128) * gain).requires_grad_(True)
    compiled(x).sum().backward()
    before = layer_states(layer)[""].smooth_scale.clone()
    bad = (torch.randn(8, 128) * gain).detach()
    bad[3, 5] = float("nan")  # on the outlier channel itself
    compiled(bad.requires_grad_(True)).sum().backward()
    state = layer_states(layer)[""]
    assert torch.isfinite(state.smooth_scale).all()
    torch.testing.assert_close(state.smooth_scale, before)


def test_very_large_values():
    layer, gain = _smoothed_layer()
    compiled = torch.compile(layer, backend="quaff", options=TINY_OPTIONS)
    x = torch.randn(8, 128) * gain * 1e20
    output = compiled(x)
    reference = layer(x)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, reference, rtol=0.02, atol=0.02 * reference.abs().max().item())


def _train_one_step(compiled, model):
    optimizer = torch.optim.SGD([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1.0)
    compiled(input_ids=INPUTS, labels=INPUTS).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_switching_modes_and_disabling_the_adapter():
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    _train_one_step(compiled, model)  # moves LoRA's B away from zero

    model.eval()
    with torch.inference_mode():
        inference = compiled(input_ids=INPUTS).logits
    with torch.no_grad():
        evaluated = compiled(input_ids=INPUTS).logits
        with model.disable_adapter():
            disabled = compiled(input_ids=INPUTS).logits
            disabled_eager = model(input_ids=INPUTS).logits
        eager = model(input_ids=INPUTS).logits
    scale = eager.abs().max().item()
    torch.testing.assert_close(inference, evaluated, rtol=0.0, atol=0.0)
    torch.testing.assert_close(evaluated, eager, rtol=0.05, atol=0.05 * scale)
    torch.testing.assert_close(disabled, disabled_eager, rtol=0.05, atol=0.05 * scale)
    assert (disabled - evaluated).abs().max() > 0.1 * scale  # the adapter really was off

    model.train()
    _train_one_step(compiled, model)
    states = layer_states(model)
    assert {state.updates for state in states.values() if state.num_outliers} == {2}


def test_generate_through_the_compiled_model():
    model = tiny_peft_llama()
    model.get_base_model().config.use_cache = True
    model.eval()
    # generate() calls the transformers model inside PEFT's wrapper, so compile that one in place.
    model.get_base_model().compile(backend="quaff", options=TINY_OPTIONS)
    prompt = INPUTS[:, :8]
    torch._dynamo.utils.counters.clear()
    generated = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    assert generated.sequences.shape == (2, 20)
    states = layer_states(model)
    assert len(states) == 14 and {state.updates for state in states.values()} == {0}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
    # The first step's scores are the prompt's last logits, which eager computes in float.
    first = generated.scores[0]
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        eager = model(input_ids=prompt).logits[:, -1]
    torch.testing.assert_close(first, eager, rtol=0.05, atol=0.05 * eager.abs().max().item())


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_output_projection_goes_int8(need_weights):
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(64, 4, batch_first=True).requires_grad_(False)
    gain = torch.ones(64)
    gain[9] = 300.0
    with torch.no_grad():
        attention.in_proj_weight[128:] *= gain.unsqueeze(1)  # outliers in the values, so in out_proj's input
    x = torch.randn(2, 10, 64, requires_grad=True)
    compiled = torch.compile(attention, backend="quaff", options=TINY_OPTIONS)
    output, weights = compiled(x, x, x, need_weights=need_weights)
    expected, expected_weights = attention(x, x, x, need_weights=need_weights)
    output.sum().backward()

    state = layer_states(attention)["out_proj"]
    assert state.outlier_channels == [9]
    assert state.updates == 1
    torch.testing.assert_close(output, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    if need_weights:
        torch.testing.assert_close(weights, expected_weights)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_linear_tied_to_the_embedding():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {name: value.clone() for name, value in model.state_dict().items()}

    # skip_fqns=() quantizes lm_head too; the embedding lookup of the same weight stays in float.
    compiled = torch.compile(model, backend="quaff", options={**TINY_OPTIONS, "skip_fqns": ()})
    logits = compiled(input_ids=INPUTS).logits
    expected = model(input_ids=INPUTS).logits

    assert "lm_head" in layer_states(model)
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())
