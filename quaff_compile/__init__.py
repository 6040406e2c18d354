"""quaff_compile: Quaff quantized fine-tuning as a `torch.compile` backend.

`torch.compile(model, backend="quaff")` lowers every linear with a frozen
weight to an int8 linear with outlier-channel momentum scaling (Huang and Wu,
"Quantized Parameter-Efficient Fine-Tuning under Outlier Spatial Stability
Hypothesis", ACL 2025) and compiles the rest with Inductor.
"""

from quaff_compile.backend import quaff_backend
from quaff_compile.config import QuaffConfig
from quaff_compile.inspection import ExplainReport, explain
from quaff_compile.state import LayerState, layer_states

__all__ = ["ExplainReport", "LayerState", "QuaffConfig", "explain", "layer_states", "quaff_backend"]
__version__ = "0.1.0"
