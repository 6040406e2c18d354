"""Find the linears of a captured graph and decide which ones go to int8.

After Dynamo capture, `nn.Linear`, its subclasses and `F.linear` all appear
as `call_function` nodes whose target is the builtin `torch._C._nn.linear`
(which `F.linear` is). `nn.MultiheadAttention` appears as one
`F.multi_head_attention_forward` node, whose output projection is matched.
GPT-2's `Conv1D` appears as `torch.addmm(bias, x, W)`
with W stored as [in_features, out_features], the transpose of a linear's
weight; such a match has `transposed=True`. Dynamo in torch 2.13 lifts module
parameters into graph inputs, so a frozen weight is a placeholder whose
example input is the real `nn.Parameter`. A weight held in a `get_attr` node
is handled too.

A linear is quantized only where its weight is a frozen parameter whose
values we hold at compile time, the user's filter lets it through and
`torch._int_mm` accepts its size. Every other linear stays in float, with the
reason kept on its match for the log and for inspection.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from quaff_compile.config import QuaffConfig
from quaff_compile.numerics import int_mm_refusal

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)
CHECKPOINT_TARGET = torch.ops.higher_order.tag_activation_checkpoint
# Dynamo keeps nn.MultiheadAttention's functional form as one node; its output
# projection is the linear served (the input projections stay in float).
MHA_TARGET = torch.nn.functional.multi_head_attention_forward

_ROOT_PATTERN = re.compile(r"""^(L|G)\[(['"])(.+?)\2\]""")
_PART_PATTERN = re.compile(r"""\[(['"])(.+?)\1\]|\.([A-Za-z_]\w*)|\[(\d+)\]""")
_CONTAINER_NAMES = {"__dict__", "_modules", "_parameters", "_buffers"}


@dataclass
class LinearMatch:
    """One linear node of a graph and the decision taken on it."""

    node: fx.Node
    fqn: str
    module: torch.nn.Module | None
    input: fx.Node
    weight_node: fx.Node
    bias: fx.Node | None
    weight: torch.Tensor | None
    reason: str | None  # None: quantize; else why it stays in float
    # True where the parameter is stored as [in_features, out_features] (Conv1D).
    transposed: bool = False
    # For a linear inside an activation-checkpoint body: the checkpoint call in
    # the outer graph, and the outer graph's node that feeds the weight.
    checkpoint: fx.Node | None = None
    outer_weight_node: fx.Node | None = None
    # True where `node` is a multi_head_attention_forward call and this is its
    # output projection; `input` is then None (the input is inside the call).
    mha: bool = False

    @property
    def key(self) -> str:
        """A name for the linear node, unique in the outer graph and its checkpoint bodies."""
        if self.checkpoint is None:
            return self.node.name
        return f"{self.checkpoint.args[0].target}/{self.node.name}"

    @property
    def source_weight_node(self) -> fx.Node:
        """The outer graph's node of the weight (a placeholder or get_attr)."""
        return self.outer_weight_node if self.outer_weight_node is not None else self.weight_node

    @property
    def quantize(self) -> bool:
        return self.reason is None

    def linear_weight(self, parameter: torch.Tensor) -> torch.Tensor:
        """Return `parameter` as a linear's [out_features, in_features] weight (a view, no copy)."""
        return parameter.t() if self.transposed else parameter


class ParameterResolver:
    """Map a graph input's Dynamo source to the parameter's fqn and module.

    Dynamo names each graph input by a source expression such as
    `L['self']._modules['model']...._parameters['weight']`. The root (`L['self']`)
    is looked up in the frame Dynamo is compiling. When that root is a module,
    the fqn comes from its `named_parameters()`, so it matches what users print.
    Otherwise the fqn is spelled out from the source expression and the module
    stays unknown.
    """

    def __init__(self, frame_locals: dict | None = None, frame_globals: dict | None = None):
        if frame_locals is None and frame_globals is None:
            frame_locals, frame_globals = _dynamo_frame_scopes()
        self.frame_locals = frame_locals or {}
        self.frame_globals = frame_globals or {}
        self._parameter_names: dict[int, dict[int, str]] = {}
        self.roots: list[torch.nn.Module] = []

    def resolve(self, source_name: str, parameter: torch.Tensor) -> tuple[str, torch.nn.Module | None]:
        root_match = _ROOT_PATTERN.match(source_name)
        if root_match is not None:
            scope = self.frame_locals if root_match.group(1) == "L" else self.frame_globals
            root = scope.get(root_match.group(3))
            if isinstance(root, torch.nn.Module):
                name = self._names_of(root).get(id(parameter))
                if name is not None:
                    module_fqn, _, attribute = name.rpartition(".")
                    module = root.get_submodule(module_fqn)
                    # A weight used through F.linear under another name is named by itself.
                    return (module_fqn if attribute == "weight" else name), module
        return _fqn_from_source(source_name), None

    def _names_of(self, root: torch.nn.Module) -> dict[int, str]:
        if id(root) not in self._parameter_names:
            self._parameter_names[id(root)] = {
                id(parameter): name for name, parameter in root.named_parameters(remove_duplicate=False)
            }
            self.roots.append(root)
        return self._parameter_names[id(root)]


def _dynamo_frame_scopes() -> tuple[dict, dict]:
    # Private API: the frame Dynamo is translating while it calls a backend.
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        translator = InstructionTranslator.current_tx()
        return dict(translator.f_locals), dict(translator.f_globals)
    except Exception:  # noqa: BLE001 - any failure only loses fqn resolution
        log.debug("no Dynamo frame to resolve module names from; fqns come from source names")
        return {}, {}


def _fqn_from_source(source_name: str) -> str:
    """Spell a module fqn from a Dynamo source name, dropping the root and containers."""
    root_match = _ROOT_PATTERN.match(source_name)
    rest = source_name[root_match.end():] if root_match else source_name
    parts = []
    for match in _PART_PATTERN.finditer(rest):
        part = match.group(2) or match.group(3) or match.group(4)
        if part not in _CONTAINER_NAMES:
            parts.append(part)
    return ".".join(parts[:-1])


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return node.target if node.op == "get_attr" else node.name
    name = grapharg.source.name
    return name() if callable(name) else name


def _example_of(node: fx.Node, gm: fx.GraphModule, placeholders: dict[fx.Node, int], example_inputs) -> object:
    if node.op == "placeholder" and node in placeholders:
        index = placeholders[node]
        return example_inputs[index] if index < len(example_inputs) else None
    if node.op == "get_attr":
        value = gm
        for attribute in node.target.split("."):
            value = getattr(value, attribute, None)
        return value
    return None


def _linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    names = ("input", "weight", "bias")
    values = list(node.args) + [node.kwargs[name] for name in names[len(node.args):] if name in node.kwargs]
    bias = values[2] if len(values) > 2 else None
    return values[0], values[1], bias


def _addmm_args(node: fx.Node, example_of) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """Return (input, weight, bias) of `torch.addmm(bias, input, weight)`, or None for other uses of addmm.

    Only the plain form with beta = alpha = 1 and a 1-D bias is a linear.
    """
    names = ("input", "mat1", "mat2")
    values = list(node.args) + [node.kwargs[name] for name in names[len(node.args):] if name in node.kwargs]
    if len(values) != 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias, mat1, mat2 = values
    bias_value = example_of(bias) if isinstance(bias, fx.Node) else None
    if bias_value is None and isinstance(bias, fx.Node):
        bias_value = bias.meta.get("example_value")
    if not isinstance(bias_value, torch.Tensor) or bias_value.dim() != 1:
        return None
    return mat1, mat2, bias


def _refusal(weight: object, module, fqn: str, config: QuaffConfig) -> str | None:
    if not isinstance(weight, torch.Tensor):
        return "the weight is computed inside the graph, not a parameter"
    if weight.requires_grad:
        return "the weight is trainable (requires_grad=True)"
    if isinstance(weight, FakeTensor) or weight.is_meta:
        return "the weight's values are not available at compile time"
    if weight.dim() != 2 or not weight.is_floating_point():
        return f"the weight is {weight.dim()}-D {weight.dtype}, not a 2-D floating-point matrix"
    if weight.device.type not in ("cpu", "cuda"):
        return f"torch._int_mm does not run on device {weight.device.type!r}"
    if not config.should_quantize(module, fqn):
        return "excluded by skip_fqns or filter_fn"
    return int_mm_refusal(in_features=weight.shape[1], out_features=weight.shape[0])


def checkpoint_body(node: fx.Node, gm: fx.GraphModule) -> fx.GraphModule | None:
    """Return the body of an activation-checkpoint call node, or None for any other node."""
    if node.op != "call_function" or node.target is not CHECKPOINT_TARGET:
        return None
    body_node = node.args[0] if node.args else None
    if not isinstance(body_node, fx.Node) or body_node.op != "get_attr":
        return None
    body = getattr(gm, body_node.target, None)
    return body if isinstance(body, fx.GraphModule) else None


def find_linears(
    gm: fx.GraphModule,
    example_inputs,
    config: QuaffConfig,
    resolver: ParameterResolver,
) -> list[LinearMatch]:
    """Return every linear node of `gm` with the int8-or-float decision on it.

    Linears inside an activation-checkpoint body (Dynamo's
    `tag_activation_checkpoint` call) are found too; their weights are
    followed out to the outer graph's inputs.
    """
    placeholders = {node: index for index, node in enumerate(gm.graph.find_nodes(op="placeholder"))}

    def example_of(node: fx.Node) -> object:
        return _example_of(node, gm, placeholders, example_inputs)

    matches = []
    for node in gm.graph.nodes:
        body = checkpoint_body(node, gm)
        if body is not None:
            matches += _find_in_checkpoint(node, body, gm, example_of, config, resolver)
            continue
        if node.op != "call_function":
            continue
        if node.target in LINEAR_TARGETS:
            input_node, weight_node, bias_node = _linear_args(node)
            transposed = False
        elif node.target in ADDMM_TARGETS and (addmm := _addmm_args(node, example_of)) is not None:
            input_node, weight_node, bias_node = addmm
            transposed = True
        elif node.target is MHA_TARGET:
            bound = inspect.signature(MHA_TARGET).bind(*node.args, **node.kwargs).arguments
            input_node, weight_node, bias_node = None, bound["out_proj_weight"], bound.get("out_proj_bias")
            transposed = False
        else:
            continue
        weight = example_of(weight_node) if isinstance(weight_node, fx.Node) else None

        if isinstance(weight, torch.Tensor):
            fqn, module = resolver.resolve(_source_name(weight_node), weight)
        else:
            fqn, module = node.name, None
        if transposed and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            reason = _refusal(weight.t(), module, fqn, config)
        else:
            reason = _refusal(weight, module, fqn, config)
        if reason is not None:
            log.debug("linear %s (%s) stays in float: %s", node.name, fqn, reason)

        matches.append(
            LinearMatch(
                node=node,
                fqn=fqn,
                module=module,
                input=input_node,
                weight_node=weight_node,
                bias=bias_node,
                weight=weight if isinstance(weight, torch.Tensor) else None,
                reason=reason,
                transposed=transposed,
                mha=node.target is MHA_TARGET,
            )
        )
    return matches


def _find_in_checkpoint(call: fx.Node, body: fx.GraphModule, gm: fx.GraphModule, example_of, config, resolver):
    """Return the linears of one checkpoint body, with weights resolved through the call's arguments."""
    body_placeholders = list(body.graph.find_nodes(op="placeholder"))
    outer = dict(zip(body_placeholders, call.args[1:]))
    shared = [
        other for other in gm.graph.nodes
        if other is not call and checkpoint_body(other, gm) is body
    ]
    nested = any(checkpoint_body(inner, body) is not None for inner in body.graph.nodes)

    def outer_example(node: fx.Node) -> object:
        outer_node = outer.get(node)
        return example_of(outer_node) if isinstance(outer_node, fx.Node) else None

    matches = find_linears(body, [outer_example(node) for node in body_placeholders], config, _OuterResolver(resolver, outer))
    for match in matches:
        match.checkpoint = call
        match.outer_weight_node = outer.get(match.weight_node)
        if match.quantize and (shared or nested):
            match.reason = "the checkpoint body is shared or nested, which the rewrite does not follow"
            log.debug("linear %s (%s) stays in float: %s", match.node.name, match.fqn, match.reason)
    return matches


class _OuterResolver:
    """Resolve a checkpoint body's weight placeholders by the outer graph's nodes feeding them."""

    def __init__(self, resolver: ParameterResolver, outer: dict):
        self.resolver = resolver
        self.outer_names = {node.name: _source_name(outer_node) for node, outer_node in outer.items() if isinstance(outer_node, fx.Node)}

    def resolve(self, source_name: str, parameter: torch.Tensor):
        return self.resolver.resolve(self.outer_names.get(source_name, source_name), parameter)
