"""Comparing runs: a markdown table, and PNG plots of sequential runs (scores and downstream
accuracy against the number of edits, ‖Δ‖ per edit).

    runs = [load_run(d) for d in ("runs/rome", "runs/r-rome")]
    print(table(runs)); plot_runs(runs, "runs/plots")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .scoring import summarize_records
from .store import RunError, read_jsonl

__all__ = ["Run", "load_run", "table", "sequential_table", "checkpoint_table", "batch_table", "plot_runs",
           "default_plot_dir"]

COLUMNS = (("n", "n", "{:.0f}"), ("ES", "ES", "{:.1f}"), ("PS", "PS", "{:.1f}"), ("NS", "NS", "{:.1f}"),
           ("S", "S", "{:.1f}"), ("EM", "EM", "{:.1f}"), ("PM", "PM", "{:.1f}"), ("NM", "NM", "{:.1f}"),
           ("GE", "GE", "{:.1f}"), ("gen_ES", "gen-ES", "{:.1f}"), ("gen_PS", "gen-PS", "{:.1f}"),
           ("gen_NS", "gen-NS", "{:.1f}"), ("gen_S", "gen-S", "{:.1f}"), ("gen_leak", "gen leak", "{:.1f}"),
           ("gap_ES", "ES − gen-ES", "{:.1f}"), ("gap_PS", "PS − gen-PS", "{:.1f}"),
           ("efficacy", "zsRE eff.", "{:.1f}"), ("paraphrase", "zsRE para.", "{:.1f}"),
           ("specificity", "zsRE spec.", "{:.1f}"),
           ("edit_tf", "edits TF", "{:.1f}"), ("edit_gen", "edits gen", "{:.1f}"),
           ("edit_gen_q", "edits gen (Q)", "{:.1f}"),
           ("instance_gen", "chain gen", "{:.1f}"), ("multihop_tf", "multi-hop TF", "{:.1f}"),
           ("portability", "portability", "{:.1f}"), ("multihop_gen", "multi-hop gen", "{:.1f}"),
           ("multihop_old", "multi-hop old ans.", "{:.1f}"), ("base_multihop_tf", "unedited multi-hop TF", "{:.1f}"),
           ("base_multihop_gen", "unedited multi-hop gen", "{:.1f}"),
           ("base_multihop_new", "unedited new ans.", "{:.1f}"), ("rewrite_acc", "edit succ.", "{:.1f}"),
           ("rephrase_acc", "rephrase", "{:.1f}"), ("locality", "locality", "{:.1f}"),
           ("rewrite_gen", "edit gen", "{:.1f}"), ("rewrite_em", "edit EM", "{:.1f}"),
           ("rephrase_gen", "rephrase gen", "{:.1f}"), ("rephrase_em", "rephrase EM", "{:.1f}"),
           ("portability_gen", "portability gen", "{:.1f}"),
           ("locality_gen", "locality gen", "{:.1f}"), ("delta_norm_median", "‖Δ‖/numel med.", "{:.3g}"),
           ("delta_norm_max", "‖Δ‖/numel max", "{:.3g}"), ("disabling", "‖Δ‖ outliers", "{:.0f}"),
           ("seconds_per_edit", "s/edit", "{:.2f}"))


@dataclass
class Run:
    """One run directory, read back."""

    path: Path
    config: dict
    summary: dict
    records: List[dict]
    downstream: List[dict]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def sequential(self) -> bool:
        return bool(self.config.get("compare", {}).get("sequential"))

    @property
    def mode(self) -> str:
        """"single" or "sequential", with the batch size when an edit takes more than one case."""
        compare = self.config.get("compare", {})
        batch = compare.get("cases_per_edit") or compare.get("batch_size") or 1  # the name before 2026-12-06
        mode = "sequential" if self.sequential else "single"
        return f"{mode}, batches of {batch}" if batch > 1 else mode

    @property
    def mode_text(self) -> str:
        """The mode in one line (:func:`~factedit.evaluation.runner.mode_text`)."""
        from .runner import mode_text

        compare = self.config.get("compare", {})
        return mode_text(self.sequential, compare.get("cases_per_edit") or compare.get("batch_size") or 1)


def load_run(directory) -> Run:
    """Read a run directory written by :func:`~factedit.evaluation.runner.run_eval`."""
    d = Path(directory)
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunError(f"{d}: not an evaluation run (config.json missing or damaged)") from None
    records, _ = read_jsonl(d / "cases.jsonl")
    downstream, _ = read_jsonl(d / "downstream.jsonl")
    replayed = {x["n_edits"]: x["wear"] for x in read_jsonl(d / "wear.jsonl")[0] if "wear" in x}
    for cp in downstream:  # a run recorded before the wear meter: the wear bench/replay_wear.py measured since
        if not cp.get("wear") and cp.get("n_edits") in replayed:
            cp["wear"] = replayed[cp["n_edits"]]
    try:
        summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = summarize_records(records)
    summary.setdefault("method", config.get("compare", {}).get("method"))
    return Run(d, config, summary, records, downstream)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "–"
    text = fmt.format(value)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0" from rounding


def table(runs: Sequence[Run]) -> str:
    """A markdown table, one row per run, with the columns that any run has."""
    cols = [c for c in COLUMNS if any(r.summary.get(c[0]) is not None for r in runs)]
    head = ["run", "method", "mode"] + [c[1] for c in cols]
    rows = [[r.name, str(r.summary.get("method")), r.mode]
            + [_cell(r.summary.get(k), f) for k, _, f in cols] for r in runs]
    return _markdown(head, rows)


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _baseline_ge(runs: Sequence[Run]) -> dict:
    """case id -> GE of an unedited run (method ``none``) among ``runs``; {} when there is none."""
    for r in runs:
        if r.summary.get("method") == "none" and not r.sequential:
            return {x["case_id"]: x["GE"] for x in r.records if "error" not in x and x.get("GE") is not None}
    return {}


def _ge_window(records: Sequence[dict], first: bool, k: int, base: dict) -> Optional[float]:
    """Mean GE (× 100) of the first or last ``k`` edits of a sequential run, in edit order; minus the
    same records' unedited GE when ``base`` has them all."""
    ok = sorted((r for r in records if "error" not in r and r.get("GE") is not None),
                key=lambda r: (r["n_edits_before"], r["case_id"]))
    part = ok[:k] if first else ok[-k:]
    if not part:
        return None
    ref = [base[r["case_id"]] for r in part] if all(r["case_id"] in base for r in part) else [0.0] * len(part)
    return 100 * sum(r["GE"] - b for r, b in zip(part, ref)) / len(part)


