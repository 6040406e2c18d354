"""Replace the chosen linear nodes by the Quaff int8 linear.

Each quantized linear `linear(x, w, b)` becomes a call to
`numerics.quaff_linear` (no outlier slots) or
`numerics.smoothed_quaff_linear` (with them). The layer's int8 weight,
`weight_scale` and outlier tensors live in its `LayerState`, outside the
graph, and enter it as new placeholders appended after the existing ones.
The runtime wrapper looks the state up by the weight it is called with, so
one compiled graph serves every layer and model instance of the same shapes
(Dynamo reuses graphs across them, since parameters are graph inputs). A layer with outlier slots
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

log = logging.getLogger(__name__)

UPDATE_FLAG_NAME = "quaff_update_smooth_scale"


@dataclass
class RewrittenLinear:
    """One rewritten linear: where its weight comes from and which inputs it takes."""

    match: LinearMatch
    smoothed: bool  # True where the layer has outlier slots


@dataclass
class RewriteResult:
    """Inputs and outputs of a rewritten graph, for the runtime wrapper.

    The graph takes, after its original inputs and for each entry of
    `linears` in order, `weight_qdata` and `weight_scale`, then for a smoothed
    linear `outlier_slots`, `outlier_weight`, `outlier_weight_absmax` and
    `smooth_scale`, and last the update flag if any linear is smoothed. It
    returns its original outputs, then the `smooth_scale` used by each
    smoothed linear, then each smoothed linear's outlier hits per channel.
    """

    linears: list[RewrittenLinear] = field(default_factory=list)
    has_update_flag: bool = False
    # False where the graph returned one value, which the wrapper unpacks again.
    output_is_sequence: bool = True


def _add_placeholder(graph: fx.Graph, after: fx.Node | None, name: str) -> fx.Node:
    if after is None:
        with graph.inserting_before(next(iter(graph.nodes), None)):
            return graph.placeholder(name)
    with graph.inserting_after(after):
        return graph.placeholder(name)


class _CheckpointThreads:
    """Thread outer-graph values into activation-checkpoint bodies, and body values back out.

    A linear inside a checkpoint body needs the layer tensors, which are
    placeholders of the outer graph: each becomes a new body placeholder and
    a new argument of the checkpoint call. Its extra outputs go the other
    way: appended to the body's output tuple and read in the outer graph with
    `getitem` on the call.
    """

    def __init__(self):
        self._inputs: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        self.bodies: dict[fx.Node, fx.GraphModule] = {}

    def _body(self, call: fx.Node) -> fx.GraphModule:
        if call not in self.bodies:
            self.bodies[call] = getattr(call.graph.owning_module, call.args[0].target)
        return self.bodies[call]

    def into(self, call: fx.Node | None, outer_node: fx.Node) -> fx.Node:
        if call is None:
            return outer_node
        key = (call, outer_node)
        if key not in self._inputs:
            graph = self._body(call).graph
            last = None
            for node in graph.find_nodes(op="placeholder"):
                last = node
            self._inputs[key] = _add_placeholder(graph, last, outer_node.name)
            call.args = (*call.args, outer_node)
        return self._inputs[key]

    def out_of(self, call: fx.Node | None, body_node: fx.Node) -> fx.Node:
        if call is None:
            return body_node
        output_node = self._body(call).graph.find_nodes(op="output")[0]
        outputs = output_node.args[0]
        if not isinstance(outputs, (tuple, list)):
            raise RuntimeError(f"the checkpoint body of {call.name} returns {type(outputs).__name__}, not a tuple")
        output_node.args = (type(outputs)([*outputs, body_node]),)
        with call.graph.inserting_after(call):
            return call.graph.call_function(operator.getitem, (call, len(outputs)))

    def finish(self) -> None:
        for body in self.bodies.values():
            body.graph.lint()
            body.recompile()


def rewrite_linears(
    gm: fx.GraphModule,
    matches: list[tuple[LinearMatch, bool]],
    momentum: float,
    matmul: str,
    threshold: float = 100.0,
) -> RewriteResult:
    """Rewrite `gm` in place; `matches` pairs each linear to quantize with whether it has outlier slots.

    A linear inside an activation-checkpoint body is rewritten in the body,
    with its inputs and extra outputs threaded through the checkpoint call.
    """
    graph = gm.graph
    result = RewriteResult()
    if not matches:
        return result

    # 1. New placeholders for the layer tensors, after the existing ones.
    last_placeholder = None
    for node in graph.find_nodes(op="placeholder"):
        last_placeholder = node

    def add_input(name: str) -> fx.Node:
        nonlocal last_placeholder
        last_placeholder = _add_placeholder(graph, last_placeholder, name)
        return last_placeholder

    layer_inputs = []
    for index, (match, smoothed) in enumerate(matches):
        names = ["weight_qdata", "weight_scale"]
        if smoothed:
            names += ["outlier_slots", "outlier_weight", "outlier_weight_absmax", "smooth_scale"]
        layer_inputs.append({name: add_input(f"quaff_{index}_{name}") for name in names})
        result.linears.append(RewrittenLinear(match=match, smoothed=smoothed))

    update_flag = None
    if any(smoothed for _, smoothed in matches):
        update_flag = add_input(UPDATE_FLAG_NAME)
        result.has_update_flag = True

    # 2. Replace each linear by the int8 linear, in the graph or checkpoint body it is in.
    threads = _CheckpointThreads()
    smooth_scale_outputs, hits_outputs = [], []
    for (match, smoothed), outer_inputs in zip(matches, layer_inputs):
        node = match.node
        inputs = {name: threads.into(match.checkpoint, value) for name, value in outer_inputs.items()}
        with node.graph.inserting_before(node):
            if match.mha:
                call = node.graph.call_function(
                    numerics.quaff_mha_forward,
                    (
                        tuple(node.args),
                        dict(node.kwargs),
                        tuple(inputs.values()),  # in the order quaff_mha_forward expects
                        threads.into(match.checkpoint, update_flag) if smoothed else None,
                        momentum,
                        matmul,
                        threshold,
                    ),
                )
                # The call returns (output, weights, ...) as the original did for indices 0 and 1.
                output = call
                if smoothed:
                    used = node.graph.call_function(operator.getitem, (call, 2))
                    hits = node.graph.call_function(operator.getitem, (call, 3))
            elif smoothed:
                call = node.graph.call_function(
                    numerics.smoothed_quaff_linear,
                    (
                        match.input,
                        inputs["weight_qdata"],
                        inputs["weight_scale"],
                        match.bias,
                        inputs["outlier_slots"],
                        inputs["outlier_weight"],
                        inputs["outlier_weight_absmax"],
                        inputs["smooth_scale"],
                        threads.into(match.checkpoint, update_flag),
                        momentum,
                        matmul,
                        threshold,
                    ),
                )
                output = node.graph.call_function(operator.getitem, (call, 0))
                used = node.graph.call_function(operator.getitem, (call, 1))
                hits = node.graph.call_function(operator.getitem, (call, 2))
            else:
                output = node.graph.call_function(
                    numerics.quaff_linear,
                    (match.input, inputs["weight_qdata"], inputs["weight_scale"], match.bias, matmul),
                )
        output.meta.update({key: value for key, value in node.meta.items() if key in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(output)
        node.graph.erase_node(node)
        if smoothed:
            smooth_scale_outputs.append(threads.out_of(match.checkpoint, used))
            hits_outputs.append(threads.out_of(match.checkpoint, hits))
    threads.finish()

    # 3. Return the smooth scales used, then the outlier hits, after the graph's own outputs.
    smooth_scale_outputs += hits_outputs
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
