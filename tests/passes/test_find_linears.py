"""Graph-structure tests of which linears the backend finds and quantizes."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from quaff_compile.config import QuaffConfig
from quaff_compile.passes.find_linears import ParameterResolver, _fqn_from_source, find_linears


class LinearSubclass(nn.Linear):
    pass


class Forms(nn.Module):
    """One of each linear form, plus a trainable linear and an lm_head."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(32, 32)
        self.no_bias = nn.Linear(32, 32, bias=False)
        self.subclass = LinearSubclass(32, 32)
        self.functional_weight = nn.Parameter(torch.randn(32, 32), requires_grad=False)
        self.trainable = nn.Linear(32, 32)
        self.small = nn.Linear(32, 12)
        self.lm_head = nn.Linear(32, 32)
        for name, module in self.named_children():
            if name != "trainable":
                module.requires_grad_(False)

    def forward(self, x):
        x = self.plain(x)
        x = self.no_bias(x)
        x = self.subclass(x)
        x = F.linear(x, self.functional_weight)
        x = self.trainable(x)
        return self.lm_head(x) + self.small(x).sum()


def capture(model, *inputs):
    """Return the matches find_linears makes on the graph Dynamo captures."""
    found = {}

    def backend(gm, example_inputs, **kwargs):
        found["matches"] = find_linears(gm, example_inputs, QuaffConfig(), ParameterResolver())
        return gm.forward

    torch.compile(model, backend=backend)(*inputs)
    return {match.fqn: match for match in found["matches"]}


def test_every_linear_form_is_found():
    matches = capture(Forms(), torch.randn(4, 32))
    assert set(matches) == {"plain", "no_bias", "subclass", "functional_weight", "trainable", "small", "lm_head"}
    quantized = sorted(fqn for fqn, match in matches.items() if match.quantize)
    assert quantized == ["functional_weight", "no_bias", "plain", "subclass"]


def test_bias_is_kept_on_the_match():
    matches = capture(Forms(), torch.randn(4, 32))
    assert matches["plain"].bias is not None
    assert matches["no_bias"].bias is None


def test_reasons_for_float_fallback(caplog):
    with caplog.at_level(logging.DEBUG, logger="quaff_compile.passes.find_linears"):
        matches = capture(Forms(), torch.randn(4, 32))
    assert "trainable" in matches["trainable"].reason
    assert "skip_fqns" in matches["lm_head"].reason
    assert "out_features=12" in matches["small"].reason
    assert any("small" in record.getMessage() and "out_features=12" in record.getMessage() for record in caplog.records)


def test_fqns_through_peft_wrapping():
    from tests.conftest import tiny_peft_llama

    model = tiny_peft_llama()
    inputs = torch.randint(0, 256, (2, 16))
    matches = capture(model, inputs)
    quantized = [fqn for fqn, match in matches.items() if match.quantize]
    assert len(quantized) == 14
    assert "base_model.model.model.layers.1.mlp.down_proj.base_layer" in quantized
    assert not matches["base_model.model.lm_head"].quantize
    lora = [fqn for fqn in matches if "lora_" in fqn]
    assert len(lora) == 28
    assert not any(matches[fqn].quantize for fqn in lora)


def test_fqn_from_source_name():
    source = "L['self'].__dict__['_modules']['model']._modules['layers']._modules['0'].mlp._parameters['weight']"
    assert _fqn_from_source(source) == "model.layers.0.mlp"
