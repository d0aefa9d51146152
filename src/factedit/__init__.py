"""factedit: locate and edit facts inside language models.

    from factedit import Editor, Request, load_model
    editor = Editor(*load_model())                       # embedded SmolLM2-135M-Instruct
    editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"))
"""

from .arch import ArchSpec, ModelAdapter
from .delta import AppliedEdit, LayerDelta, apply_deltas
from .editor import EditResult, Editor
from .errors import FactEditError
from .generation import greedy_continuation, target_probabilities
from .guard import CollapseError, GuardConfig
from .patch import Patch, PatchError, apply_patch, apply_patches, revert_patch
from .methods import METHODS, BatchConfig, FTConfig, ROMEConfig
from .models import DEFAULT_MODEL, load_model, save_model
from .requests import Request
from .stats import LayerStats, SecondMoment, layer_stats
from .values import ValueConfig

__version__ = "0.1.0"

__all__ = [
    "ArchSpec", "ModelAdapter", "AppliedEdit", "LayerDelta", "apply_deltas", "EditResult", "Editor",
    "FactEditError", "greedy_continuation", "target_probabilities", "METHODS", "ROMEConfig", "BatchConfig",
    "FTConfig", "CollapseError", "GuardConfig", "Patch", "PatchError", "apply_patch", "apply_patches",
    "revert_patch", "DEFAULT_MODEL", "load_model", "save_model", "Request", "LayerStats", "SecondMoment", "layer_stats", "ValueConfig",
    "__version__",
]