def sequential_table(runs: Sequence[Run], window: int = 40) -> str:
    """A markdown table of the sequential runs among ``runs`` with downstream checkpoints: what is
    left at the end (ES/PS/NS of all earlier edits re-scored on the final weights), fluency of the
    first and last ``window`` edits (GE sampled right after each edit; as the change from the same
    records' unedited GE when an unedited run of them is among ``runs``, since GE varies more between
    records than edits change it), and downstream accuracy at 0 edits and at the end; "" when there
    is none."""
    seq = [r for r in runs if r.sequential and r.downstream]
    if not seq:
        return ""
    base = _baseline_ge(runs)
    ge = "ΔGE vs unedited" if base else "GE"
    head = ["run", "method", "edits", "ES after edit", "ES at end", "PS at end", "NS at end",
            f"{ge}, first {window}", f"{ge}, last {window}", "downstream mean at 0", "downstream mean at end"]
    # the generation-based retention and the ability measures, when any run tracked them
    extra = [(name, fn) for name, fn in (
        # gen-ES, then a KnowEdit/QAEdit run's own scores (its checkpoints re-score edit success and locality)
        *((f"{_HEADS[k]} at end", lambda f, l, k=k: _retention_cell(l, k))
          for k in ("gen_ES", "rewrite_acc", "rewrite_gen", "locality", "locality_gen")),
        ("perplexity at 0", lambda f, l: _perplexity(f)),
        ("perplexity at end", lambda f, l: _perplexity(l)),
        ("known recall at end", lambda f, l: _known_recall(l)),
        ("re-scored at end", lambda f, l: _rescored(l)))
        if any(fn(r.downstream[0], r.downstream[-1]) != "–" for r in seq)]
    head += [name for name, _ in extra]
    rows = []
    for r in seq:
        first, last = r.downstream[0], r.downstream[-1]
        ret = last.get("retention") or {}
        mean = [(d.get("tasks") or {}).get("mean") for d in (first, last)]
        rows.append([r.name, str(r.summary.get("method")), str(last["n_edits"]), _cell(r.summary.get("ES"), "{:.1f}"),
                     *(_cell(ret.get(k), "{:.1f}") for k in ("ES", "PS", "NS")),
                     *(_cell(_ge_window(r.records, f, window, base), "{:.1f}") for f in (True, False)),
                     *(_cell(None if m is None else 100 * m, "{:.1f}") for m in mean),
                     *(fn(first, last) for _, fn in extra)])
    return _markdown(head, rows)


