"""The `quaff` torch.compile backend.

`torch.compile(model, backend="quaff", options={...})` reaches
`quaff_backend` through the `torch_dynamo_backends` entry point, with the
FX graph Dynamo captured and the real example inputs. The backend:

1. turns the options into a `QuaffConfig` (unknown keys fail);
2. copies the graph, because editing Dynamo's own graph in place breaks its
   bookkeeping;
3. finds the linears and decides which go to int8 (`passes.find_linears`);
4. rewrites the chosen linears (`passes.rewrite_linears`);
5. chooses outlier channels for layers seen for the first time, from this
   batch (`passes.observe_outliers`), and quantizes their weights once;
6. hands the graph to Inductor's `compile_fx`, with any Inductor options
   passed per compile so the process's global Inductor config is untouched;
7. returns a wrapper that looks up the layer states by the weights of each
   call, feeds them in, and stores the moved `smooth_scale` after a
   training forward.
"""

from __future__ import annotations

import collections
import logging
import warnings
import weakref
from typing import Any

import torch
import torch.fx as fx

from quaff_compile.compat import register_tracing_substitutes
from quaff_compile.config import QuaffConfig, QuaffInputError
from quaff_compile.numerics import int_mm_is_fast
from quaff_compile.offload import offload_weight
from quaff_compile.passes.find_linears import LinearMatch, ParameterResolver, find_linears
from quaff_compile.passes.observe_outliers import observe_outlier_channels
from quaff_compile.passes.rewrite_linears import RewriteResult, rewrite_linears
from quaff_compile.calibration import normalize_fqn
from quaff_compile.state import LayerState, get_layer_state, outlier_slots, set_layer_state, take_preset

log = logging.getLogger(__name__)

# Resolving backend="quaff" imports this module before Dynamo traces anything.
register_tracing_substitutes()


