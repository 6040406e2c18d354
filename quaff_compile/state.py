"""Per-layer Quaff state, kept outside any compiled graph.

Each quantized linear gets one `LayerState`, keyed by the identity of its
frozen weight parameter. Keying by the parameter (through a weak reference)
scopes the state to one model, lets it survive recompiles of any graph that
uses the layer, and frees it together with the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from quaff_compile.numerics import quantize_weight_per_channel

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LayerState:
    """Int8 weight, outlier channels and running `smooth_scale` of one linear.

    The tensors are passed to every compiled graph that uses the layer, so
    they are updated in place and never replaced.
    """

    fqn: str
    weight_qdata: torch.Tensor
    weight_scale: torch.Tensor
    weight_version: int
    outlier_channels: torch.Tensor
    outlier_weight: torch.Tensor
    outlier_weight_absmax: torch.Tensor
    smooth_scale: torch.Tensor
    updates: int = 0

    @property
    def has_outliers(self) -> bool:
        return self.outlier_channels.numel() > 0

    @classmethod
    def from_weight(cls, fqn: str, weight: torch.Tensor, outlier_channels: list[int]) -> LayerState:
        """Quantize `weight` once and set up `smooth_scale` = 1 on `outlier_channels`."""
        weight = weight.detach()
        weight_qdata, weight_scale = quantize_weight_per_channel(weight)
        channels = torch.tensor(sorted(outlier_channels), dtype=torch.long, device=weight.device)
        outlier_weight = weight.index_select(1, channels).float()
        # A column of zeros would give s_new = inf; its outlier channel then
        # contributes nothing, so any finite divisor is as good.
        outlier_weight_absmax = outlier_weight.abs().amax(dim=0).clamp_min(1e-12) if channels.numel() else (
            torch.zeros(0, device=weight.device)
        )
        return cls(
            fqn=fqn,
            weight_qdata=weight_qdata,
            weight_scale=weight_scale,
            weight_version=weight._version,
            outlier_channels=channels,
            outlier_weight=outlier_weight,
            outlier_weight_absmax=outlier_weight_absmax,
            smooth_scale=torch.ones(channels.numel(), dtype=torch.float32, device=weight.device),
        )

    def refresh_if_stale(self, weight: torch.Tensor) -> bool:
        """Requantize in place when the weight's data changed since the last quantization.

        An in-place change (`load_state_dict`, `copy_`, a merge of adapters)
        bumps the tensor's version counter, which is what this compares.
        Returns whether anything was requantized.
        """
        if weight._version == self.weight_version:
            return False
        with torch.no_grad():
            weight = weight.detach()
            weight_qdata, weight_scale = quantize_weight_per_channel(weight)
            self.weight_qdata.copy_(weight_qdata)
            self.weight_scale.copy_(weight_scale)
            if self.has_outliers:
                outlier_weight = weight.index_select(1, self.outlier_channels).float()
                self.outlier_weight.copy_(outlier_weight)
                self.outlier_weight_absmax.copy_(outlier_weight.abs().amax(dim=0).clamp_min(1e-12))
        self.weight_version = weight._version
        log.debug("requantized %s after its weight changed", self.fqn)
        return True


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def get_layer_state(weight: torch.Tensor) -> LayerState | None:
    """Return the state of the linear whose frozen weight is `weight`, if any."""
    return _STATES.get(weight)


def set_layer_state(weight: torch.Tensor, state: LayerState) -> None:
    _STATES[weight] = state


def layer_states(model: torch.nn.Module) -> dict[str, LayerState]:
    """Return the Quaff state of every quantized linear of `model`, by module fqn."""
    states = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        state = _STATES.get(parameter)
        if state is not None:
            module_fqn = name.rsplit(".", 1)[0] if "." in name else ""
            states[module_fqn] = state
    return states
