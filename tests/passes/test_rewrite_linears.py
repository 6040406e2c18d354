"""Graph-structure tests of the rewrite pass: exact node counts and idempotence."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st

from quaff_compile import numerics
from quaff_compile.config import QuaffConfig
from quaff_compile.passes.find_linears import LINEAR_TARGETS, ParameterResolver, find_linears
from quaff_compile.passes.rewrite_linears import UPDATE_FLAG_NAME, rewrite_linears


class Stack(torch.nn.Module):
    """Frozen linears of chosen widths with a trainable head."""

    def __init__(self, widths):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(width_in, width_out) for width_in, width_out in zip(widths, widths[1:])
        )
        self.layers.requires_grad_(False)
        self.head = torch.nn.Linear(widths[-1], 8)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def capture(model, x):
    """Return Dynamo's graph of `model` on x and its example inputs."""
    captured = {}

    def backend(gm, example_inputs, **kwargs):
        captured["gm"] = gm
        captured["inputs"] = example_inputs
        return gm.forward

    torch.compile(model, backend=backend)(x)
    return captured["gm"], captured["inputs"]


def run_pass(gm, example_inputs, config):
    """Find and rewrite gm's linears in place; return the number rewritten."""
    matches = [match for match in find_linears(gm, example_inputs, config, ParameterResolver()) if match.quantize]
    rewrite_linears(gm, [(match, True) for match in matches], momentum=config.momentum, matmul="emulated")
    return len(matches)


def count_calls(gm, targets):
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target in targets)


def test_rewrite_counts():
    gm, example_inputs = capture(Stack([32, 64, 48]), torch.randn(4, 32))
    placeholders_before = len(gm.graph.find_nodes(op="placeholder"))

    assert run_pass(gm, example_inputs, QuaffConfig()) == 2

    assert count_calls(gm, LINEAR_TARGETS) == 1  # the trainable head
    assert count_calls(gm, (numerics.smoothed_quaff_linear,)) == 2
    # Six state inputs per smoothed linear, then one update flag.
    assert len(gm.graph.find_nodes(op="placeholder")) == placeholders_before + 2 * 6 + 1
    assert gm.graph.find_nodes(op="placeholder")[-1].name == UPDATE_FLAG_NAME
    # The model's output, then per smoothed linear its smooth_scale and its outlier hits.
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    assert len(outputs) == 1 + 2 + 2


@given(st.lists(st.integers(2, 8).map(lambda n: 8 * n), min_size=2, max_size=4))
def test_second_pass_changes_nothing_property(widths):
    torch._dynamo.reset()
    gm, example_inputs = capture(Stack(widths), torch.randn(3, widths[0]))
    run_pass(gm, example_inputs, QuaffConfig())
    once = gm.code

    assert run_pass(gm, example_inputs, QuaffConfig()) == 0
    assert gm.code == once


@given(st.lists(st.integers(2, 8).map(lambda n: 8 * n), min_size=2, max_size=4))
def test_ineligible_graph_unchanged_property(widths):
    torch._dynamo.reset()
    model = Stack(widths)
    model.requires_grad_(True)
    gm, example_inputs = capture(model, torch.randn(3, widths[0]))
    before = copy.deepcopy(gm.graph)

    assert run_pass(gm, example_inputs, QuaffConfig()) == 0
    assert str(gm.graph) == str(before)
