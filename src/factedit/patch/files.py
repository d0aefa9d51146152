"""Edits as files: low-rank patches that can be shipped, checked, stacked and reverted.

    patch = Patch.from_result(result)            # after Editor.edit(...)
    patch.save("eiffel.safetensors")
    applied = apply_patch(adapter, Patch.load("eiffel.safetensors"))   # refuses a different base
    applied.revert()

A patch file is ``safetensors``: per edited layer the factors ``layer{l}.left`` (d_model, r) and
``layer{l}.right`` (d_ff, r) (or ``layer{l}.dense`` for full-rank fine-tuning), plus JSON
metadata: format, factedit version, method and its full configuration, the requests, per-layer
norms, and the SHA-256 of every edited matrix *before* the edit. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..edit.deltas import AppliedEdit, LayerDelta, apply_deltas
from ..core.errors import FactEditError
from ..core.fingerprints import matrix_fingerprint
from ..core.paths import atomic_path
from ..edit.methods.options import to_jsonable

__all__ = ["PatchError", "Patch", "apply_patch", "apply_patches", "revert_patch"]

FORMAT = "factedit.patch.v1"


class PatchError(FactEditError):
    """A patch file is damaged, malformed, or does not fit the model."""


@dataclass
class Patch:
    """Low-rank deltas plus provenance. ``meta['fingerprints']`` maps module name -> SHA-256."""

    deltas: List[LayerDelta]
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_result(cls, result, adapter=None) -> "Patch":
        """The patch of an :class:`~factedit.editor.EditResult` (fingerprints recorded at edit time)."""
        from ..core.version import __version__
        from ..core.models import model_name

        if adapter is None:
            adapter = getattr(result.applied, "adapter", None)
        fps = getattr(result, "fingerprints", None) or {}
        if not fps:
            raise PatchError("this edit carries no base fingerprints; it was not made by Editor.edit")
        norms: Dict[str, float] = {}
        for d in result.deltas:
            norms[str(d.layer)] = norms.get(str(d.layer), 0.0) + float(torch.linalg.matrix_norm(d.dense()))
        meta = {
            "format": FORMAT, "factedit_version": __version__, "method": result.method,
            "config": to_jsonable(result.config), "requests": [r.to_dict() for r in result.requests],
            "layers": sorted({d.layer for d in result.deltas}), "norms": norms, "fingerprints": fps,
            "model": model_name(adapter.model) if adapter is not None else None,
            "modules": {str(d.layer): adapter.w_out_name(d.layer) for d in result.deltas} if adapter else {},
            "guard": getattr(result, "guard", None),
        }
        return cls(list(result.deltas), meta)

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for i, d in enumerate(self.deltas):
            if d.right is None:
                tensors[f"{i}.layer{d.layer}.dense"] = d.left.contiguous().float()
            else:
                tensors[f"{i}.layer{d.layer}.left"] = d.left.contiguous().float()
                tensors[f"{i}.layer{d.layer}.right"] = d.right.contiguous().float()
        path = Path(path)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"factedit": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path) -> "Patch":
        """Read and validate a patch file; any damage raises :class:`PatchError`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("factedit")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise PatchError(f"{path} is not a readable patch file ({type(e).__name__}: {e})") from None
        try:
            meta = json.loads(raw) if raw else None
        except (TypeError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise PatchError(f"{path}: missing or unknown factedit patch metadata")
        if not isinstance(meta.get("fingerprints"), dict):
            raise PatchError(f"{path}: patch metadata lacks base fingerprints")
        groups: Dict[int, dict] = {}
        for name, t in tensors.items():
            parts = name.split(".")
            if len(parts) != 3 or not parts[0].isdigit() or not parts[1].startswith("layer") \
                    or not parts[1][5:].isdigit() or parts[2] not in ("left", "right", "dense"):
                raise PatchError(f"{path}: unexpected tensor {name!r}")
            g = groups.setdefault(int(parts[0]), {"layer": int(parts[1][5:])})
            if g["layer"] != int(parts[1][5:]):
                raise PatchError(f"{path}: tensor {name!r} disagrees on its layer")
            if not torch.isfinite(t).all():
                raise PatchError(f"{path}: tensor {name!r} contains NaN/Inf")
            g[parts[2]] = t.float()
        deltas = []
        for i in sorted(groups):
            g = groups[i]
            if "dense" in g and g.keys() == {"layer", "dense"} and g["dense"].ndim == 2:
                deltas.append(LayerDelta.from_dense(g["layer"], g["dense"]))
            elif g.keys() == {"layer", "left", "right"} and g["left"].ndim == g["right"].ndim == 2 \
                    and g["left"].shape[1] == g["right"].shape[1]:
                deltas.append(LayerDelta(g["layer"], g["left"], g["right"]))
            else:
                raise PatchError(f"{path}: delta #{i} has missing or mismatched factors")
        if not deltas or sorted({d.layer for d in deltas}) != sorted(meta.get("layers", [])):
            raise PatchError(f"{path}: the tensors do not match the layers named in the metadata")
        return cls(deltas, meta)

    def describe(self) -> dict:
        """What the patch changes, for ``factedit inspect``."""
        m = self.meta
        return {"method": m.get("method"), "model": m.get("model"), "factedit_version": m.get("factedit_version"),
                "layers": m.get("layers"), "ranks": {str(d.layer): d.rank for d in self.deltas},
                "norms": m.get("norms"), "requests": m.get("requests"), "modules": m.get("modules"),
                "fingerprints": m.get("fingerprints"), "guard": m.get("guard"), "forced": m.get("forced", False)}


def _check_shapes(adapter, patch: Patch) -> None:
    for d in patch.deltas:
        if not 0 <= d.layer < adapter.n_layers:
            raise PatchError(f"patch edits layer {d.layer} but the model has {adapter.n_layers} layers")
        dense_shape = (adapter.d_model, adapter.d_ff)
        shape = tuple(d.left.shape) if d.right is None else (d.left.shape[0], d.right.shape[0])
        if shape != dense_shape:
            raise PatchError(f"patch delta for layer {d.layer} has shape {shape}, the model's W_out is {dense_shape}")


def _check_fingerprints(adapter, patch: Patch, force: bool) -> List[str]:
    mismatched = []
    for layer in sorted({d.layer for d in patch.deltas}):
        name = adapter.w_out_name(layer)
        want = patch.meta["fingerprints"].get(name)
        have = matrix_fingerprint(adapter.w_out_parameter(layer))
        if want != have:
            mismatched.append(name)
    if mismatched and not force:
        raise PatchError(
            f"this patch was computed on a different base model: {mismatched[0]} does not match its fingerprint"
            + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else "")
            + "; apply it to the model it was made for, or pass force=True / --force to apply anyway"
        )
    return mismatched


