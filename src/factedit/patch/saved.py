"""What a saved edited model carries beside its weights: which patches were applied to it
(``factedit-provenance.json``) and the few original values a subtraction cannot give back
(``factedit-undo.safetensors``), so that ``factedit revert`` restores the base bit for bit.

Adding Δ to W in the weights' dtype rounds: ``(W + Δ) − Δ`` differs from ``W`` in a few percent of the
entries (35,348 of 884,736 in one embedded-model edit, by up to 3e-8). When a patch is applied for a saved
model, the subtraction is tried right away, on the spot (the weights come back bit for bit after the try),
and the entries it gets wrong are kept with their original values; ``revert`` subtracts and puts them back.

    applied, undo = apply_with_undo(adapter, patches)          # what `apply --save-model` does
    write_records(folder, provenance, undo)                     # beside the saved weights
    exact = revert_patches(adapter, patches, undo=load_undo(folder))    # factedit.patch.files
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from ..core.fingerprints import matrix_fingerprint
from ..core.paths import atomic_path, atomic_write_text
from ..edit.deltas import apply_deltas
from .files import Patch, PatchError, apply_patch, negated

__all__ = ["PROVENANCE", "UNDO", "UndoEntry", "undo_of_applied", "apply_with_undo", "load_undo", "save_undo",
           "load_provenance", "write_provenance", "records_of", "write_records", "with_applied", "without_reverted"]

PROVENANCE = "factedit-provenance.json"
UNDO = "factedit-undo.safetensors"
_FORMAT = "factedit.undo.v1"


@dataclass
class UndoEntry:
    """The entries of one matrix that subtracting one patch does not give back.

    Attributes:
        module: the edited matrix's name.
        fingerprint_after: the matrix right after the patch (what it must be before the subtraction).
        fingerprint_before: the matrix before the patch (what the subtraction plus this entry gives).
        index: flat positions (int64) of the stored matrix (as stored: transposed for ``fan_in_fan_out``).
        values: the original values there, in the matrix's dtype.
    """

    module: str
    fingerprint_after: str
    fingerprint_before: str
    index: torch.Tensor
    values: torch.Tensor


def undo_of_applied(adapter, patch: Patch, applied) -> List[UndoEntry]:
    """For a just-applied patch: subtract it on the spot, note where that misses the original, and put the
    applied weights back (bit for bit)."""
    out = []
    after = {layer: adapter.w_out_stored(layer).clone() for layer in applied.originals}
    trial = apply_deltas(adapter, negated(patch))
    try:
        for layer, before in applied.originals.items():
            got = adapter.w_out_stored(layer).to(before.device)
            wrong = (got != before).reshape(-1).nonzero().reshape(-1)
            out.append(UndoEntry(adapter.w_out_name(layer), matrix_fingerprint(after[layer]),
                                 matrix_fingerprint(before), wrong.cpu(), before.reshape(-1)[wrong].cpu()))
    finally:
        trial.revert()
    return out


def apply_with_undo(adapter, patches: Sequence[Patch], force: bool = False, before=None
                    ) -> Tuple[list, List[UndoEntry]]:
    """Apply ``patches`` in order (as :func:`~factedit.patch.files.apply_patches`: all or nothing) and return
    ``(applied, undo entries)``. ``before(patch)``, when given, runs on the model as the earlier patches left
    it, before each patch is applied; what it raises undoes them all."""
    done, undo = [], []
    try:
        for p in patches:
            if before is not None:
                before(p)
            a = apply_patch(adapter, p, force)
            done.append(a)
            undo += undo_of_applied(adapter, p, a)
    except BaseException:
        for a in reversed(done):
            a.revert()
        raise
    return done, undo


def save_undo(path, entries: Sequence[UndoEntry]) -> None:
    """Write undo entries (safetensors + JSON; atomic)."""
    from safetensors.torch import save_file

    tensors, meta = {}, []
    for i, u in enumerate(entries):
        tensors[f"{i}.index"] = u.index.to(torch.int64).contiguous()
        tensors[f"{i}.values"] = u.values.contiguous()
        meta.append({"module": u.module, "fingerprint_after": u.fingerprint_after,
                     "fingerprint_before": u.fingerprint_before})
    with atomic_path(Path(path), suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "entries": json.dumps(meta)})


def load_undo(folder) -> List[UndoEntry]:
    """The undo entries kept in a saved model's folder (none: ``[]``); a damaged file is a clear error."""
    from safetensors import safe_open

    path = Path(folder) / UNDO
    if not path.is_file():
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}")
            entries = json.loads(meta["entries"])
            return [UndoEntry(e["module"], e["fingerprint_after"], e["fingerprint_before"], f.get_tensor(f"{i}.index"),
                              f.get_tensor(f"{i}.values")) for i, e in enumerate(entries)]
    except Exception as e:  # any damage: refuse rather than restore wrong values
        raise PatchError(f"{path} is damaged ({type(e).__name__}: {e}); move it away to revert within rounding") \
            from None


def load_provenance(folder) -> dict:
    """The provenance record of a saved model's folder (``{}`` when there is none)."""
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PatchError(f"{path} is damaged ({e})") from None


def write_provenance(folder, record: dict) -> None:
    atomic_write_text(Path(folder) / PROVENANCE, json.dumps(record, indent=2))


def records_of(folder) -> Tuple[dict, List[UndoEntry]]:
    """``(provenance, undo entries)`` kept in a saved model's folder (``({}, [])`` for anything else: a hub id,
    a folder without them). Read them before a save replaces the folder."""
    if not folder or not Path(folder).is_dir():
        return {}, []
    return load_provenance(folder), load_undo(folder)


def write_records(folder, record: dict, entries: Sequence[UndoEntry]) -> None:
    """Write a saved model's provenance and undo data into its folder (each file atomically)."""
    if record:
        write_provenance(folder, record)
    if entries or (Path(folder) / UNDO).exists():
        save_undo(Path(folder) / UNDO, entries)


def with_applied(record: dict, entries: Sequence[UndoEntry], patches: Sequence[Patch], names: Sequence[str],
                 undo: Sequence[UndoEntry], source=None, signatures: Sequence[dict] = ()):
    """The records of a model that had ``record`` / ``entries`` and now has ``patches`` (files ``names``) on
    top, with their ``undo`` data."""
    from ..core.version import __version__

    rows = list(record.get("patches", []))
    for i, (p, name) in enumerate(zip(patches, names)):
        rows.append({"file": str(name), "method": p.meta.get("method"), "requests": p.meta.get("requests"),
                     "layers": p.meta.get("layers"), "fingerprints": p.meta.get("fingerprints"),
                     "fingerprints_after": p.meta.get("fingerprints_after"), "forced": bool(p.meta.get("forced")),
                     "signature": dict(signatures[i]) if i < len(signatures) and signatures[i] else None})
    new = {"format": "factedit.provenance.v1", "factedit_version": __version__,
           "base": record.get("base") or (str(source) if source else None), "patches": rows}
    return new, [*entries, *undo]


def without_reverted(record: dict, entries: Sequence[UndoEntry], patches: Sequence[Patch]):
    """The records of a model that had ``record`` / ``entries`` once ``patches`` are taken off."""
    gone = {(m, fp) for p in patches for m, fp in (p.meta.get("fingerprints_after") or {}).items()}
    kept = [u for u in entries if (u.module, u.fingerprint_after) not in gone]
    if record:
        afters = [dict(p.meta.get("fingerprints_after") or {}) for p in patches]
        record = {**record, "patches": [r for r in record.get("patches", [])
                                        if (r.get("fingerprints_after") or {}) not in afters]}
    return record, kept
