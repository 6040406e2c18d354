"""An eager, module-swap port of the Quaff linear, for comparison with the compiled backend.

This is the method as a plain-torch module that replaces each frozen
`nn.Linear` under a PEFT LoRA layer, like the authors' reference code does.
It runs the same numerics as the backend (`quaff_compile.numerics`) without
torch.compile, so the step benchmark can show what compiling adds. Like the
reference code, it keeps only the int8 weight, its scales and the outlier
columns: the float weight is gone, and so is any way to save or merge it.
"""

from __future__ import annotations

import torch

from quaff_compile import numerics
from quaff_compile.state import _top_channels, outlier_slots


class EagerQuaffLinear(torch.nn.Module):
    """Frozen linear as int8 values with per-channel scales and momentum-smoothed outlier channels."""

    def __init__(self, linear: torch.nn.Linear, max_ratio: float, threshold: float, momentum: float, matmul: str):
        super().__init__()
        weight = linear.weight.detach().float()
        weight_qdata, weight_scale = numerics.quantize_weight_per_channel(weight)
        self.register_buffer("weight_qdata", weight_qdata)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.slots = outlier_slots(weight.shape[1], max_ratio)
        self.threshold = threshold
        self.momentum = momentum
        self.matmul = matmul
        # The outlier columns are kept from the float weight, which is then dropped.
        self._weight_for_calibration = weight if self.slots else None
        self.outlier_channels = None

    def _calibrate(self, x: torch.Tensor) -> None:
        """Choose the outlier channels from the first batch, as the backend does without `outlier_channels`."""
        hits = numerics.outlier_hits(x, self.threshold)
        channels = sorted(_top_channels(hits, self.slots))
        weight = self._weight_for_calibration
        self._weight_for_calibration = None
        if not channels:
            self.slots = 0
            return
        self.outlier_channels = torch.tensor(channels, dtype=torch.long)
        self.outlier_weight = weight[:, channels].contiguous()
        self.outlier_weight_absmax = self.outlier_weight.abs().amax(dim=0).clamp_min(1e-12)
        self.smooth_scale = torch.ones(len(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slots and self.outlier_channels is None:
            self._calibrate(x)
        if self.outlier_channels is None:
            return numerics.quaff_linear(x, self.weight_qdata, self.weight_scale, self.bias, self.matmul)
        training = self.training and torch.is_grad_enabled()
        y, used, _ = numerics.smoothed_quaff_linear(
            x,
            self.weight_qdata,
            self.weight_scale,
            self.bias,
            self.outlier_channels,
            self.outlier_weight,
            self.outlier_weight_absmax,
            self.smooth_scale,
            torch.tensor(training),
            self.momentum,
            self.matmul,
            self.threshold,
        )
        if training:
            self.smooth_scale = used.detach()
        return y


def swap_frozen_linears(model: torch.nn.Module, skip=("lm_head",), max_ratio=0.01, threshold=100.0, momentum=0.9):
    """Replace the frozen base linear of every PEFT LoRA layer by an `EagerQuaffLinear`; return how many."""
    from peft.tuners.lora import LoraLayer

    device = next(model.parameters()).device
    matmul = "int_mm" if numerics.int_mm_is_fast(device) else "emulated"
    swapped = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or any(part in skip for part in name.split(".")):
            continue
        base = module.base_layer
        if not isinstance(base, torch.nn.Linear) or base.weight.requires_grad:
            continue
        if numerics.int_mm_refusal(base.in_features, base.out_features) is not None:
            continue
        module.base_layer = EagerQuaffLinear(base, max_ratio, threshold, momentum, matmul)
        swapped += 1
    return swapped