def apply_patch(adapter, patch: Patch, force: bool = False) -> AppliedEdit:
    """Apply one patch atomically after checking shapes and base fingerprints."""
    _check_shapes(adapter, patch)
    mismatched = _check_fingerprints(adapter, patch, force)
    if mismatched:
        patch.meta["forced"] = True
        patch.meta["forced_mismatch"] = mismatched
    return apply_deltas(adapter, patch.deltas)


def apply_patches(adapter, patches: Sequence[Patch], force: bool = False) -> List[AppliedEdit]:
    """Stack patches in order (each checked against the model as left by the previous);
    if any fails, all are undone."""
    done: List[AppliedEdit] = []
    try:
        for p in patches:
            done.append(apply_patch(adapter, p, force))
    except BaseException:
        for a in reversed(done):
            a.revert()
        raise
    return done


def revert_patch(adapter, patch: Patch) -> Dict[str, bool]:
    """Subtract a patch from a model that has it applied (e.g. a saved edited model).

    Returns, per edited matrix, whether the result is bit-identical to the recorded base
    (it usually is not: ``(W + Δ) − Δ`` rounds differently; in-session reverts through
    :class:`~factedit.delta.AppliedEdit` are always exact).
    """
    _check_shapes(adapter, patch)
    negated = [LayerDelta(d.layer, -d.left, d.right) if d.right is not None else LayerDelta.from_dense(d.layer, -d.left)
               for d in patch.deltas]
    apply_deltas(adapter, negated)
    return {adapter.w_out_name(l): matrix_fingerprint(adapter.w_out_parameter(l)) ==
            patch.meta["fingerprints"].get(adapter.w_out_name(l)) for l in sorted({d.layer for d in patch.deltas})}
