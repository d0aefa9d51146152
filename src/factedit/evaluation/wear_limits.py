"""Calibrate the collapse guard's wear warnings from sequential runs (issue 32; docs/RESULTS.md "Wear limits").

For every run directory (written by ``factedit eval --sequential --downstream-every N``) this reads the
checkpoints (known-fact recall and perplexity), the wear of the edited layers at each checkpoint, and the wear
meter of every edit (``cases.jsonl`` of runs with the meter; ``wear.jsonl`` written by ``bench/replay_wear.py``
for runs recorded before it). Then, per run:

* **degraded**: the first checkpoint where known-fact recall is below half the unedited model's, or
  perplexity above 1.25× the unedited model's; the checkpoint before it is the run's last *healthy* one;
* the **relative limit**: the largest ‖W − W⁰‖/‖W⁰‖ over the edited layers at the last healthy checkpoint (the
  guard warns once an edit takes a layer past it: the model has entered the stretch in which that run degraded);
* **collapse**: the first checkpoint with perplexity above 2× the unedited model's; the **ratio limit** is the
  smallest largest-layer ``ratio`` (this edit's ‖Δ‖ against the median of the earlier ones) of the edits that
  led into it, kept only where it separates: above every ratio of the edits made while the run was healthy;
* **false alarms**: over every run of the same method (other settings included, e.g. α = 10 against
  AlphaEdit's default), the edits (requests) made while that run was still healthy at which the limits warn.

A limit applies to the method and the settings its run had (:data:`LEVERS`); ``help`` names the settings and
the method that stayed healthy longer in the runs.

    cal = calibrate(["results/long/r-rome", "results/long/emmet"])   # what `factedit summarize --wear-limits` writes
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .store import RunError, read_jsonl
from .summarize import load_run

__all__ = ["LEVERS", "load_wear_run", "analyse", "false_alarms", "calibrate", "limits_table"]

#: per method, the settings that distinguish its runs (the levers issue 32 compares)
LEVERS = {"alphaedit": ("alpha", "norm_anchor"), "emmet": ("norm_anchor",), "memit": ("norm_anchor",),
          "ultraedit": ("lr",)}
#: settings a run recorded before the option existed had this value
BEFORE_OPTION = {"norm_anchor": False}


def _jsonl(path: Path) -> list:
    return read_jsonl(path)[0]


def _max_rel(wear: dict):
    return max((float(w["relative"]) if isinstance(w, dict) else float(w) for w in wear.values()), default=None)


def _max_ratio(wear: dict):
    ratios = [float(w["ratio"]) for w in wear.values() if isinstance(w, dict) and w.get("ratio") is not None]
    return max(ratios, default=None)


def load_wear_run(directory) -> dict:
    """A run's method, settings, checkpoints and per-edit wear (see the module docstring); a
    :class:`~factedit.evaluation.store.RunError` when ``directory`` is not a sequential run."""
    run = load_run(directory)
    path, config = run.path, run.config
    compare = config.get("compare") or {}
    if not run.sequential or not compare.get("method"):
        raise RunError(f"{path}: not a sequential run of an editing method; the wear limits need one")
    method_cfg = compare.get("method_config") or {}
    settings = {k: method_cfg.get(k, BEFORE_OPTION.get(k)) for k in LEVERS.get(compare["method"], ())}
    size = int(compare.get("cases_per_edit") or compare.get("batch_size") or 1)  # requests per edit
    replay = _jsonl(path / "wear.jsonl")
    by_n = {x["n_edits"]: x["wear"] for x in replay if "wear" in x}
    checkpoints = []
    for d in run.downstream:
        a = d.get("ability") or {}
        wear = d.get("wear") or by_n.get(d["n_edits"]) or {}
        checkpoints.append({"n": d["n_edits"], "ppl": a.get("perplexity"), "recall": a.get("known_recall"),
                            "wear": _max_rel(wear) if wear else (0.0 if d["n_edits"] == 0 else None)})
    edits = {}  # n_edits after the edit -> (max relative, max ratio)
    for x in replay:
        if "edit_wear" in x and x["edit_wear"]:
            edits[x["n_edits"]] = (_max_rel(x["edit_wear"]), _max_ratio(x["edit_wear"]))
    if not edits:
        seen = set()
        for r in run.records:
            if r.get("wear") and r["group"] not in seen:
                seen.add(r["group"])
                edits[r["n_edits_before"]] = r["wear"]
        edits = {n + size: (_max_rel(w), _max_ratio(w)) for n, w in edits.items()}
    return {"name": path.name, "model": config.get("model"), "size": size, "method": compare["method"],
            "settings": settings,
            "checkpoints": sorted(checkpoints, key=lambda c: c["n"]), "edits": dict(sorted(edits.items()))}


def analyse(run: dict, recall: float, ppl: float, collapse: float) -> dict:
    cps = run["checkpoints"]
    base = next((c for c in cps if c["n"] == 0), None)
    out = {"onset": None, "healthy": 0, "collapse": None, "degraded": None, "relative": None, "ratio": None}
    if base is None:
        return out
    for c in cps[1:]:
        why = []
        if c["recall"] is not None and c["recall"] < recall * base["recall"]:
            why.append(f"known recall {100 * c['recall'] / base['recall']:.1f}% of the unedited model's")
        if c["ppl"] is not None and c["ppl"] > ppl * base["ppl"]:
            why.append(f"perplexity {c['ppl'] / base['ppl']:.2f}×")
        if why and out["onset"] is None:
            out["onset"], out["degraded"] = c["n"], " and ".join(why)
        if out["onset"] is None:
            out["healthy"] = c["n"]
        if c["ppl"] is not None and c["ppl"] > collapse * base["ppl"] and out["collapse"] is None:
            out["collapse"] = c["n"]
            out["collapse_text"] = f"perplexity {c['ppl'] / base['ppl']:.2f}× the unedited model's at {c['n']} edits"
    healthy_cp = next((c for c in cps if c["n"] == out["healthy"]), None)
    if out["onset"] is not None and out["healthy"] > 0 and healthy_cp and healthy_cp["wear"] is not None:
        out["relative"] = healthy_cp["wear"]
    if out["collapse"] is not None:
        before = max([c["n"] for c in cps if c["n"] < out["collapse"]], default=0)
        window = [r for n, (_, r) in run["edits"].items() if before < n <= out["collapse"] and r is not None]
        healthy = [r for n, (_, r) in run["edits"].items() if n <= out["healthy"] and r is not None]
        if window and (not healthy or min(window) > max(healthy)):
            out["ratio"] = min(window)
        out["ratio_healthy_max"] = max(healthy, default=None)
    return out


def false_alarms(limit: dict, runs: list, facts: dict) -> dict:
    """Edits made while their run was healthy at which ``limit`` warns, over the runs of its method."""
    warned = total = 0
    per_run = {}
    for run in runs:
        if run["method"] != limit["method"]:
            continue
        f = facts[run["name"]]
        last = f["healthy"] if f["onset"] is not None else max(run["edits"], default=0)
        w = t = 0
        first = None
        for n, (rel, ratio) in run["edits"].items():
            fires = ((limit["relative"] is not None and rel is not None and rel > limit["relative"])
                     or (limit["ratio"] is not None and ratio is not None and ratio >= limit["ratio"]))
            if fires and first is None:
                first = n
            if n <= last:  # counted in requests (a batch edit of 100 is 100 edits)
                t += run["size"]
                w += run["size"] * fires
        per_run[run["name"]] = {"warned": w, "healthy_edits": t, "first_warning": first, "onset": f["onset"]}
        warned, total = warned + w, total + t
    return {"warned": warned, "healthy_edits": total, "rate": warned / total if total else None, "runs": per_run}


def _option_text(settings: dict, other: dict) -> str:
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in other.items() if settings.get(k) != v and v is not None)


def help_text(run: dict, runs: list, facts: dict) -> str:
    """The settings of the same method, and the method, that stayed healthy longest in the runs."""
    def reach(r):  # edits the run stayed healthy for; a run that never degraded counts all its edits
        f = facts[r["name"]]
        return f["healthy"] if f["onset"] is not None else max(r["edits"], default=0)

    mine = reach(run)
    parts = []
    same = [r for r in runs if r["method"] == run["method"] and r is not run and reach(r) > mine]
    if same:
        best = max(same, key=reach)
        opt = _option_text(run["settings"], best["settings"])
        if opt:
            parts.append(f"{opt} stayed healthy {'for all ' if facts[best['name']]['onset'] is None else 'to '}"
                         f"{reach(best)} edits in our {best['name']} run")
    others = [r for r in runs if r["method"] != run["method"] and reach(r) > mine]
    if others:
        best = max(others, key=reach)
        # the settings that run had on (a default now or not: the advice says what was measured)
        opt = _option_text({}, {k: v for k, v in best["settings"].items() if v is not False})
        parts.append(f"--method {best['method']}{' ' + opt if opt else ''} stayed healthy "
                     f"{'for all ' if facts[best['name']]['onset'] is None else 'to '}{reach(best)} edits")
    return ("What helped in our runs: " + "; ".join(parts) + ".") if parts else ""


def calibrate(dirs: Sequence, recall: float = 0.5, ppl: float = 1.25, collapse: float = 2.0) -> dict:
    runs = [load_wear_run(d) for d in dirs]
    facts = {r["name"]: analyse(r, recall, ppl, collapse) for r in runs}
    limits = []
    for run in runs:
        f = facts[run["name"]]
        if f["relative"] is None and f["ratio"] is None:
            continue
        entry = {"method": run["method"], "settings": run["settings"], "run": run["name"], "model": run["model"],
                 "relative": f["relative"], "healthy_edits": f["healthy"], "onset": f["onset"],
                 "degraded": f["degraded"], "ratio": f["ratio"], "collapse": f.get("collapse_text")}
        entry["false_alarms"] = false_alarms(entry, runs, facts)
        entry["help"] = help_text(run, runs, facts)
        limits.append(entry)
    return {"criterion": {"degraded": f"known-fact recall below {recall:g}× or perplexity above {ppl:g}× the "
                                      f"unedited model's at a checkpoint",
                          "collapse": f"perplexity above {collapse:g}× the unedited model's"},
            "runs": {r["name"]: {"method": r["method"], "settings": r["settings"], **facts[r["name"]],
                                 "edits_with_wear": len(r["edits"]),
                                 "checkpoints_with_wear": sum(c["wear"] is not None for c in r["checkpoints"])}
                     for r in runs},
            "limits": limits}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def limits_table(cal: dict) -> str:
    """The calibration as a markdown table (one row per run)."""
    rows = ["| run | method, settings | last healthy (edits) | degraded at | relative limit | ratio limit | "
            "false alarms (healthy edits, runs of the method) |", "|---|---|---|---|---|---|---|"]
    by_run = {e["run"]: e for e in cal["limits"]}
    for name, f in cal["runs"].items():
        e = by_run.get(name) or {}
        sets = ", ".join(f"{k}={v}" for k, v in f["settings"].items())
        fa = e.get("false_alarms") or {}
        onset = "not degraded" if f["onset"] is None else f"{f['onset']} ({f['degraded']})"
        ratio = "–" if e.get("ratio") is None else f"{e['ratio']:.2f}×"
        alarms = "–" if fa.get("rate") is None else f"{fa['warned']} of {fa['healthy_edits']}"
        rows.append(f"| {name} | {f['method']}{' (' + sets + ')' if sets else ''} | {f['healthy']} | {onset} | "
                    f"{_pct(e.get('relative'))} | {ratio} | {alarms} |")
    return "\n".join(rows)
