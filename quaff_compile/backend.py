"""The `quaff` torch.compile backend.

`torch.compile(model, backend="quaff", options={...})` reaches
`quaff_backend` through the `torch_dynamo_backends` entry point, with the
FX graph Dynamo captured and the real example inputs. The backend:

1. turns the options into a `QuaffConfig` (unknown keys fail);
2. copies the graph, because editing Dynamo's own graph in place breaks its
   bookkeeping;
3. finds the linears and decides which go to int8 (`passes.find_linears`);
4. chooses outlier channels for layers seen for the first time, from this
   batch (`passes.observe_outliers`), and quantizes their weights once;
5. rewrites the chosen linears (`passes.rewrite_linears`);
6. hands the graph to Inductor's `compile_fx`, with any Inductor options
   passed per compile so the process's global Inductor config is untouched;
7. returns a wrapper that feeds the layer states into each call and stores
   the moved `smooth_scale` after a training forward.
"""

from __future__ import annotations

import collections
import logging
import weakref
from typing import Any

import torch
import torch.fx as fx

from quaff_compile.config import QuaffConfig
from quaff_compile.numerics import int_mm_is_fast
from quaff_compile.passes.find_linears import LinearMatch, ParameterResolver, find_linears
from quaff_compile.passes.observe_outliers import observe_outlier_channels
from quaff_compile.passes.rewrite_linears import RewriteResult, rewrite_linears
from quaff_compile.state import LayerState, get_layer_state, set_layer_state

log = logging.getLogger(__name__)


class QuaffCompiledGraph:
    """Call a compiled, rewritten graph with the layer states appended to its inputs."""

    def __init__(
        self,
        compiled,
        rewrite: RewriteResult,
        weight_refs: list[tuple[LayerState, Any]],
        training_module: torch.nn.Module | None,
        device: torch.device,
    ):
        self.compiled = compiled
        self.rewrite = rewrite
        self.weight_refs = weight_refs
        self._training_module = weakref.ref(training_module) if training_module is not None else None
        self._update_flags = (
            torch.tensor(False, device=device),
            torch.tensor(True, device=device),
        )

    def is_training(self) -> bool:
        """Return whether this call moves the momentum state: grad enabled and the model in train mode."""
        if not torch.is_grad_enabled():
            return False
        module = self._training_module() if self._training_module is not None else None
        return True if module is None else module.training

    def _refresh_stale_weights(self, args) -> None:
        for state, weight_ref in self.weight_refs:
            weight = args[weight_ref] if isinstance(weight_ref, int) else weight_ref()
            if weight is not None:
                state.refresh_if_stale(weight)

    def __call__(self, *args):
        self._refresh_stale_weights(args)
        training = self.is_training()
        extra = list(self.rewrite.extra_inputs)
        if self.rewrite.has_update_flag:
            extra.append(self._update_flags[int(training)])

        # Dynamo calls what compile_fx returns with unpacked arguments, so do the same.
        outputs = self.compiled(*args, *extra)

        smoothed = self.rewrite.smoothed_states
        if not smoothed:
            return outputs
        count = len(outputs) - len(smoothed)
        if training:
            with torch.no_grad():
                for state, smooth_scale in zip(smoothed, outputs[count:]):
                    state.smooth_scale.copy_(smooth_scale)
                    state.updates += 1
        kept = outputs[:count]
        if not self.rewrite.output_is_sequence:
            return kept[0]
        return kept if isinstance(outputs, list) else tuple(kept)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _resolve_matmul(config: QuaffConfig, device: torch.device) -> str:
    if config.matmul != "auto":
        return config.matmul
    if int_mm_is_fast(device):
        return "int_mm"
    log.info(
        "this CPU has no int8 matrix unit (AVX512-VNNI or AMX), where torch._int_mm is a slow scalar "
        "loop; computing the int8 products with exact fp32 matmuls instead (options={'matmul': 'int_mm'} "
        "forces torch._int_mm)"
    )
    return "emulated"


def _layer_states(
    gm: fx.GraphModule, example_inputs, matches: list[LinearMatch], config: QuaffConfig
) -> list[tuple[LinearMatch, LayerState]]:
    """Return the state of each linear to quantize, creating it for new layers."""
    new = [match for match in matches if get_layer_state(match.weight) is None]
    channels = observe_outlier_channels(
        gm,
        example_inputs,
        [match.node for match in new],
        threshold=config.outlier_threshold,
        max_ratio=config.outlier_max_ratio,
    )
    for match in new:
        layer_channels = channels.get(match.node.name, [])
        set_layer_state(match.weight, LayerState.from_weight(match.fqn, match.weight, layer_channels))
        log.debug("%s: outlier channels %s", match.fqn, layer_channels)

    pairs = []
    for match in matches:
        state = get_layer_state(match.weight)
        state.refresh_if_stale(match.weight)
        pairs.append((match, state))
    return pairs


def _log_summary(matches: list[LinearMatch], pairs) -> None:
    skipped = collections.Counter(match.reason for match in matches if not match.quantize)
    with_outliers = sum(1 for _, state in pairs if state.has_outliers)
    log.info(
        "quaff: rewrote %d of %d linears to int8 (%d with outlier channels); kept %d in float%s",
        len(pairs),
        len(matches),
        with_outliers,
        sum(skipped.values()),
        "".join(f"; {count} because {reason}" for reason, count in skipped.items()),
    )


def _inductor_config_patches(mode: str | None, dynamic: bool | None) -> dict:
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode, dynamic))


def quaff_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None, **kwargs):
    """Compile a Dynamo graph with its frozen linears lowered to int8 Quaff linears."""
    from torch._inductor.compile_fx import compile_fx

    config = QuaffConfig.from_options(options)
    config_patches = _inductor_config_patches(mode, kwargs.get("dynamic"))

    gm = _copy_graph_module(gm)
    resolver = ParameterResolver()
    matches = find_linears(gm, example_inputs, config, resolver)
    chosen = [match for match in matches if match.quantize]
    if not chosen:
        _log_summary(matches, [])
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    device = chosen[0].weight.device
    matmul = _resolve_matmul(config, device)
    pairs = _layer_states(gm, example_inputs, chosen, config)
    _log_summary(matches, pairs)

    placeholders = {node: index for index, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    weight_refs = []
    for match, state in pairs:
        if match.weight_node in placeholders:
            weight_refs.append((state, placeholders[match.weight_node]))
        else:
            weight_refs.append((state, weakref.ref(match.weight)))

    rewrite = rewrite_linears(gm, pairs, momentum=config.momentum, matmul=matmul)
    extra_examples = list(rewrite.extra_inputs)
    if rewrite.has_update_flag:
        extra_examples.append(torch.tensor(False, device=device))
    compiled = compile_fx(gm, [*example_inputs, *extra_examples], config_patches=config_patches)

    training_module = resolver.roots[0] if resolver.roots else next(
        (match.module for match in chosen if match.module is not None), None
    )
    return QuaffCompiledGraph(compiled, rewrite, weight_refs, training_module, device)
