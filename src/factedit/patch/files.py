"""Edits as files: low-rank patches that can be shipped, checked, stacked and reverted.

    patch = Patch.from_result(result)            # after Editor.edit(...)
    patch.save("eiffel.safetensors")
    applied = apply_patch(adapter, Patch.load("eiffel.safetensors"))   # refuses a different base
    applied.revert()

A patch file is ``safetensors``: per edited layer the factors ``layer{l}.left`` (d_model, r) and
``layer{l}.right`` (d_ff, r) (or ``layer{l}.dense`` for full-rank fine-tuning), the updates the edit
made to its method's state (``state.{i}.{key}``: AlphaEdit's keys), plus JSON metadata: format,
factedit version, method and its full configuration, the requests, per-layer norms of the summed
update, the SHA-256 of every edited matrix *before* and *after* the edit, everything else the edit's
:class:`~factedit.edit.results.EditResult` records, and the SHA-256 of every tensor; the metadata's
own SHA-256 is stored beside it. :meth:`Patch.load` verifies all of them (and the norms against the
factors) before anything can be applied, so a damaged file is refused, never applied. Nothing is
ever unpickled.

:meth:`Patch.from_result` and :meth:`Patch.to_result` are the one conversion between an edit and its
file: a result saved and loaded again has every field it had (its ``applied`` is the new application).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..core.errors import FactEditError
from ..core.fingerprints import matrix_fingerprint
from ..core.paths import atomic_path
from ..core.requests import Request
from ..edit.deltas import AppliedEdit, LayerDelta, apply_deltas
from ..edit.methods.options import to_jsonable
from ..edit.methods.registry import config_from_dict
from ..edit.results import EditResult
from ..edit.wear import layer_norms

__all__ = ["PatchError", "Patch", "apply_patch", "apply_patches", "temporarily_applied", "revert_patch",
           "revert_patches", "negated", "layer_norms", "tensor_sha256"]

log = logging.getLogger(__name__)

FORMAT = "factedit.patch.v3"
#: the second format: no state updates, no timings / per-request info / rounding (still read)
FORMAT_V2 = "factedit.patch.v2"
#: the first format: no checksums and no after-edit fingerprints (still read; such a patch cannot be
#: reverted without ``force``)
FORMAT_V1 = "factedit.patch.v1"
#: the formats whose metadata and tensors carry checksums
CHECKSUMMED = (FORMAT, FORMAT_V2)
#: relative tolerance of the recorded per-layer norms against the factors
NORM_RTOL = 1e-4


class PatchError(FactEditError):
    """A patch file is damaged, malformed, or does not fit the model."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (what a patch records per tensor)."""
    return matrix_fingerprint(t)


def _verify_checksums(path, raw: str, raw_sha, meta: dict, tensors: dict) -> None:
    if raw_sha != _sha256(raw):
        raise PatchError(f"{path}: the patch metadata is damaged (its SHA-256 does not match); nothing was applied")
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise PatchError(f"{path}: the tensors in the file are not the ones the metadata lists; nothing was applied")
    bad = [k for k, t in tensors.items() if tensor_sha256(t) != sums[k]]
    if bad:
        raise PatchError(f"{path}: tensor {bad[0]!r} is damaged (its SHA-256 does not match the recorded one)"
                         + (f", and {len(bad) - 1} more" if len(bad) > 1 else "") + "; nothing was applied")


def _verify_norms(path, meta: dict, deltas) -> None:
    recorded = meta.get("norms") or {}
    for layer, norm in layer_norms(deltas).items():
        want = recorded.get(layer)
        if not isinstance(want, (int, float)) or abs(norm - want) > NORM_RTOL * max(abs(want), 1e-30):
            raise PatchError(f"{path}: the factors of layer {layer} have norm {norm:.6g}, the metadata records "
                             f"{want!r}; the file is inconsistent and nothing was applied")