class QuaffCompiledGraph:
    """Call a compiled, rewritten graph with the layer states appended to its inputs.

    The states are looked up on every call by the weights the graph is called
    with, because Dynamo reuses one compiled graph for every layer and model
    instance of the same shapes. A weight seen for the first time gets its
    state here: outlier channels from running the original graph on this
    call's inputs, and its int8 copy.
    """

    def __init__(
        self,
        compiled,
        original_gm: fx.GraphModule,
        rewrite: RewriteResult,
        config: QuaffConfig,
        training_module: torch.nn.Module | None,
        device: torch.device,
    ):
        self.compiled = compiled
        self.original_gm = original_gm
        self.rewrite = rewrite
        self.config = config
        self._training_module = weakref.ref(training_module) if training_module is not None else None
        self._fixed_logged = False
        self._update_flags = (
            torch.tensor(False, device=device),
            torch.tensor(True, device=device),
        )
        # Node names survive the graph copy, and new placeholders go after the old ones.
        placeholders = {node.name: index for index, node in enumerate(original_gm.graph.find_nodes(op="placeholder"))}
        self._weight_sources = []
        for linear in rewrite.linears:
            weight_node = linear.match.source_weight_node
            if weight_node.op == "placeholder":
                self._weight_sources.append(placeholders[weight_node.name])
            else:
                self._weight_sources.append(weakref.ref(linear.match.weight))

    def is_training(self) -> bool:
        """Return whether this call may move the momentum state: grad enabled and the model in train mode."""
        if not torch.is_grad_enabled():
            return False
        module = self._training_module() if self._training_module is not None else None
        return True if module is None else module.training

    def moves_state(self, states: list[LayerState]) -> bool:
        """Decide whether this call moves the momentum state, and note it for a later recompute.

        Activation checkpointing runs a forward again inside the backward pass.
        Non-reentrant checkpointing moved the state in the first forward, so
        its recompute must not move it again. Reentrant checkpointing ran the
        first forward under `no_grad`. Its recompute is then the only training
        forward, and it moves the state.
        """
        if not self.is_training():
            if not torch.is_grad_enabled():
                for state in states:
                    state.awaiting_recompute = False
            return False
        if torch._C._current_graph_task_id() != -1:  # inside a backward pass: a recompute
            recompute = any(state.awaiting_recompute for state in states)
            for state in states:
                state.awaiting_recompute = False
            return not recompute
        for state in states:
            state.awaiting_recompute = True
        return True

    def _weights(self, args) -> list[torch.Tensor]:
        return [args[source] if isinstance(source, int) else source() for source in self._weight_sources]

    def layer_states(self, args, weights=None) -> list[LayerState]:
        """Return the state of each rewritten linear for the weights in `args`, creating missing ones."""
        weights = self._weights(args) if weights is None else weights
        states = [get_layer_state(weight) for weight in weights]
        missing = [index for index, state in enumerate(states) if state is None]
        if missing:
            self._create_states(args, weights, missing)
            states = [get_layer_state(weight) for weight in weights]
        for linear, weight, state in zip(self.rewrite.linears, weights, states):
            in_features = linear.match.linear_weight(weight).shape[1]
            slots = outlier_slots(in_features, self.config.outlier_max_ratio) if linear.smoothed else 0
            if state.outlier_slots.numel() != slots:
                raise QuaffInputError(
                    f"{state.fqn} has {state.outlier_slots.numel()} outlier slots but this graph was compiled "
                    f"for {slots}; use the same outlier_max_ratio in every torch.compile of a model"
                )
            state.refresh_if_stale(weight)
        return states

    def _create_states(self, args, weights, missing: list[int]) -> None:
        """Create the states of new weights: channels from `load_state_dict`, the options, or this batch."""
        presets = {index: take_preset(weights[index]) for index in missing}
        supplied = self.config.outlier_channels
        to_observe = [index for index in missing if presets[index] is None and supplied is None]
        input_absmax: dict[str, torch.Tensor] = {}
        observed = observe_outlier_channels(
            self.original_gm,
            args,
            [self.rewrite.linears[index].match.key for index in to_observe],
            threshold=self.config.outlier_threshold,
            max_ratio=self.config.outlier_max_ratio,
            input_absmax=input_absmax,
        )
        for index in missing:
            weight = weights[index]
            if get_layer_state(weight) is not None:
                continue  # a weight used by two linears
            linear = self.rewrite.linears[index]
            fqn = linear.match.fqn
            preset = presets[index]
            if preset is not None:
                channels = list(preset["outlier_channels"])
            elif supplied is not None:
                channels = supplied.get(normalize_fqn(fqn))
                if channels is None:
                    log.debug("%s has no entry in outlier_channels; it gets no outlier channels", fqn)
                    channels = []
            else:
                channels = observed.get(linear.match.key, [])

            in_features = linear.match.linear_weight(weight).shape[1]
            slots = outlier_slots(in_features, self.config.outlier_max_ratio) if linear.smoothed else 0
            state = LayerState.from_weight(fqn, weight, channels, slots, transposed=linear.match.transposed)
            state.channels_fixed = supplied is not None
            if preset is not None:
                state.restore(weight, preset)
            elif linear.match.key in input_absmax:
                state.start_smooth_scale(input_absmax[linear.match.key])
            set_layer_state(weight, state)
            log.debug("%s: outlier channels %s", fqn, state.outlier_channels)
            folder = self.config.offload_folder()
            if folder is not None and offload_weight(weight, folder):
                state.note_offloaded(weight)

    def _store(self, smoothed, smooth_scales, hits) -> None:
        """After a training forward: store the smooth scales and feed the hits to calibration and the monitor."""
        fixed_now = []
        with torch.no_grad():
            for (state, weight), smooth_scale, layer_hits in zip(smoothed, smooth_scales, hits):
                state.smooth_scale = smooth_scale.detach()
                state.updates += 1
                if state.observe(weight, layer_hits, self.config.online_calibration_steps):
                    fixed_now.append(state)
        if fixed_now and not self._fixed_logged:
            self._fixed_logged = True
            log.info(
                "quaff: outlier channels fixed after %d training steps (%d of %d layers of this graph have some)",
                self.config.online_calibration_steps,
                sum(1 for state in fixed_now if state.num_outliers),
                len(fixed_now),
            )

    def __call__(self, *args):
        weights = self._weights(args)
        states = self.layer_states(args, weights)
        training = self.moves_state(states)
        extra = []
        for linear, state in zip(self.rewrite.linears, states):
            extra += [state.weight_qdata, state.weight_scale]
            if linear.smoothed:
                extra += [state.outlier_slots, state.outlier_weight, state.outlier_weight_absmax, state.smooth_scale]
        if self.rewrite.has_update_flag:
            extra.append(self._update_flags[int(training)])

        # Dynamo calls what compile_fx returns with unpacked arguments, so do the same.
        outputs = self.compiled(*args, *extra)

        smoothed = [
            (state, weight) for linear, state, weight in zip(self.rewrite.linears, states, weights) if linear.smoothed
        ]
        if not smoothed:
            return outputs
        count = len(outputs) - 2 * len(smoothed)
        if training:
            self._store(smoothed, outputs[count:count + len(smoothed)], outputs[count + len(smoothed):])
        kept = outputs[:count]
        if not self.rewrite.output_is_sequence:
            return kept[0]
        return kept if isinstance(outputs, list) else tuple(kept)


_EMULATION_LOGGED = False  # the emulation notice is logged once per process


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy a graph module together with its subgraph modules (checkpoint bodies), recursively."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copy = fx.GraphModule(gm, graph)
    for node in graph.find_nodes(op="get_attr"):
        value = getattr(copy, node.target, None)
        if isinstance(value, fx.GraphModule) and "." not in node.target:
            setattr(copy, node.target, copy_graph_module(value))
    return copy