def _retention_cell(checkpoint: dict, key: str) -> str:
    """One score of the earlier edits a checkpoint re-scored ("–" when it has none)."""
    return _cell((checkpoint.get("retention") or {}).get(key), "{:.1f}")


def _perplexity(checkpoint: dict) -> str:
    return _cell((checkpoint.get("ability") or {}).get("perplexity"), "{:.2f}")


def _known_recall(checkpoint: dict) -> str:
    """The share of known facts still answered, in percent; "(−N)" when N facts about edited subjects were
    left out of it (runs recorded before 2026-12-06 left none out)."""
    ab = checkpoint.get("ability") or {}
    got = ab.get("known_recall")
    cell = _cell(None if got is None else 100 * got, "{:.1f}")
    return f"{cell} (−{ab['known_excluded']})" if got is not None and ab.get("known_excluded") else cell


def _rescored(checkpoint: dict) -> str:
    """How many earlier edits a checkpoint re-scored: "50 of 1000" for a sample, else "all"."""
    ret = checkpoint.get("retention") or {}
    if not ret:
        return "–"
    return f"{ret.get('n')} of {checkpoint['n_edits']}" if checkpoint.get("retention_cases") else "all"


#: the earlier edits' scores a checkpoint table shows: CounterFact's, or a KnowEdit / QAEdit run's
_RETENTION_KEYS = ("ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS", "rewrite_acc", "rephrase_acc", "locality",
                   "rewrite_gen", "rewrite_em", "rephrase_gen", "rephrase_em", "locality_gen", "gen_leak")
_HEADS = {k: head for k, head, _ in COLUMNS}
#: the columns of :func:`checkpoint_table`: header -> value of one checkpoint record
_CHECKPOINT_COLUMNS = (
    *((_HEADS[k], lambda d, k=k: _retention_cell(d, k)) for k in _RETENTION_KEYS),
    ("re-scored", _rescored),
    ("perplexity", _perplexity),
    ("known recall", _known_recall),
    ("wear (max layer)", lambda d: _cell(100 * max(d["wear"].values()) if d.get("wear") else None, "{:.1f}%")),
    ("downstream mean", lambda d: _cell(None if (d.get("tasks") or {}).get("mean") is None
                                        else 100 * d["tasks"]["mean"], "{:.1f}")),
    ("s", lambda d: _cell(d.get("seconds"), "{:.0f}")),
)


def checkpoint_table(run: Run) -> str:
    """A markdown table of one sequential run's checkpoints, one row per checkpoint: the earlier edits
    re-scored on the weights of that moment (both score families, how many were re-scored), the
    ability measures and downstream accuracy tracked, and the checkpoint's own cost; "" without
    checkpoints. Columns nothing was measured for are left out."""
    if not run.downstream:
        return ""
    cols = [(h, fn) for h, fn in _CHECKPOINT_COLUMNS if any(fn(d) != "–" for d in run.downstream)]
    rows = [[str(d["n_edits"]), *(fn(d) for _, fn in cols)] for d in run.downstream]
    return _markdown(["edits", *(h for h, _ in cols)], rows)