@dataclass
class Patch:
    """Low-rank deltas plus provenance. ``meta['fingerprints']`` maps module name -> SHA-256;
    ``state_updates`` what the edit folded into its method's state (one ``{key: tensor}`` per computation)."""

    deltas: List[LayerDelta]
    meta: dict = field(default_factory=dict)
    state_updates: List[Dict[object, torch.Tensor]] = field(default_factory=list)

    # ------------------------------------------------------------------ an edit <-> its patch
    @classmethod
    def from_result(cls, result: EditResult, adapter=None) -> "Patch":
        """The patch of an applied :class:`~factedit.edit.results.EditResult` (fingerprints recorded at edit
        time): every field of the result but its application."""
        from ..core.models import model_name
        from ..core.version import __version__

        if adapter is None:
            adapter = getattr(result.applied, "adapter", None)
        if not result.fingerprints:
            raise PatchError("this edit carries no base fingerprints; it was not made by Editor.edit")
        meta = {
            "format": FORMAT, "factedit_version": __version__, "method": result.method,
            "config": to_jsonable(result.config), "requests": [r.to_dict() for r in result.requests],
            "layers": sorted({d.layer for d in result.deltas}), "norms": layer_norms(result.deltas),
            "fingerprints": dict(result.fingerprints), "fingerprints_after": dict(result.fingerprints_after),
            "model": model_name(adapter.model) if adapter is not None else None,
            "modules": {str(d.layer): adapter.w_out_name(d.layer) for d in result.deltas} if adapter else {},
            "guard": result.guard, "statistics": to_jsonable(result.statistics), "verified": result.verified,
            "verification": to_jsonable(result.verification), "retried": result.retried,
            "prompt_prefix": result.prompt_prefix, "side_effects": result.side_effects,
            "rounding": dict(result.rounding), "wear": to_jsonable(result.wear), "seconds": result.seconds,
            "timings": dict(result.timings), "info": to_jsonable(result.info),
            "state_updates": [list(u) for u in result.state_updates],
        }
        return cls(list(result.deltas), meta, [dict(u) for u in result.state_updates])

    def to_result(self, applied: AppliedEdit) -> EditResult:
        """The :class:`~factedit.edit.results.EditResult` this patch was made from, applied as ``applied``
        (its config rebuilt when the method is registered here; older formats lack some fields)."""
        m = self.meta
        method = m.get("method", "patch")
        return EditResult(
            method, list(m.get("layers", [])), [Request(**r) for r in m.get("requests", [])], self.deltas, applied,
            config_from_dict(method, m.get("config")), seconds=float(m.get("seconds", 0.0)),
            timings=dict(m.get("timings") or {}), info=list(m.get("info") or []),
            state_updates=[dict(u) for u in self.state_updates], fingerprints=dict(m["fingerprints"]),
            fingerprints_after=dict(m.get("fingerprints_after") or {}), guard=m.get("guard"),
            statistics=dict(m.get("statistics") or {}), verification=list(m.get("verification") or []),
            retried=bool(m.get("retried")), prompt_prefix=m.get("prompt_prefix") or "",
            side_effects=m.get("side_effects"), rounding=dict(m.get("rounding") or {}),
            wear=dict(m.get("wear") or {}))

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for i, d in enumerate(self.deltas):
            if d.right is None:
                tensors[f"{i}.layer{d.layer}.dense"] = d.left.float().cpu().contiguous()
            else:
                tensors[f"{i}.layer{d.layer}.left"] = d.left.float().cpu().contiguous()
                tensors[f"{i}.layer{d.layer}.right"] = d.right.float().cpu().contiguous()
        for i, update in enumerate(self.state_updates):
            for key, t in update.items():
                tensors[f"state.{i}.{key}"] = t.detach().cpu().contiguous()  # in its own dtype: replayed bit for bit
        meta = {**self.meta, "format": FORMAT, "state_updates": [list(u) for u in self.state_updates],
                "checksums": {k: tensor_sha256(v) for k, v in tensors.items()}}
        raw = json.dumps(meta)
        path = Path(path)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"factedit": raw, "factedit_sha256": _sha256(raw)})
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
                header = f.metadata() or {}
                raw, raw_sha = header.get("factedit"), header.get("factedit_sha256")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise PatchError(f"{path} is not a readable patch file ({type(e).__name__}: {e})") from None
        try:
            meta = json.loads(raw) if raw else None
        except (TypeError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") not in (*CHECKSUMMED, FORMAT_V1):
            raise PatchError(f"{path}: missing or unknown factedit patch metadata (damaged, or not a patch)")
        if not isinstance(meta.get("fingerprints"), dict):
            raise PatchError(f"{path}: patch metadata lacks base fingerprints")
        if meta["format"] in CHECKSUMMED:
            _verify_checksums(path, raw, raw_sha, meta, tensors)
        else:
            log.warning("%s: a %s patch, written before patches carried checksums: its data cannot be verified",
                        path, FORMAT_V1)
        state_updates = _state_updates(path, meta, tensors)
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
        if meta["format"] in CHECKSUMMED:
            _verify_norms(path, meta, deltas)
        return cls(deltas, meta, state_updates)

    def describe(self) -> dict:
        """What the patch changes, for ``factedit inspect``."""
        m = self.meta
        return {"method": m.get("method"), "model": m.get("model"), "factedit_version": m.get("factedit_version"),
                "layers": m.get("layers"), "ranks": {str(d.layer): d.rank for d in self.deltas},
                "norms": m.get("norms"), "requests": m.get("requests"), "modules": m.get("modules"),
                "fingerprints": m.get("fingerprints"), "fingerprints_after": m.get("fingerprints_after"),
                "guard": m.get("guard"), "forced": m.get("forced", False), "format": m.get("format"),
                "verified": m.get("verified"), "statistics": m.get("statistics"),
                "prompt_prefix": m.get("prompt_prefix"), "config": m.get("config")}


def _state_updates(path, meta: dict, tensors: dict) -> List[dict]:
    """The ``state.{i}.{key}`` tensors (taken out of ``tensors``) as the updates ``meta["state_updates"]`` lists."""
    listed = meta.get("state_updates") or []
    names = {k for k in tensors if k.startswith("state.")}
    if not isinstance(listed, list) or not all(isinstance(u, list) for u in listed):
        raise PatchError(f"{path}: malformed state updates in the metadata; nothing was applied")
    want = {f"state.{i}.{key}" for i, u in enumerate(listed) for key in u}
    if names != want:
        raise PatchError(f"{path}: the state tensors in the file are not the ones the metadata lists; nothing was "
                         "applied")
    out = [{key: tensors.pop(f"state.{i}.{key}") for key in u} for i, u in enumerate(listed)]
    if any(not torch.isfinite(t).all() for u in out for t in u.values()):
        raise PatchError(f"{path}: a state tensor contains NaN/Inf")
    return out


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
        have = matrix_fingerprint(adapter.w_out_stored(layer))
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


@contextlib.contextmanager
def temporarily_applied(adapter, patches: Sequence[Patch]):
    """Inside the block the model has ``patches`` applied (every check of :func:`apply_patches`);
    on leaving, every touched matrix is back to its original bits."""
    done = apply_patches(adapter, patches)
    try:
        yield done
    finally:
        for a in reversed(done):
            a.revert()


def negated(patch: Patch) -> List[LayerDelta]:
    """The deltas that take ``patch`` off again, in the order a revert subtracts them (newest first)."""
    return [d.negated() for d in reversed(patch.deltas)]


def revert_patches(adapter, patches: Sequence[Patch], force: bool = False, undo=()) -> Dict[str, bool]:
    """Subtract patches (oldest first, as they were applied; reverted newest first) from a model that
    has them applied, e.g. a saved edited model.

    Before anything changes, every edited matrix must be exactly what the newest patch touching it
    left (its recorded after-edit fingerprint): a patch that is not applied, or was already reverted,
    or has other edits on top, is refused (``force`` subtracts anyway). ``undo``: the entries a saved
    model keeps beside its weights (:class:`~factedit.patch.saved.UndoEntry`: after each patch is subtracted,
    the entries the subtraction does not give back are put back), which make the result the base bit for
    bit; without them ``(W + Δ) − Δ`` rounds differently in a few entries. Returns, per edited matrix,
    whether the result is bit-identical to the recorded base (in-session reverts through
    :class:`~factedit.edit.deltas.AppliedEdit` are always exact).
    """
    for p in patches:
        _check_shapes(adapter, p)
    if not force:
        _check_reverts(adapter, patches)
    by_after = {(u.module, u.fingerprint_after): u for u in undo}
    layers = sorted({d.layer for p in patches for d in p.deltas})
    start = {layer: adapter.w_out_stored(layer).clone() for layer in layers}  # all or nothing
    try:
        for p in reversed(patches):
            fixes = {}
            for layer in sorted({d.layer for d in p.deltas}):
                name = adapter.w_out_name(layer)
                fixes[layer] = by_after.get((name, matrix_fingerprint(adapter.w_out_stored(layer))))
            apply_deltas(adapter, negated(p))
            for layer, u in fixes.items():
                if u is not None:
                    w = adapter.w_out_stored(layer).clone()
                    w.reshape(-1)[u.index.to(w.device)] = u.values.to(device=w.device, dtype=w.dtype)
                    adapter.set_w_out(layer, w)
    except BaseException:
        for layer, w in start.items():
            if not torch.equal(adapter.w_out_stored(layer), w):
                adapter.set_w_out(layer, w)
        raise
    base: Dict[str, str] = {}
    for p in patches:  # the oldest patch's base of each matrix is the model before them all
        for name, fp in p.meta["fingerprints"].items():
            base.setdefault(name, fp)
    return {adapter.w_out_name(l): matrix_fingerprint(adapter.w_out_stored(l)) == base.get(adapter.w_out_name(l))
            for l in layers}


def _check_reverts(adapter, patches: Sequence[Patch]) -> None:
    """Refuse (nothing changed) unless every edited matrix is what the newest patch touching it left."""
    checked = set()
    for p in reversed(patches):
        after = p.meta.get("fingerprints_after") or {}
        for layer in sorted({d.layer for d in p.deltas}):
            name = adapter.w_out_name(layer)
            if name in checked:
                continue  # an older patch under a newer one on the same matrix: checked via the newer
            checked.add(name)
            if name not in after:
                raise PatchError(f"this patch records no after-edit fingerprint of {name} (written by an older "
                                 "factedit), so it cannot be checked that it is applied; pass force=True / --force "
                                 "to subtract it anyway")
            if matrix_fingerprint(adapter.w_out_stored(layer)) != after[name]:
                raise PatchError(
                    f"the model does not have this patch applied: {name} is not what the patch left "
                    "(it was never applied, was already reverted, or other edits changed it since); nothing "
                    "was changed. Revert patches newest first, or pass force=True / --force to subtract anyway")


def revert_patch(adapter, patch: Patch, force: bool = False) -> Dict[str, bool]:
    """:func:`revert_patches` of one patch."""
    return revert_patches(adapter, [patch], force)
