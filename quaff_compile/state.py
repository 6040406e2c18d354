"""Per-layer Quaff state, kept outside any compiled graph.

Each quantized linear gets one `LayerState`, keyed by the identity of its
frozen weight parameter. Keying by the parameter (through a weak reference)
scopes the state to one model, lets it survive recompiles of any graph that
uses the layer, and frees it together with the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from quaff_compile.config import QuaffInputError
from quaff_compile.numerics import quantize_weight_per_channel
from quaff_compile.offload import page_out

log = logging.getLogger(__name__)


def outlier_slots(in_features: int, max_ratio: float) -> int:
    """Return how many outlier channels a layer with `in_features` inputs may have."""
    return math.floor(max_ratio * in_features)


@dataclass(eq=False)
class LayerState:
    """Int8 weight, outlier channels and running `smooth_scale` of one linear.

    A compiled graph is shared by every layer of the same shapes (Dynamo reuses
    it across repeated decoder layers and model instances), so the graph takes
    a fixed number of outlier slots, `outlier_slots(in_features, max_ratio)`.
    The first `num_outliers` slots hold the real channels. The others repeat
    one channel outside the set, with a zero `outlier_weight` column and an
    infinite `outlier_weight_absmax`, which pins their `smooth_scale` to 1 and
    their correction term to 0. A change replaces a tensor instead of writing
    into it: a compiled backward (activation checkpointing recomputes the
    forward from saved inputs) may still hold the old one.
    """

    fqn: str
    weight_qdata: torch.Tensor
    weight_scale: torch.Tensor
    weight_version: int
    num_outliers: int
    outlier_slots: torch.Tensor
    outlier_weight: torch.Tensor
    outlier_weight_absmax: torch.Tensor
    smooth_scale: torch.Tensor
    updates: int = 0
    weight_pointer: int = 0
    weight_sample: torch.Tensor | None = None
    # Online calibration: hits summed over the first training steps, until fixed.
    hit_counts: torch.Tensor | None = None
    calibration_steps: int = 0
    channels_fixed: bool = False
    # Stability monitor: per training step, the Jaccard overlap of that step's
    # top outlier channels with the layer's set.
    stability: list[float] = field(default_factory=list)
    # True after a training forward outside a backward pass, until a recompute
    # by activation checkpointing (see `QuaffCompiledGraph.moves_state`).
    awaiting_recompute: bool = False
    # True where the parameter is stored as [in_features, out_features] (GPT-2's
    # Conv1D); every method takes the parameter as stored.
    transposed: bool = False
    # True while the float weight is a memory map of a file (`offload_weights`).
    offloaded: bool = False

    def __repr__(self) -> str:
        scales = [round(value, 4) for value in self.smooth_scale[: self.num_outliers].tolist()]
        return (
            f"LayerState(fqn={self.fqn!r}, weight={tuple(self.weight_qdata.shape)} int8, "
            f"outlier_channels={self.outlier_channels}, smooth_scale={scales}, updates={self.updates})"
        )

    @property
    def outlier_channels(self) -> list[int]:
        """The real outlier channels, without the padding slots."""
        return self.outlier_slots[: self.num_outliers].tolist()

    def linear_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the parameter as a linear's [out_features, in_features] weight (a view)."""
        return weight.t() if self.transposed else weight

    @classmethod
    def from_weight(
        cls, fqn: str, weight: torch.Tensor, outlier_channels: list[int], slots: int, transposed: bool = False
    ) -> LayerState:
        """Quantize `weight` once and set up `smooth_scale` = 1 on `outlier_channels`.

        `weight` is the parameter as stored; `transposed` is True where it is
        [in_features, out_features].
        """
        parameter = weight
        weight = weight.t() if transposed else weight
        in_features = weight.shape[1]
        bad = [channel for channel in outlier_channels if not 0 <= channel < in_features]
        if bad:
            raise QuaffInputError(
                f"{fqn}: outlier channels {bad} are out of range for its {in_features} input channels; "
                "check that the channels were calibrated on this model"
            )
        # The first `slots` channels in the given order (most frequent first) are kept.
        channels = sorted(list(dict.fromkeys(outlier_channels))[:slots])
        padding = next((channel for channel in range(in_features) if channel not in channels), 0)
        device = weight.device
        state = cls(
            fqn=fqn,
            weight_qdata=torch.empty(weight.shape, dtype=torch.int8, device=device),
            weight_scale=torch.empty(weight.shape[0], dtype=torch.float32, device=device),
            weight_version=-1,
            num_outliers=len(channels),
            outlier_slots=torch.tensor(channels + [padding] * (slots - len(channels)), dtype=torch.long, device=device),
            outlier_weight=torch.zeros(weight.shape[0], slots, dtype=torch.float32, device=device),
            outlier_weight_absmax=torch.full((slots,), math.inf, dtype=torch.float32, device=device),
            smooth_scale=torch.ones(slots, dtype=torch.float32, device=device),
            transposed=transposed,
        )
        state.refresh_if_stale(parameter)
        return state

    def observe(self, weight: torch.Tensor, hits: torch.Tensor, calibration_steps: int) -> bool:
        """Record one training step's outlier hits; returns whether the channels became fixed now.

        The step's top channels (most hits first, at most one per slot) go
        into the stability monitor. Until the channels are fixed, the hits add
        up and the channels follow the running counts, keeping the
        `smooth_scale` of channels that stay.
        """
        slots = self.outlier_slots.numel()
        hits = hits.detach().to("cpu", torch.long)
        current = set(self.outlier_channels)
        top = set(_top_channels(hits, slots))
        union = top | current
        self.stability.append(len(top & current) / len(union) if union else 1.0)
        if self.channels_fixed:
            return False

        self.hit_counts = hits if self.hit_counts is None else self.hit_counts + hits
        self.calibration_steps += 1
        channels = _top_channels(self.hit_counts, slots)
        if sorted(channels) != self.outlier_channels:
            kept = dict(zip(self.outlier_channels, self.smooth_scale[: self.num_outliers].tolist()))
            self.assign_outliers(weight, channels, [kept.get(channel, 1.0) for channel in channels])
        self.channels_fixed = self.calibration_steps >= calibration_steps
        return self.channels_fixed

    def start_smooth_scale(self, input_absmax: torch.Tensor) -> None:
        """Set `smooth_scale` from one batch's max |x| per input channel, so eval-only use is smoothed too."""
        count = self.num_outliers
        if not count:
            return
        x_absmax = input_absmax.to(self.smooth_scale.device)[self.outlier_slots[:count]]
        start = torch.sqrt(x_absmax / self.outlier_weight_absmax[:count]).clamp_min(1.0)
        smooth_scale = self.smooth_scale.clone()
        smooth_scale[:count] = torch.where(torch.isfinite(start), start, torch.ones_like(start))
        self.smooth_scale = smooth_scale

    def restore(self, weight: torch.Tensor, entry: dict) -> None:
        """Restore what `quaff_compile.state_dict` saved for this layer."""
        self.assign_outliers(weight, list(entry["outlier_channels"]), list(entry["smooth_scale"]))
        self.updates = int(entry.get("updates", self.updates))
        self.calibration_steps = int(entry.get("calibration_steps", self.calibration_steps))
        # Entries without calibration progress hold channels chosen elsewhere: keep them.
        self.channels_fixed = bool(entry.get("channels_fixed", True))
        hit_counts = entry.get("hit_counts")
        self.hit_counts = None if hit_counts is None else torch.tensor(hit_counts, dtype=torch.long)
        self.stability = list(entry.get("stability", []))

    def assign_outliers(self, weight: torch.Tensor, outlier_channels: list[int], smooth_scale: list[float]) -> None:
        """Replace the outlier channels and their `smooth_scale` in place, keeping the slot count."""
        slots = self.outlier_slots.numel()
        if len(smooth_scale) != len(outlier_channels):
            raise QuaffInputError(
                f"{self.fqn}: {len(outlier_channels)} outlier channels but {len(smooth_scale)} smooth scales"
            )
        if len(outlier_channels) > slots:
            raise QuaffInputError(
                f"{self.fqn}: {len(outlier_channels)} outlier channels do not fit its {slots} slots; "
                "compile with a larger outlier_max_ratio"
            )
        fresh = LayerState.from_weight(self.fqn, weight, outlier_channels, slots, self.transposed)
        order = {channel: value for channel, value in zip(outlier_channels, smooth_scale)}
        fresh.smooth_scale[: fresh.num_outliers] = torch.tensor(
            [order[channel] for channel in fresh.outlier_channels], dtype=torch.float32
        )
        for name in ("outlier_slots", "outlier_weight", "outlier_weight_absmax", "smooth_scale"):
            setattr(self, name, getattr(fresh, name))
        self.num_outliers = fresh.num_outliers

    def note_offloaded(self, weight: torch.Tensor) -> None:
        """Record that `weight` now contains the same values in a memory-mapped file, so it is not stale."""
        self.weight_version = weight._version
        self.weight_pointer = weight.data_ptr()
        self.offloaded = True

    def refresh_if_stale(self, weight: torch.Tensor) -> bool:
        """Quantize the weight again, in place, when its data changed since the last time.

        An in-place change (`load_state_dict`, `copy_`) bumps the tensor's
        version counter. Changes through `.data`, which PEFT's adapter merge
        uses, bump nothing, so this also compares the storage pointer and a
        sample of 256 weights (`_weight_sample`). Returns whether anything was quantized.
        """
        sample = _weight_sample(weight)
        same_storage = weight.data_ptr() == self.weight_pointer
        if self.offloaded and same_storage:
            # Reading the sample mapped some pages of the file: hand them back.
            page_out(weight)
        self.offloaded = self.offloaded and same_storage
        if weight._version == self.weight_version and same_storage and torch.equal(sample, self.weight_sample):
            return False
        with torch.no_grad():
            linear_weight = self.linear_weight(weight.detach())
            weight_qdata, weight_scale = quantize_weight_per_channel(linear_weight)
            self.weight_qdata = weight_qdata
            self.weight_scale = weight_scale.float()
            if self.num_outliers:
                real = self.outlier_slots[: self.num_outliers]
                columns = linear_weight.index_select(1, real).float()
                self.outlier_weight = self.outlier_weight.clone()
                self.outlier_weight[:, : self.num_outliers] = columns
                # A zero column would give s_new = inf; it contributes nothing, so
                # any finite divisor serves.
                self.outlier_weight_absmax = self.outlier_weight_absmax.clone()
                self.outlier_weight_absmax[: self.num_outliers] = columns.abs().amax(dim=0).clamp_min(1e-12)
        if self.weight_version != -1:
            log.debug("quantized %s again after its weight changed", self.fqn)
        self.weight_version = weight._version
        self.weight_pointer = weight.data_ptr()
        self.weight_sample = sample
        return True