def _batch_row(run: Run) -> Optional[list]:
    """One row of :func:`batch_table`, or None for a run that is not one batch of every case it holds."""
    groups = {x.get("group") for x in run.records}
    if len(groups) != 1 or len(run.records) < 2:
        return None
    recs, s = run.records, run.summary
    first = recs[0]
    timings = first.get("edit_timings") or {}
    end = next((d for d in reversed(run.downstream) if d.get("n_edits") == len(recs)), {})
    peak = None
    res = run.path / "resources.json"
    if res.is_file():
        peak = json.loads(res.read_text(encoding="utf-8")).get("peak_rss_mib")
    scored = sum(1 for x in recs if x.get("ES") is not None)
    verified = [x.get("verified") for x in recs if x.get("verified") is not None]  # (a failed case: not verified)
    # the method with the options it was given (`--set`), so that e.g. EMMET with and without a ridge differ
    sets = (run.config.get("compare", {}).get("method_options") or {}).get("options") or []
    method = " ".join([str(s.get("method")), *(f"{k}={v}" for k, v in sets)])
    return [str(len(recs)), method, f"{scored}", *(_cell(s.get(k), "{:.1f}") for k in (
        "ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS")),
        f"{sum(verified)} of {len(recs)}" if verified else "–",
        _perplexity(end), _known_recall(end),
        _cell(timings.get("values"), "{:.0f}"), _cell(timings.get("solve"), "{:.1f}"),
        _cell(timings.get("verify"), "{:.0f}"), _cell(first.get("edit_seconds", 0) * len(recs), "{:.0f}"),
        _cell(first.get("edit_peak_rss_mib"), "{:.0f}"), _cell(peak, "{:.0f}")]


def batch_table(runs: Sequence[Run]) -> str:
    """A markdown table of one-batch runs (every case edited together from the original weights), one row per run: the
    method and its ``--set`` options, the cases scored right after the edit (all, or a sample of them), both score
    families, how many of the batch's cases took on their own prompt (verification, all of them; a case left out of the
    batch did not), perplexity and known recall after the batch, seconds of its phases (values: the targets, optimised
    or read from disk; solve: keys and the closed form; verify) and of the whole edit, and the peak resident memory of
    the process during the edit and during the whole run (scoring and checkpoints included; ``resources.json``). Runs
    that are not one batch are left out; "" when none is."""
    rows = [row for row in map(_batch_row, runs) if row is not None]
    if not rows:
        return ""
    head = ["batch", "method", "scored", "ES", "PS", "NS", "gen-ES", "gen-PS", "gen-NS", "verified",
            "perplexity", "known recall", "targets s", "solve s", "verify s", "edit s", "edit peak MiB", "run peak MiB"]
    return _markdown(head, rows)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RunError("plots need matplotlib: pip install 'factedit[eval]'") from None
    return plt


#: the re-scored retention panels of the sequential plot, (teacher-forced key, generation-based key): CounterFact's
#: ES/PS/NS, then the KnowEdit/QAEdit family's edit success, rephrase and locality
_SCORE_PANELS = (("ES", "gen_ES"), ("PS", "gen_PS"), ("NS", "gen_NS"),
                 ("rewrite_acc", "rewrite_gen"), ("rephrase_acc", "rephrase_gen"), ("locality", "locality_gen"))


def _retention_points(run: Run, key: str) -> list:
    return [(d["n_edits"], d["retention"][key]) for d in run.downstream
            if (d.get("retention") or {}).get(key) is not None]


