"""`QuaffConfig`: the options of the quaff backend, validated once at construction."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# How the int8 matrix product is computed. "int_mm" calls `torch._int_mm`.
# "emulated" computes the same int32 result with exact fp32 matmuls over chunks
# of the inner dimension (see `numerics.int8_matmul`). "auto" picks "int_mm"
# where the hardware has an int8 matrix unit and "emulated" elsewhere.
MATMUL_CHOICES = ("auto", "int_mm", "emulated")


class QuaffInputError(ValueError):
    """Bad input from the user (options, outlier channels, saved state).

    The backend's float fallback never hides it: it always reaches the user.
    """


@dataclass(frozen=True, kw_only=True)
class QuaffConfig:
    """Options of the quaff backend, passed as `torch.compile(..., options={...})`.

    Attributes:
        momentum: weight of the newest `smooth_scale` in its running update,
            `s <- momentum * s_new + (1 - momentum) * s_old`.
        outlier_threshold: a channel counts as an outlier where some |x|
            exceeds this many times the mean |x| of the layer's input.
        outlier_max_ratio: at most this share of a layer's input channels
            become outlier channels (rounded down).
        skip_fqns: linears whose fqn equals one of these names, or has one of
            them as a dotted component, stay in float (default: `lm_head`).
        filter_fn: when given, `filter_fn(module, fqn)` decides instead of
            `skip_fqns`; it returns True for linears to quantize. `module` is
            None where the backend cannot resolve the owning module.
        matmul: one of "auto", "int_mm" and "emulated" (see MATMUL_CHOICES).
        outlier_channels: outlier channels by fqn, as a mapping or the path of
            a file (`calibration.load_outlier_channels` formats). When given,
            no channels are chosen from batches, and a linear without an entry
            gets none. Fqns match through PEFT's wrapping.
        online_calibration_steps: without supplied channels, the outlier
            channels follow the hits of this many training forwards, then stay
            fixed.
        strict: when the pass fails on a graph, raise instead of compiling
            that graph with Inductor in float and warning once.
        offload_weights: False, True or a folder. When set, the float weight
            of each quantized CPU linear moves into a memory-mapped file in
            that folder (True: `~/.cache/quaff_compile/offload`), which
            frees its memory while keeping its values (see `offload.py`).
    """

    momentum: float = 0.9
    outlier_threshold: float = 100.0
    outlier_max_ratio: float = 0.01
    skip_fqns: tuple[str, ...] = ("lm_head",)
    filter_fn: Callable[[torch.nn.Module | None, str], bool] | None = None
    matmul: str = "auto"
    outlier_channels: Mapping[str, list[int]] | str | None = None
    online_calibration_steps: int = 8
    strict: bool = False
    offload_weights: bool | str | os.PathLike = False

    def __post_init__(self) -> None:
        if isinstance(self.skip_fqns, str) or not all(isinstance(name, str) for name in self.skip_fqns):
            raise ValueError(
                f"skip_fqns must be a sequence of module names such as ('lm_head',), got {self.skip_fqns!r}"
            )
        object.__setattr__(self, "skip_fqns", tuple(self.skip_fqns))
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum!r}")
        if not self.outlier_threshold > 0.0:
            raise ValueError(f"outlier_threshold must be positive, got {self.outlier_threshold!r}")
        if not 0.0 <= self.outlier_max_ratio < 1.0:
            raise ValueError(f"outlier_max_ratio must be in [0, 1), got {self.outlier_max_ratio!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"filter_fn must be callable as filter_fn(module, fqn), got {self.filter_fn!r}")
        if self.matmul not in MATMUL_CHOICES:
            raise ValueError(f"matmul must be one of {MATMUL_CHOICES}, got {self.matmul!r}")
        if not isinstance(self.online_calibration_steps, int) or self.online_calibration_steps < 1:
            raise ValueError(f"online_calibration_steps must be an integer of at least 1, got {self.online_calibration_steps!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False, got {self.strict!r}")
        if not isinstance(self.offload_weights, (bool, str, os.PathLike)) or self.offload_weights == "":
            raise ValueError(
                f"offload_weights must be True, False or a folder path, got {self.offload_weights!r}"
            )
        if isinstance(self.offload_weights, str) and self.offload_weights.lower() in ("true", "false"):
            raise ValueError(
                f"offload_weights got the string {self.offload_weights!r}, which would be a folder of that name; "
                "pass the boolean (offload_weights=true or false on the command line)"
            )
        if self.outlier_channels is not None:
            from quaff_compile.calibration import resolve_outlier_channels

            if not isinstance(self.outlier_channels, (Mapping, str, os.PathLike)):
                raise ValueError(
                    "outlier_channels must be a mapping from fqn to channel indices or a file path, "
                    f"got {type(self.outlier_channels).__name__}"
                )
            object.__setattr__(self, "outlier_channels", resolve_outlier_channels(self.outlier_channels))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> QuaffConfig:
        """Build a config from `torch.compile` options, rejecting unknown keys."""
        options = dict(options or {})
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, n=1)) else repr(key)
                for key in unknown
            ]
            raise ValueError(f"unknown quaff backend option(s) {', '.join(hints)}; known options are {known}")
        return cls(**options)

    def offload_folder(self):
        """Return the folder for offloaded float weights, or None when they stay in memory."""
        from pathlib import Path

        from quaff_compile.offload import default_folder

        if self.offload_weights is False:
            return None
        if self.offload_weights is True:
            return default_folder()
        return Path(self.offload_weights).expanduser()

    def should_quantize(self, module: torch.nn.Module | None, fqn: str) -> bool:
        """Return whether the linear at `fqn` passes the user's filter."""
        if self.filter_fn is not None:
            return bool(self.filter_fn(module, fqn))
        components = fqn.split(".")
        return not any(name == fqn or name in components for name in self.skip_fqns)
