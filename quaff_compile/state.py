"""Per-layer Quaff state, kept outside any compiled graph.

Each quantized linear gets one `LayerState`, keyed by the identity of its
frozen weight parameter. Keying by the parameter (through a weak reference)
scopes the state to one model, lets it survive recompiles of any graph that
uses the layer, and frees it together with the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from quaff_compile.numerics import quantize_weight_per_channel

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
    their correction term to 0. The tensors are updated in place, never
    replaced, because compiled graphs receive them on every call.
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

    @classmethod
    def from_weight(cls, fqn: str, weight: torch.Tensor, outlier_channels: list[int], slots: int) -> LayerState:
        """Quantize `weight` once and set up `smooth_scale` = 1 on `outlier_channels`."""
        in_features = weight.shape[1]
        channels = sorted(set(outlier_channels))[:slots]
        bad = [channel for channel in channels if not 0 <= channel < in_features]
        if bad:
            raise ValueError(f"{fqn}: outlier channels {bad} are out of range for {in_features} input channels")
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
        )
        state.refresh_if_stale(weight)
        return state

    def refresh_if_stale(self, weight: torch.Tensor) -> bool:
        """Quantize the weight again, in place, when its data changed since the last time.

        An in-place change (`load_state_dict`, `copy_`, a merge of adapters)
        bumps the tensor's version counter, which is what this compares.
        Returns whether anything was quantized.
        """
        if weight._version == self.weight_version:
            return False
        with torch.no_grad():
            weight = weight.detach()
            weight_qdata, weight_scale = quantize_weight_per_channel(weight)
            self.weight_qdata.copy_(weight_qdata)
            self.weight_scale.copy_(weight_scale)
            if self.num_outliers:
                real = self.outlier_slots[: self.num_outliers]
                columns = weight.index_select(1, real).float()
                self.outlier_weight[:, : self.num_outliers].copy_(columns)
                # A zero column would give s_new = inf; it contributes nothing, so
                # any finite divisor serves.
                self.outlier_weight_absmax[: self.num_outliers].copy_(columns.abs().amax(dim=0).clamp_min(1e-12))
        if self.weight_version != -1:
            log.debug("quantized %s again after its weight changed", self.fqn)
        self.weight_version = weight._version
        return True


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def get_layer_state(weight: torch.Tensor) -> LayerState | None:
    """Return the state of the linear whose frozen weight is `weight`, if any."""
    return _STATES.get(weight)


def set_layer_state(weight: torch.Tensor, state: LayerState) -> None:
    _STATES[weight] = state


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
