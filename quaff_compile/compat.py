"""Tracing helpers for library code that Dynamo in torch 2.13 cannot trace.

peft 0.21's `dequantize_module_weight`, which DoRA calls on every forward,
tests `type(module.weight).__module__.startswith("torchao.")`. Dynamo cannot
trace `type(parameter).__module__`, so it runs the whole PEFT forward eagerly
and every DoRA layer stays in float, whatever the backend. The substitute
below covers the common case, a plain `nn.Parameter` weight on a module
without HQQ's `W_q`: like peft, it returns the weight itself. Every other case
goes to peft's own function. It changes only how Dynamo
traces that function; eager code still calls peft's.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_REGISTERED = False


def register_tracing_substitutes() -> None:
    """Register the substitutes once per process; a missing peft or a refusal is logged and skipped."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    try:
        from peft.utils import integrations
    except ImportError:
        return
    original = getattr(integrations, "dequantize_module_weight", None)
    if original is None:
        return

    def dequantize_module_weight(module: torch.nn.Module):
        weight = getattr(module, "weight", None)
        if type(weight) is torch.nn.Parameter and not hasattr(module, "W_q"):
            return weight
        return original(module)

    try:
        torch._dynamo.substitute_in_graph(original)(dequantize_module_weight)
    except Exception as error:  # noqa: BLE001 - DoRA then runs in float, as without this module
        log.debug("could not register the Dynamo substitute for peft's dequantize_module_weight: %s", error)