def score_panels(runs: Sequence[Run]) -> List[Tuple[str, str]]:
    """The panels of the sequential scores plot that some run has a re-scored checkpoint for (in
    :data:`_SCORE_PANELS` order): a QAEdit run's are edit success, rephrase and locality, a CounterFact run's
    ES/PS/NS."""
    return [(tf, gen) for tf, gen in _SCORE_PANELS if any(_retention_points(r, k) for r in runs for k in (tf, gen))]


def plot_runs(runs: Sequence[Run], out_dir) -> List[Path]:
    """PNG plots of the sequential runs among ``runs`` (one line per run); returns the files written."""
    seq = [r for r in runs if r.sequential]
    if not seq:
        return []
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    panels = score_panels(seq)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(13 * len(panels) / 3, 3.8), sharey=True, squeeze=False)
        for ax, (tf, gen) in zip(axes[0], panels):
            for i, r in enumerate(seq):
                for k, style, mark, label in ((tf, "-", "o", r.name), (gen, "--", "x", f"{r.name} (generated)")):
                    pts = _retention_points(r, k)
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{i}", marker=mark, ms=4, label=label)
            ax.set(title=f"{_HEADS[tf]} of earlier edits, re-scored\n(dashed, x: {_HEADS[gen]})", xlabel="edits",
                   ylim=(0, 100))
        axes[0][0].set_ylabel("%")
        axes[0][0].legend(fontsize=8)
        save(fig, "sequential_scores.png")

    tasks = sorted({t for r in seq for d in r.downstream for t in (d.get("tasks") or {}) if t != "mean"})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.2 * (len(tasks) + 1), 3.4), sharey=True)
        for ax, t in zip(axes, tasks + ["mean"]):
            for r in seq:
                pts = [(d["n_edits"], 100 * d["tasks"][t]) for d in r.downstream if t in (d.get("tasks") or {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=r.name)
            ax.set(title=t, xlabel="edits", ylim=(0, 100))
        axes[0].set_ylabel("accuracy %")
        axes[0].legend(fontsize=8)
        save(fig, "sequential_downstream.png")

    if any((d.get("ability") or {}).get(k) is not None for r in seq for d in r.downstream
           for k in ("perplexity", "known_recall")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key, title, scale in ((axes[0], "perplexity", "perplexity (held-out text)", 1),
                                      (axes[1], "known_recall", "known facts still answered (%)", 100)):
            for r in seq:
                pts = [(d["n_edits"], scale * d["ability"][key]) for d in r.downstream
                       if (d.get("ability") or {}).get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=r.name)
            ax.set(title=title, xlabel="edits")
        axes[0].set_yscale("log")  # a collapse multiplies it by orders of magnitude
        axes[1].set_ylim(0, 100)
        axes[0].legend(fontsize=8)
        save(fig, "sequential_ability.png")

    if any(d.get("wear") for r in seq for d in r.downstream):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for r in seq:
            pts = [(d["n_edits"], 100 * max(d["wear"].values())) for d in r.downstream if d.get("wear")]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=r.name)
        ax.set(xlabel="edits", ylabel="% of ‖W‖", title="wear: largest ‖W − W⁰‖ / ‖W⁰‖ of the edited layers")
        ax.legend(fontsize=8)
        save(fig, "sequential_wear.png")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in seq:
        pts = sorted({(x["n_edits_before"] + 1, x["delta_norm"]) for x in r.records if x.get("delta_norm")})
        if pts:
            ax.plot(*zip(*pts), marker=".", lw=0.8, label=r.name)
    ax.set(yscale="log", xlabel="edit number", ylabel="‖Δ‖ / numel(Δ)", title="update norm per edit")
    ax.legend(fontsize=8)
    save(fig, "sequential_delta_norm.png")
    return written


def default_plot_dir(runs: Sequence[Run]) -> Optional[Path]:
    """Where plots go without ``--plots``: inside the single sequential run, else next to the runs."""
    seq = [r for r in runs if r.sequential]
    if not seq:
        return None
    return seq[0].path / "plots" if len(seq) == 1 else seq[0].path.parent / "plots"
