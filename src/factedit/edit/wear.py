"""The wear meter (issue 32): how far the edited layers have moved from the weights the history started from,
how this edit's update compares with the earlier ones, and for projection methods how much of the preserved
null space is left.

    wear = measure_wear(adapter, history.results, result, room)   # {"5": {"relative": 0.012, ...}, ...}

Per edited layer ``l`` (all figures float64, Frobenius norms):

* ``relative``: ‖W_l − W_l⁰‖ / ‖W_l⁰‖, with W_l⁰ the matrix before the oldest edit of the history that touched
  the layer (the history's own copy, kept for the exact revert): the cumulative update of every edit applied
  since, this one included;
* ``edit_norm``: ‖Δ_l‖ of this edit; ``median_norm``: the median ‖Δ_l‖ of the earlier edits of the history at
  the layer (``None`` for the first); ``ratio``: their quotient; ``edits``: edits at the layer, this one included;
* ``null_dims`` / ``room`` (methods whose registration has a ``room`` rule, AlphaEdit): the dimensions of the
  preserved null space and those of it the key memory does not yet fill.
"""

from __future__ import annotations

import statistics
from typing import Dict, Optional, Sequence

import torch

__all__ = ["layer_norms", "measure_wear", "cumulative_wear", "WEAR_KEYS"]

#: the figures of one layer's wear, in the order they are shown
WEAR_KEYS = ("relative", "edit_norm", "median_norm", "ratio", "edits", "null_dims", "room")


def layer_norms(deltas) -> Dict[str, float]:
    """Per edited layer (as text, ascending), the Frobenius norm of the *summed* update ‖Σ Δ‖ (float64): one
    edit's update, as patches record it."""
    by_layer: Dict[int, torch.Tensor] = {}
    for d in deltas:
        by_layer[d.layer] = by_layer.get(d.layer, 0) + d.dense().double()
    return {str(layer): float(torch.linalg.matrix_norm(m)) for layer, m in sorted(by_layer.items())}


def _first_original(results: Sequence, layer: int) -> Optional[torch.Tensor]:
    for r in results:
        orig = r.applied.originals if r.applied is not None else {}
        if layer in orig:
            return orig[layer]
    return None


def _relative(now: torch.Tensor, w0: torch.Tensor) -> float:
    """‖now − W⁰‖ / ‖W⁰‖ in float64 (NaN for an all-zero W⁰)."""
    now, w0 = now.double(), w0.to(device=now.device, dtype=torch.float64)
    base = float(w0.norm())
    return float((now - w0).norm()) / base if base else float("nan")


def measure_wear(adapter, results: Sequence, result, room: Optional[Dict[int, tuple]] = None,
                 after: Optional[Dict[int, torch.Tensor]] = None) -> Dict[str, dict]:
    """The wear of ``result``'s layers once it is applied; ``results`` is the history up to ``result`` (each
    result's per-layer update norms are kept in its ``wear`` once measured, so the running median costs
    nothing). ``room``: per layer ``(null_dims, unused)`` from the method's rule. ``after``: per layer the matrix
    right after ``result`` where it is no longer the model's (later edits applied since); else the model's."""
    norms = layer_norms(result.deltas)
    out: Dict[str, dict] = {}
    earlier = [r for r in results if r is not result]
    for key, norm in norms.items():
        layer = int(key)
        w0 = _first_original(results, layer)
        now = after[layer] if after and layer in after else adapter.w_out_stored(layer)
        past = [float(r.wear[key]["edit_norm"]) for r in earlier if r.wear and key in r.wear]
        median = statistics.median(past) if past else None
        entry = {"relative": _relative(now, now if w0 is None else w0),
                 "edit_norm": norm, "median_norm": median, "ratio": norm / median if median else None,
                 "edits": len(past) + 1, "null_dims": None, "room": None}
        if room and layer in room:
            entry["null_dims"], entry["room"] = (int(x) for x in room[layer])
        out[key] = entry
    return out


def cumulative_wear(adapter, results: Sequence) -> Dict[str, float]:
    """Per layer any edit of the history ``results`` touched, ‖W − W⁰‖ / ‖W⁰‖ now (W⁰: before the oldest edit
    that touched it); ``{}`` for an empty history. What a long run records at each checkpoint."""
    layers = sorted({layer for r in results for layer in (r.applied.originals if r.applied is not None else {})})
    out = {}
    for layer in layers:
        out[str(layer)] = _relative(adapter.w_out_stored(layer), _first_original(results, layer))
    return out
