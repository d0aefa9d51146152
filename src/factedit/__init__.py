"""factedit: locate and edit facts inside language models.

    from factedit import Editor, Request, load_model
    editor = Editor(*load_model())                       # embedded SmolLM2-135M-Instruct
    editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"))
"""

from .core.arch import ArchSpec, ModelAdapter
from .core.errors import FactEditError
from .core.lm import greedy_continuation, target_probabilities
from .core.models import DEFAULT_MODEL, load_model, save_model
from .core.requests import Request
from .core.version import __version__
from .edit.deltas import AppliedEdit, LayerDelta, apply_deltas
from .edit.guard import CollapseError, GuardConfig
from .edit.methods import METHODS, BatchConfig, FTConfig, MethodOptions, MethodSpec, ROMEConfig, register
from .edit.values import ValueConfig
from .editor import Editor, EditResult
from .patch.files import Patch, PatchError, apply_patch, apply_patches, revert_patch
from .patch.gguf import export_gguf
from .patch.peft import export_peft, import_peft
from .stats.layer import LayerStats, SecondMoment, layer_stats

__all__ = [
    "ArchSpec", "ModelAdapter", "AppliedEdit", "LayerDelta", "apply_deltas", "EditResult", "Editor",
    "FactEditError", "greedy_continuation", "target_probabilities", "METHODS", "MethodOptions", "MethodSpec",
    "register", "ROMEConfig", "BatchConfig",
    "FTConfig", "CollapseError", "GuardConfig", "Patch", "PatchError", "apply_patch", "apply_patches",
    "revert_patch", "export_peft", "import_peft", "export_gguf", "DEFAULT_MODEL", "load_model", "save_model", "Request",
    "LayerStats", "SecondMoment", "layer_stats", "ValueConfig",
    "__version__",
]
