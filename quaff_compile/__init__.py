"""quaff_compile: Quaff quantized fine-tuning as a `torch.compile` backend.

`torch.compile(model, backend="quaff")` lowers every linear with a frozen
weight to an int8 linear with outlier-channel momentum scaling (Huang and Wu,
"Quantized Parameter-Efficient Fine-Tuning under Outlier Spatial Stability
Hypothesis", ACL 2025) and compiles the rest with Inductor.
"""

from quaff_compile.backend import quaff_backend
from quaff_compile.calibration import calibrate, load_outlier_channels, save_outlier_channels, state_dict
from quaff_compile.config import QuaffConfig
from quaff_compile.inspection import ExplainReport, explain
from quaff_compile.state import LayerState, layer_states, load_state_dict, stability_report

__all__ = [
    "ExplainReport",
    "LayerState",
    "QuaffConfig",
    "calibrate",
    "explain",
    "layer_states",
    "load_outlier_channels",
    "load_state_dict",
    "quaff_backend",
    "save_outlier_channels",
    "stability_report",
    "state_dict",
]
__version__ = "0.1.0"
