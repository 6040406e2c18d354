"""Choose each linear's outlier channels from one batch, by running the graph.

The method's rule (`mean_times`): a channel of a linear's input is an outlier
where some |x| exceeds `threshold` times the mean |x| of that whole input. The
channels are ranked by how many tokens hit the rule, and at most
`floor(max_ratio * in_features)` of them are kept. Under the outlier spatial
stability hypothesis these channels stay the same during fine-tuning. A layer
therefore starts from the channels of its first batch. Online calibration, in
the backend's wrapper, then refines them over a few training steps and fixes
them.

The captured graph is run eagerly on its example inputs, under `no_grad` and
with the RNG state restored afterwards, so calibration neither builds an
autograd graph nor shifts the random numbers of the training run. Tensors
that are not parameters are cloned first, so an in-place op in the graph
cannot change the user's buffers or inputs twice.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from quaff_compile.numerics import run_mha_forward
from quaff_compile.passes.find_linears import ADDMM_TARGETS, MHA_TARGET, checkpoint_body

log = logging.getLogger(__name__)


def select_outlier_channels(x: torch.Tensor, threshold: float, max_ratio: float) -> list[int]:
    """Return the outlier channels of activation `x` [..., in_features], most frequent first."""
    in_features = x.shape[-1]
    limit = math.floor(max_ratio * in_features)
    if limit == 0 or x.numel() == 0:
        return []
    magnitude = x.detach().reshape(-1, in_features).abs().float()
    mean = magnitude.mean()
    if not torch.isfinite(mean) or mean == 0:
        return []
    hits = (magnitude > threshold * mean).sum(dim=0)
    counts, channels = torch.sort(hits, descending=True, stable=True)
    keep = int((counts[:limit] > 0).sum())
    return channels[:keep].tolist()


class _OutlierObserver(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: set[str], threshold: float, max_ratio: float, prefix: str = ""):
        super().__init__(gm, garbage_collect_values=True)
        self.prefix = prefix  # how the keys of this graph's linears start (see LinearMatch.key)
        self.watched = watched
        self.threshold = threshold
        self.max_ratio = max_ratio
        self.channels: dict[str, list[int]] = {}
        self.input_absmax: dict[str, torch.Tensor] = {}

    def run_node(self, node: fx.Node):
        body = checkpoint_body(node, self.module)
        if body is not None:
            # Run the body in place of the checkpoint call, watching its linears too.
            args, _ = self.fetch_args_kwargs_from_env(node)
            prefix = f"{self.prefix}{node.args[0].target}/"
            inner = _OutlierObserver(body, self.watched, self.threshold, self.max_ratio, prefix)
            result = inner.run(*args[1:])
            self.channels.update(inner.channels)
            self.input_absmax.update(inner.input_absmax)
            return result
        key = self.prefix + node.name
        if key in self.watched:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            if node.target is MHA_TARGET:
                return self._observe_mha(key, args, kwargs)
            if node.target in ADDMM_TARGETS:  # addmm(bias, x, weight)
                x = args[1] if len(args) > 1 else kwargs["mat1"]
            else:
                x = args[0] if args else kwargs["input"]
            self._record(key, x)
        return super().run_node(node)

    def _record(self, key: str, x: torch.Tensor) -> None:
        self.channels[key] = select_outlier_channels(x, self.threshold, self.max_ratio)
        self.input_absmax[key] = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()

    def _observe_mha(self, key: str, args, kwargs):
        """Run multi_head_attention_forward, recording the input of its output projection."""

        def out_projection(x, weight, bias):
            self._record(key, x)
            return torch.nn.functional.linear(x, weight, bias)

        return run_mha_forward(args, kwargs, out_projection)


def observe_outlier_channels(
    gm: fx.GraphModule,
    example_inputs,
    linear_names: list[str],
    threshold: float,
    max_ratio: float,
    input_absmax: dict[str, torch.Tensor] | None = None,
) -> dict[str, list[int]]:
    """Run `gm` on `example_inputs` and return the outlier channels of the linears with these keys.

    Keys are `LinearMatch.key`: the node name, prefixed by the checkpoint body
    for a linear inside one.

    When `input_absmax` is given, it receives each linear's max |x| per input
    channel. Returns an empty mapping, after a warning, when the graph cannot run
    eagerly on these inputs; the layers then get no outlier channels.
    """
    if not linear_names:
        return {}
    inputs = [
        value.clone() if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) else value
        for value in example_inputs
    ]
    devices = sorted({value.device.index for value in inputs if isinstance(value, torch.Tensor) and value.is_cuda})
    observer = _OutlierObserver(gm, set(linear_names), threshold, max_ratio)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            observer.run(*inputs)
    except Exception as error:  # noqa: BLE001 - calibration is best effort
        log.warning(
            "could not run the graph to find outlier channels (%s: %s); its linears get none",
            type(error).__name__,
            error,
        )
        return {}
    if input_absmax is not None:
        input_absmax.update(observer.input_absmax)
    return observer.channels
