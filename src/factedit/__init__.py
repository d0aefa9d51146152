"""factedit: locate and edit facts inside language models.

    from factedit import Editor, Request, load_model
    editor = Editor(*load_model())                       # embedded SmolLM2-135M-Instruct
    editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"))
"""

from .core.arch import ArchSpec, ModelAdapter
from .edit.deltas import AppliedEdit, LayerDelta, apply_deltas
from .editor import EditResult, Editor
from .core.errors import FactEditError
from .core.lm import greedy_continuation, target_probabilities
from .edit.guard import CollapseError, GuardConfig
from .patch.files import Patch, PatchError, apply_patch, apply_patches, revert_patch
from .patch.gguf import export_gguf
from .patch.peft import export_peft, import_peft
from .edit.methods import METHODS, BatchConfig, FTConfig, ROMEConfig
from .core.models import DEFAULT_MODEL, load_model, save_model
from .core.requests import Request
from .core.version import __version__
from .stats.layer import LayerStats, SecondMoment, layer_stats
from .edit.values import ValueConfig


__all__ = [
    "ArchSpec", "ModelAdapter", "AppliedEdit", "LayerDelta", "apply_deltas", "EditResult", "Editor",
    "FactEditError", "greedy_continuation", "target_probabilities", "METHODS", "ROMEConfig", "BatchConfig",
    "FTConfig", "CollapseError", "GuardConfig", "Patch", "PatchError", "apply_patch", "apply_patches",
    "revert_patch", "export_peft", "import_peft", "export_gguf", "DEFAULT_MODEL", "load_model", "save_model", "Request", "LayerStats", "SecondMoment", "layer_stats", "ValueConfig",
    "__version__",
]
