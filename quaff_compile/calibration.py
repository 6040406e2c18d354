"""Offline outlier calibration, outlier-channel files, and saving the Quaff state.

`calibrate` runs a model over calibration batches and returns the outlier
channels of each linear by fqn. The result can be passed to the backend as
`options={"outlier_channels": ...}`, directly or through a file:
`save_outlier_channels` writes JSON, and `load_outlier_channels` also reads
the method's reference format, a `torch.save`d dict from fqn to channel list.

Fqns are compared after removing PEFT's wrapping (a leading
`base_model.model.` and a trailing `.base_layer`), so channels calibrated on a
bare model apply to the same model wrapped by PEFT and the other way round.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from quaff_compile.state import layer_states

log = logging.getLogger(__name__)

STRATEGIES = ("mean_times", "top_abs", "zscore", "static")
FILE_FORMAT = "quaff_compile.outlier_channels"
PEFT_PREFIX = "base_model.model."
PEFT_SUFFIX = ".base_layer"


def normalize_fqn(fqn: str) -> str:
    """Return `fqn` without PEFT's `base_model.model.` prefix and `.base_layer` suffix."""
    fqn = fqn.replace("_orig_mod.", "")
    if fqn.startswith(PEFT_PREFIX):
        fqn = fqn[len(PEFT_PREFIX):]
    if fqn.endswith(PEFT_SUFFIX):
        fqn = fqn[: -len(PEFT_SUFFIX)]
    return fqn


def ratio_for(fqn: str, max_ratio: float | Mapping[str, float]) -> float:
    """Return the ratio for `fqn`: a number as given, or the value of the longest matching fqn prefix."""
    if not isinstance(max_ratio, Mapping):
        return float(max_ratio)
    name = normalize_fqn(fqn)
    matching = [prefix for prefix in max_ratio if name.startswith(normalize_fqn(prefix))]
    if not matching:
        return 0.0
    return float(max_ratio[max(matching, key=len)])


def channel_hits(x: torch.Tensor, strategy: str, threshold: float, max_ratio: float) -> torch.Tensor:
    """Return, per input channel of `x` [..., in_features], how many elements the strategy flags."""
    magnitude = x.detach().reshape(-1, x.shape[-1]).float()
    if strategy == "mean_times":
        absolute = magnitude.abs()
        return (absolute > threshold * absolute.mean()).sum(dim=0)
    if strategy == "static":
        return (magnitude.abs() > threshold).sum(dim=0)
    if strategy == "zscore":
        std = magnitude.std()
        if not std > 0:
            return torch.zeros(magnitude.shape[1], dtype=torch.long)
        return ((magnitude - magnitude.mean()).abs() / std > threshold).sum(dim=0)
    if strategy == "top_abs":
        count = math.floor(max_ratio * magnitude.shape[1])
        hits = torch.zeros(magnitude.shape[1], dtype=torch.long)
        if count:
            hits[magnitude.abs().amax(dim=0).topk(count).indices] = 1
        return hits
    raise ValueError(f"unknown calibration strategy {strategy!r}; choose one of {STRATEGIES}")


def _batch_call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    strategy: str = "mean_times",
    threshold: float = 100.0,
    max_ratio: float | Mapping[str, float] = 0.01,
) -> dict[str, list[int]]:
    """Return the outlier channels of every linear of `model`, by fqn, most frequent first.

    Each batch is a tuple of positional arguments or a dict of keyword
    arguments for the model. Hits are counted over all batches, and each layer
    keeps at most `floor(ratio * in_features)` channels that were hit at least
    once. The model runs in eval mode under `no_grad` and is left in the mode
    it was in.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown calibration strategy {strategy!r}; choose one of {STRATEGIES}")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    hits: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def hook(module, inputs):
            ratio = ratio_for(name, max_ratio)
            counted = channel_hits(inputs[0], strategy, threshold, ratio).cpu()
            hits[name] = hits[name] + counted if name in hits else counted

        return hook

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in linears.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=None):
                _batch_call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    channels = {}
    for name, counts in hits.items():
        limit = math.floor(ratio_for(name, max_ratio) * counts.numel())
        order = torch.sort(counts, descending=True, stable=True)
        keep = int((order.values[:limit] > 0).sum())
        channels[name] = order.indices[:keep].tolist()
    return channels


def save_outlier_channels(channels: Mapping[str, list[int]], path: str | Path) -> Path:
    """Write outlier channels by fqn as JSON."""
    path = Path(path)
    document = {"format": FILE_FORMAT, "version": 1, "channels": {fqn: list(map(int, c)) for fqn, c in channels.items()}}
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load_outlier_channels(path: str | Path) -> dict[str, list[int]]:
    """Read outlier channels from our JSON format or the reference `torch.save` format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"outlier channel file {path} was not found")
    if path.suffix == ".json":
        document = json.loads(path.read_text())
        channels = document.get("channels", document) if isinstance(document, dict) else None
    else:
        channels = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(channels, Mapping):
        raise ValueError(f"{path} does not hold a mapping from fqn to a list of channel indices")
    return {str(fqn): [int(channel) for channel in list(values)] for fqn, values in channels.items()}


def resolve_outlier_channels(source: Mapping[str, list[int]] | str | Path) -> dict[str, list[int]]:
    """Return a mapping from normalized fqn to channels, from a mapping or a file path."""
    channels = load_outlier_channels(source) if isinstance(source, (str, Path)) else source
    return {normalize_fqn(fqn): [int(channel) for channel in values] for fqn, values in channels.items()}


def state_dict(model: torch.nn.Module) -> dict[str, dict]:
    """Return each quantized linear's outlier channels, current `smooth_scale` and calibration progress, by fqn."""
    return {
        fqn: {
            "outlier_channels": state.outlier_channels,
            "smooth_scale": state.smooth_scale[: state.num_outliers].tolist(),
            "updates": state.updates,
            "calibration_steps": state.calibration_steps,
            "channels_fixed": state.channels_fixed,
            "hit_counts": None if state.hit_counts is None else state.hit_counts.tolist(),
            "stability": list(state.stability),
        }
        for fqn, state in layer_states(model).items()
    }