SAMPLE_BLOCKS = 8
SAMPLE_BLOCK_SIZE = 32


def _weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """Return 8 runs of 32 weights spread over the whole tensor, as a cheap change detector.

    Runs of neighbours, instead of single weights far apart, read fewer
    memory pages of a weight offloaded to a file.
    """
    flat = weight.detach().reshape(-1)
    if flat.numel() <= SAMPLE_BLOCKS * SAMPLE_BLOCK_SIZE:
        return flat.clone()
    last = flat.numel() - SAMPLE_BLOCK_SIZE
    starts = [index * last // (SAMPLE_BLOCKS - 1) for index in range(SAMPLE_BLOCKS)]
    return torch.cat([flat[start:start + SAMPLE_BLOCK_SIZE] for start in starts])


def _top_channels(counts: torch.Tensor, limit: int) -> list[int]:
    order = torch.sort(counts, descending=True, stable=True)
    keep = int((order.values[:limit] > 0).sum())
    return order.indices[:keep].tolist()


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Entries of `load_state_dict` for weights that have no state yet; the backend
# uses them when it creates the state.
_PRESETS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def get_layer_state(weight: torch.Tensor) -> LayerState | None:
    """Return the state of the linear whose frozen weight is `weight`, if any."""
    return _STATES.get(weight)


def set_layer_state(weight: torch.Tensor, state: LayerState) -> None:
    _STATES[weight] = state


def take_preset(weight: torch.Tensor) -> dict | None:
    """Return and forget the `load_state_dict` entry waiting for `weight`, if any."""
    return _PRESETS.pop(weight, None)


def load_state_dict(model: torch.nn.Module, state: dict[str, dict]) -> None:
    """Restore outlier channels and smooth scales saved by `quaff_compile.state_dict`, before or after compiling.

    Fqns match through PEFT's wrapping. An fqn that names no linear weight of
    `model` raises ValueError.
    """
    from quaff_compile.calibration import normalize_fqn

    weights = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        module_fqn, _, attribute = name.rpartition(".")
        if attribute == "weight" and parameter.dim() == 2:
            weights[normalize_fqn(module_fqn)] = parameter
    unknown = sorted(fqn for fqn in state if normalize_fqn(fqn) not in weights)
    if unknown:
        raise QuaffInputError(f"the Quaff state names layers that {type(model).__name__} does not have: {unknown[:5]}")

    for fqn, entry in state.items():
        weight = weights[normalize_fqn(fqn)]
        existing = _STATES.get(weight)
        if existing is None:
            _PRESETS[weight] = dict(entry)
            continue
        existing.restore(weight, entry)


def layer_states(model: torch.nn.Module) -> dict[str, LayerState]:
    """Return the Quaff state of every quantized linear of `model`, by module fqn in `model`.

    The fqn is the owning module's name, or the parameter's own name for a
    weight used through `F.linear` under another attribute name.
    """
    states = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        state = _STATES.get(parameter)
        if state is None:
            continue
        # torch.compile's wrapper adds `_orig_mod.` to the names of the model it wraps.
        name = ".".join(part for part in name.split(".") if part != "_orig_mod")
        module_fqn, _, attribute = name.rpartition(".")
        states[module_fqn if attribute == "weight" else name] = state
    return states


def stability_report(model: torch.nn.Module) -> dict[str, list[float]]:
    """Return, per quantized linear with outlier slots, the Jaccard overlap of each training step's
    top outlier channels with the layer's channels."""
    return {fqn: list(state.stability) for fqn, state in layer_states(model).items() if state.outlier_slots.numel()}
