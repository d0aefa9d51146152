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

:func:`wear_warnings` compares a meter with the limits calibrated from our 1,000-edit runs
(``wear_limits.json``, written by ``bench/calibrate_wear.py``; docs/RESULTS.md "Wear limits"): the collapse
guard warns, before an edit is committed, when the edited layers have moved past the wear at which a run of
the same method and settings was last healthy, or when this edit is as far above the earlier ones as the edits
that led a run into collapse, and names the option that would help.
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["layer_norms", "measure_wear", "cumulative_wear", "WEAR_KEYS", "LIMITS_FILE", "wear_limits",
           "limit_for", "wear_warnings"]

#: the limits calibrated from the long runs (``bench/calibrate_wear.py`` writes it)
LIMITS_FILE = Path(__file__).with_name("wear_limits.json")

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


def wear_limits(path=None) -> dict:
    """The calibrated limits (``{"criterion": ..., "limits": [entry, ...]}``): ``path``, else
    ``$FACTEDIT_HOME/wear_limits.json`` when a user calibrated their own (``factedit summarize RUNS
    --wear-limits``), else the ones shipped with the package (our runs on SmolLM2-135M). ``{"limits": []}`` when
    the file is unreadable (no warnings then, never an error: the meter is advice)."""
    from ..core.paths import factedit_home

    if path is None:
        own = factedit_home() / "wear_limits.json"
        path = own if own.exists() else LIMITS_FILE
    try:
        stamp = Path(path).stat().st_mtime_ns
    except OSError:
        return {"limits": []}
    return _read_limits(str(path), stamp)


@functools.lru_cache(maxsize=8)
def _read_limits(path: str, stamp: int) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"limits": []}
    return data if isinstance(data, dict) and isinstance(data.get("limits"), list) else {"limits": []}


def _setting(cfg, key: str):
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return value


def limit_for(method: str, cfg, limits: Optional[dict] = None) -> Optional[dict]:
    """The calibrated entry of ``method`` whose recorded settings (``entry["settings"]``, e.g. ``{"alpha": 10}``)
    all equal ``cfg``'s; the one with the most settings when several match; None when no run calibrated it."""
    entries = (limits if limits is not None else wear_limits())["limits"]
    best = None
    for e in entries:
        if e.get("method") != method:
            continue
        settings = e.get("settings") or {}
        if all(_same(_setting(cfg, k), v) for k, v in settings.items()):
            if best is None or len(settings) > len(best.get("settings") or {}):
                best = e
    return best


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def _run_name(entry: dict) -> str:
    return f"{entry['run']} run" + (f" on {entry['model']}" if entry.get("model") else "")


def wear_warnings(wear: Dict[str, dict], method: str, cfg, limits: Optional[dict] = None) -> List[str]:
    """What the collapse guard warns about an applied edit's meter ``wear`` (``[]``: nothing): per the entry of
    :func:`limit_for`, the largest ``relative`` against its ``relative`` limit, the largest ``ratio`` against its
    ``ratio`` limit; each warning names the run it was calibrated on and the entry's ``help``."""
    entry = limit_for(method, cfg, limits)
    if entry is None or not wear:
        return []
    out = []
    help_text = entry.get("help") or ""
    rel_limit, ratio_limit = entry.get("relative"), entry.get("ratio")
    if rel_limit is not None:
        layer, w = max(wear.items(), key=lambda kv: kv[1]["relative"])
        if w["relative"] > rel_limit:
            out.append(f"wear: layer {layer} has moved {100 * w['relative']:.1f}% of ‖W‖ since the history began; "
                       f"our {_run_name(entry)} was last healthy at {100 * rel_limit:.1f}% "
                       f"({entry['healthy_edits']} edits) and at {entry['onset']} edits had {entry['degraded']}"
                       + (f". {help_text}" if help_text else ""))
    if ratio_limit is not None:
        ratios = [(k, w["ratio"]) for k, w in wear.items() if w.get("ratio") is not None]
        if ratios:
            layer, r = max(ratios, key=lambda kv: kv[1])
            if r >= ratio_limit:
                out.append(f"wear: this edit's update of layer {layer} is {r:.2f}× the median of the earlier ones; "
                           f"in our {_run_name(entry)} edits {ratio_limit:.2f}× the median and more led into "
                           f"collapse ({entry['collapse']})" + (f". {help_text}" if help_text else ""))
    return out