def _resolve_matmul(config: QuaffConfig, device: torch.device) -> str:
    if config.matmul != "auto":
        return config.matmul
    if int_mm_is_fast(device):
        return "int_mm"
    global _EMULATION_LOGGED
    if _EMULATION_LOGGED:
        return "emulated"
    _EMULATION_LOGGED = True
    log.info(
        "this CPU has no int8 matrix unit (AVX512-VNNI or AMX), where torch._int_mm is a slow scalar "
        "loop; computing the int8 products with exact fp32 matmuls instead (options={'matmul': 'int_mm'} "
        "forces torch._int_mm)"
    )
    return "emulated"


def _log_summary(matches: list[LinearMatch], states: list[LayerState]) -> None:
    skipped = collections.Counter(match.reason for match in matches if not match.quantize)
    with_outliers = sum(1 for state in states if state.num_outliers)
    log.info(
        "quaff: rewrote %d of %d linears to int8 (%d with outlier channels); kept %d in float%s",
        len(states),
        len(matches),
        with_outliers,
        sum(skipped.values()),
        "".join(f"; {count} because {reason}" for reason, count in skipped.items()),
    )


def _static_fake_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fakify the appended inputs with static shapes in Dynamo's fake mode.

    AOTAutograd would otherwise give real tensors unknown to Dynamo fresh
    dynamic sizes, whose guards have no source and fail to install. Their
    sizes only change with the layer's shapes, which Dynamo already guards.
    """
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return tensors
    return [context.fake_mode.from_tensor(tensor, static_shapes=True) for tensor in tensors]


def _inductor_config_patches(mode: str | None, dynamic: bool | None) -> dict:
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode, dynamic))


_FALLBACK_WARNED: set[str] = set()  # the causes already warned about, so each is warned once


def quaff_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None, **kwargs):
    """Compile a Dynamo graph with its frozen linears lowered to int8 Quaff linears.

    If the pass fails on the graph, the graph is compiled by Inductor in float
    instead, with one warning per cause; `options={"strict": True}` raises.
    Bad user input (`QuaffInputError`) always raises.
    """
    from torch._inductor.compile_fx import compile_fx

    config = QuaffConfig.from_options(options)
    config_patches = _inductor_config_patches(mode, kwargs.get("dynamic"))
    try:
        return _compile_quantized(gm, example_inputs, config, config_patches)
    except QuaffInputError:
        raise
    except Exception as error:
        if config.strict:
            raise
        cause = f"{type(error).__name__}: {error}"
        if cause not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(cause)
            warnings.warn(
                f"quaff: the int8 pass failed on a graph ({cause}); compiling that graph in float with Inductor "
                "instead. Pass options={'strict': True} to raise.",
                RuntimeWarning,
                stacklevel=2,
            )
        log.debug("quaff: graph compiled in float because the int8 pass failed", exc_info=True)
        return compile_fx(gm, example_inputs, config_patches=config_patches)


def _compile_quantized(gm: fx.GraphModule, example_inputs, config: QuaffConfig, config_patches: dict):
    from torch._inductor.compile_fx import compile_fx

    gm = copy_graph_module(gm)
    resolver = ParameterResolver()
    matches = find_linears(gm, example_inputs, config, resolver)
    chosen = [match for match in matches if match.quantize]
    if not chosen:
        _log_summary(matches, [])
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    device = chosen[0].weight.device
    matmul = _resolve_matmul(config, device)
    original_gm = copy_graph_module(gm)
    smoothed = [
        outlier_slots(match.linear_weight(match.weight).shape[1], config.outlier_max_ratio) > 0 for match in chosen
    ]
    rewrite = rewrite_linears(
        gm, list(zip(chosen, smoothed)), momentum=config.momentum, matmul=matmul, threshold=config.outlier_threshold
    )

    training_module = resolver.roots[0] if resolver.roots else next(
        (match.module for match in chosen if match.module is not None), None
    )
    wrapper = QuaffCompiledGraph(None, original_gm, rewrite, config, training_module, device)
    states = wrapper.layer_states(example_inputs)
    _log_summary(matches, states)

    extra_examples = []
    for linear, state in zip(rewrite.linears, states):
        extra_examples += [state.weight_qdata, state.weight_scale]
        if linear.smoothed:
            extra_examples += [state.outlier_slots, state.outlier_weight, state.outlier_weight_absmax, state.smooth_scale]
    if rewrite.has_update_flag:
        extra_examples.append(torch.tensor(False, device=device))
    extra_examples = _static_fake_tensors(extra_examples)
    wrapper.compiled = compile_fx(gm, [*example_inputs, *extra_examples], config_patches=config_patches)
    return wrapper
