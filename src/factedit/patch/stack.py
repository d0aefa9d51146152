"""An edit history as files: one patch per applied edit, in order, plus ``stack.json``.

    save_stack(editor.history, editor.adapter, "edits/")      # 00000-r-rome.safetensors, ..., stack.json
    results = load_stack(adapter, "edits/")                    # applied (all or nothing), revertible
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

from ..core.paths import atomic_write_text
from ..edit.results import EditResult
from .files import Patch, PatchError, apply_patches

__all__ = ["save_stack", "save_patches", "stack_files", "load_stack", "apply_as_results"]


def save_patches(patches: Sequence[Patch], directory) -> List[str]:
    """Write ``patches`` (oldest first) as patch files plus ``stack.json`` naming them in order."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for i, p in enumerate(patches):
        name = f"{i:05d}-{p.meta.get('method', 'patch')}.safetensors"
        p.save(d / name)
        names.append(name)
    atomic_write_text(d / "stack.json", json.dumps({"patches": names}))
    return names


def save_stack(results: Sequence[EditResult], adapter, directory) -> List[str]:
    """Write ``results`` (oldest first) as a stack of patches (:func:`save_patches`)."""
    return save_patches([Patch.from_result(r, adapter) for r in results], directory)


def stack_files(directory) -> List[Path]:
    """The patch files of a stack written by :func:`save_stack`, in order (``stack.json``)."""
    d = Path(directory)
    try:
        names = json.loads((d / "stack.json").read_text(encoding="utf-8"))["patches"]
        if not (isinstance(names, list) and all(isinstance(n, str) and "/" not in n for n in names)):
            raise ValueError(names)
    except (OSError, ValueError, KeyError, TypeError):
        raise PatchError(f"{d}: not a factedit history (stack.json missing or malformed)") from None
    return [d / n for n in names]


def load_stack(adapter, directory, force: bool = False) -> List[EditResult]:
    """Apply a stack written by :func:`save_stack` (all or nothing; each patch checked against the
    model as left by the previous) and return one revertible :class:`EditResult` per patch."""
    return apply_as_results(adapter, [Patch.load(f) for f in stack_files(directory)], force)


def apply_as_results(adapter, patches: Sequence[Patch], force: bool = False) -> List[EditResult]:
    """Apply ``patches`` in order (all or nothing, :func:`~factedit.patch.files.apply_patches`) and return
    one revertible :class:`EditResult` per patch, as an editor's history holds them."""
    applied = apply_patches(adapter, patches, force=force)
    return [p.to_result(a) for p, a in zip(patches, applied)]
