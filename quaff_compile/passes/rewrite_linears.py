"""Replace the chosen linear nodes by the Quaff int8 linear.

Each quantized linear `linear(x, w, b)` becomes a call to
`numerics.quaff_linear` (no outlier channels) or
`numerics.smoothed_quaff_linear` (with them). The layer's int8 weight,
`weight_scale` and outlier tensors live in its `LayerState`, outside the
graph, and enter it as new placeholders appended after the existing ones;
the runtime wrapper passes them on every call. A layer with outlier channels
also returns the `smooth_scale` it used as an extra graph output, which the
wrapper stores after a training forward. Keeping the state out of the graph
lets it survive recompiles and keeps the state update out of any
recomputation that AOTAutograd or activation checkpointing may do.

The original weight placeholder stays, so the graph's signature, as Dynamo
calls it, is unchanged apart from the appended inputs.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from quaff_compile import numerics
from quaff_compile.passes.find_linears import LinearMatch
from quaff_compile.state import LayerState

log = logging.getLogger(__name__)

UPDATE_FLAG_NAME = "quaff_update_smooth_scale"


@dataclass
class RewriteResult:
    """What the runtime wrapper needs to call a rewritten graph."""

    extra_inputs: list[torch.Tensor] = field(default_factory=list)
    has_update_flag: bool = False
    # States whose `smooth_scale` comes back as extra outputs, in output order.
    smoothed_states: list[LayerState] = field(default_factory=list)
    # False where the graph returned one value, which the wrapper unpacks again.
    output_is_sequence: bool = True
    rewritten: int = 0


def _add_placeholder(graph: fx.Graph, after: fx.Node | None, name: str) -> fx.Node:
    if after is None:
        with graph.inserting_before(next(iter(graph.nodes), None)):
            return graph.placeholder(name)
    with graph.inserting_after(after):
        return graph.placeholder(name)


def rewrite_linears(
    gm: fx.GraphModule,
    matches: list[tuple[LinearMatch, LayerState]],
    momentum: float,
    matmul: str,
) -> RewriteResult:
    """Rewrite `gm` in place; `matches` pairs each linear to quantize with its state."""
    graph = gm.graph
    result = RewriteResult()
    if not matches:
        return result

    # 1. New placeholders for the state tensors, after the existing ones.
    last_placeholder = None
    for node in graph.find_nodes(op="placeholder"):
        last_placeholder = node

    def add_input(name: str, tensor: torch.Tensor) -> fx.Node:
        nonlocal last_placeholder
        last_placeholder = _add_placeholder(graph, last_placeholder, name)
        result.extra_inputs.append(tensor)
        return last_placeholder

    layer_inputs = []
    for index, (match, state) in enumerate(matches):
        prefix = f"quaff_{index}"
        inputs = {
            "weight_qdata": add_input(f"{prefix}_weight_qdata", state.weight_qdata),
            "weight_scale": add_input(f"{prefix}_weight_scale", state.weight_scale),
        }
        if state.has_outliers:
            inputs["outlier_channels"] = add_input(f"{prefix}_outlier_channels", state.outlier_channels)
            inputs["outlier_weight"] = add_input(f"{prefix}_outlier_weight", state.outlier_weight)
            inputs["outlier_weight_absmax"] = add_input(
                f"{prefix}_outlier_weight_absmax", state.outlier_weight_absmax
            )
            inputs["smooth_scale"] = add_input(f"{prefix}_smooth_scale", state.smooth_scale)
        layer_inputs.append(inputs)

    update_flag = None
    if any(state.has_outliers for _, state in matches):
        last_placeholder = _add_placeholder(graph, last_placeholder, UPDATE_FLAG_NAME)
        update_flag = last_placeholder
        result.has_update_flag = True

    # 2. Replace each linear by the int8 linear.
    smooth_scale_outputs = []
    for (match, state), inputs in zip(matches, layer_inputs):
        node = match.node
        with graph.inserting_before(node):
            if state.has_outliers:
                call = graph.call_function(
                    numerics.smoothed_quaff_linear,
                    (
                        match.input,
                        inputs["weight_qdata"],
                        inputs["weight_scale"],
                        match.bias,
                        inputs["outlier_channels"],
                        inputs["outlier_weight"],
                        inputs["outlier_weight_absmax"],
                        inputs["smooth_scale"],
                        update_flag,
                        momentum,
                        matmul,
                    ),
                )
                output = graph.call_function(operator.getitem, (call, 0))
                smooth_scale_outputs.append(graph.call_function(operator.getitem, (call, 1)))
                result.smoothed_states.append(state)
            else:
                output = graph.call_function(
                    numerics.quaff_linear,
                    (match.input, inputs["weight_qdata"], inputs["weight_scale"], match.bias, matmul),
                )
        output.meta.update({key: value for key, value in node.meta.items() if key in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        result.rewritten += 1

    # 3. Return the smooth scales used after the graph's own outputs.
    if smooth_scale_outputs:
        output_node = graph.find_nodes(op="output")[0]
        outputs = output_node.args[0]
        if isinstance(outputs, (tuple, list)):
            new_outputs = type(outputs)([*outputs, *smooth_scale_outputs])
        else:
            new_outputs = (outputs, *smooth_scale_outputs)
            result.output_is_sequence = False
        output_node.args = (new_outputs,)

    graph.lint()
    gm.recompile()
    return result
