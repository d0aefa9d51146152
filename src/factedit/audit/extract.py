"""The edits an audit found, as a factedit patch: ``factedit revert OUT --model SUSPECT`` takes them out.

Per edit layer the factors of the low-rank update (``D ≈ L Rᵀ`` from the SVD, float32), the fingerprints of the
base's and the suspect's W_out as a model loaded in float32 holds them (so that revert checks the patch is
applied to exactly this suspect), and provenance ``"extracted by factedit audit"``. Reverting subtracts
``L Rᵀ``: the result equals the base within the rounding of the suspect's format (the singular directions
below the noise stay, as does the rounding of storing ``W + Δ``), never bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch

from ..core.fingerprints import matrix_fingerprint
from ..core.version import __version__
from ..edit.deltas import LayerDelta
from ..edit.wear import layer_norms
from ..patch.files import FORMAT, Patch
from .compare import AuditReport, Edit
from .tensors import TensorFiles

__all__ = ["extract_patch", "save_extracted", "edit_deltas", "d_ff_basis", "EXTRACTED"]

#: the ``method`` an extracted patch names
EXTRACTED = "audit-extract"


def _delta(layer: int, finding, fan_in_fan_out: bool) -> LayerDelta:
    left, right = finding.left, finding.right  # stored matrix ≈ left @ right.T
    if fan_in_fan_out:  # GPT-2 Conv1D keeps W_out as (in, out): W_out's update is the transpose
        left, right = right, left
    return LayerDelta(layer, left.contiguous(), right.contiguous())


def edit_deltas(report: AuditReport, edit: Edit) -> List[LayerDelta]:
    """The updates of W_out one edit made (as the editor writes them: ``left`` d_model side, ``right`` d_ff)."""
    return [_delta(layer, f, report.fan_in_fan_out) for layer, f in zip(edit.layers, edit.findings)]


def d_ff_basis(deltas: Sequence[LayerDelta]) -> List[torch.Tensor]:
    """Per delta (:func:`edit_deltas`), an orthonormal basis (d_ff × rank) of its row space on the key side."""
    return [torch.linalg.qr(d.right.double())[0] for d in deltas]


def extract_patch(report: AuditReport, base: TensorFiles, suspect: TensorFiles, edits: Sequence[Edit] = ()) -> Patch:
    """One patch of ``edits`` (default: every edit of ``report``); raises ValueError when there is none."""
    edits = list(edits or report.edits)
    if not edits:
        raise ValueError("the audit found no edit to extract")
    deltas: List[LayerDelta] = []
    fps, after, modules = {}, {}, {}
    for e in edits:
        deltas += edit_deltas(report, e)
        for layer, f in zip(e.layers, e.findings):
            name = e.modules[layer]
            fps[name] = matrix_fingerprint(base.get(f.name).to(torch.float32))
            after[name] = matrix_fingerprint(suspect.get(f.name).to(torch.float32))
            modules[str(layer)] = name
    meta = {"format": FORMAT, "factedit_version": __version__, "method": EXTRACTED, "config": None, "requests": [],
            "layers": sorted({d.layer for d in deltas}), "norms": layer_norms(deltas), "fingerprints": fps,
            "fingerprints_after": after, "model": report.base, "modules": modules,
            "provenance": {"extracted_by": "factedit audit", "base": report.base, "suspect": report.suspect,
                           "edits": [e.to_dict() for e in edits]},
            "state_updates": []}
    return Patch(deltas, meta)


def save_extracted(report: AuditReport, base: TensorFiles, suspect: TensorFiles, path) -> Path:
    """:func:`extract_patch` written atomically to ``path``."""
    return extract_patch(report, base, suspect).save(path)
