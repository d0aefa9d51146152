"""The runs behind docs/RESULTS.md, in one process, then their table.

Each run is exactly ``factedit eval`` with the options printed in the table (same code path, same
configuration file, resumable the same way: run this again after an interruption and each run
continues where it stopped). Doing them in one process lets runs share what is identical between
them: the Editor's memo of optimised targets (rome / r-rome / p-rome share δ, memit / emmet /
alphaedit share z*; the runs of such a family advance one chunk at a time in turn), the loaded
model and statistics, and the downstream accuracy of the original weights (the same for every
sequential run at 0 edits).

    python bench/run_results.py single --limit 200                 # runs/single/<method>
    python bench/run_results.py sequential --limit 200             # runs/seq/<method>
    python bench/run_results.py long --limit 1000 --every 100      # runs/long/<method> (issue 16)
    python bench/run_results.py capacity                           # runs/capacity/<method>: to 10,000 edits (issue 36)
    python bench/run_results.py mquake --limit 100                 # runs/mquake/<method> (issue 34)
    python bench/run_results.py qaedit --limit 200                 # runs/qaedit/<method>, one by one
    python bench/run_results.py qaedit-seq --limit 200             # runs/qaedit-seq/<method>, accumulated
    python bench/run_results.py batch --methods memit-100,emmet-100  # runs/batch/<run>: one batch of N (issue 36)
    python bench/run_results.py table                              # print the tables of every part (markdown)

A long run's directory, with the patch stack a resume re-applies (``patches/``), lives in
``runs/long/<method>``, outside git; after the run, and whenever it stops (interrupted, failed), its
records that the docs cite (config.json, cases.jsonl, downstream.jsonl, summary.json, unedited.json) are
copied into ``results/long/<method>`` (kept in git; ``table`` reads them there). Records there are never
replaced by a run holding fewer edits (e.g. one started again from edit 0): remove them to allow it.
A run given ``--out`` elsewhere copies its records only where ``--records`` says. Every run also records
the peak resident memory of its process while it ran (``resources.json``; Linux, the largest of its stretches
when it ran in several).

Run it alone on the machine: the table reports seconds per edit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CF = DATA / "counterfact" / "counterfact_knowedit.jsonl"
CORPUS = DATA / "corpus" / "wikitext2_valid.txt"
DOWNSTREAM = DATA / "downstream"

#: run name -> (method, cases per edit, *--set options); the run's directory is its name
#: (the batch methods' rows of docs/RESULTS.md dated up to 2026-12-01 were run with MEMIT's target lr 0.5, the
#: default then; `value.lr=0.5` keeps them reproducible now that the default is 1.0, docs/ALGORITHMS.md §2)
LR05 = "value.lr=0.5"
SINGLE = {"none": ("none", 1), "rome": ("rome", 1), "r-rome": ("r-rome", 1), "p-rome": ("p-rome", 1),
          "memit": ("memit", 25, LR05), "emmet": ("emmet", 25, LR05), "alphaedit": ("alphaedit", 25, LR05),
          "ft": ("ft", 25), "ft-b1": ("ft", 1), "ft-b1-unclamped": ("ft", 1, "norm_constraint=1"),
          # the template-averaged current residual (before issue 18's fix), kept as an option
          "memit-zt": ("memit", 25, "current_residual=templates", LR05),
          "emmet-zt": ("emmet", 25, "current_residual=templates", LR05),
          "alphaedit-zt": ("alphaedit", 25, "current_residual=templates", LR05),
          # issue 34: ROME without C⁻¹ (C = I), what an EasyEdit file with mom2_adjustment: false runs
          "rome-noc": ("rome", 1, "mom2_adjustment=false"),
          # issue 35: r-ROME's δ by NAdam (fewer steps, a shorter δ: docs/ALGORITHMS.md §2), against "r-rome"
          "r-rome-nadam": ("r-rome", 1, "value.optimizer=nadam")}
#: sequential runs, in the order they are run (the cheaper batch methods first)
SEQUENTIAL = {"emmet": ("emmet", 10, LR05), "alphaedit": ("alphaedit", 10, LR05), "rome": ("rome", 1),
              "r-rome": ("r-rome", 1), "rome-noc": ("rome", 1, "mom2_adjustment=false"),
              "r-rome-nadam": ("r-rome", 1, "value.optimizer=nadam")}
#: the 1,000-edit sequential runs of issue 16: batches of 100 for the batch methods (targets shared),
#: single edits for the ROME variants; perplexity on held-out text and known-fact recall every --every edits
#: "alphaedit" is the run of the default before 2026-12-06 (α relative, alpha_scale 0.02); since then the default
#: is the paper's α = 10, the "alphaedit-a10" run
LONG = {"emmet": ("emmet", 100), "alphaedit": ("alphaedit", 100, "alpha_scale=0.02"), "r-rome": ("r-rome", 1),
        "rome": ("rome", 1),
        # issue 32: the lifelong method, in turns of 100 as the reference edits; AlphaEdit with the paper's α;
        # the fourth approach (recursive least squares); norm anchoring on EMMET and AlphaEdit (α = 10)
        "ultraedit": ("ultraedit", 100), "alphaedit-a10": ("alphaedit", 100, "alpha=10"), "rls": ("rls", 100),
        "emmet-nas": ("emmet", 100, "norm_anchor=true"),
        "alphaedit-a10-nas": ("alphaedit", 100, "alpha=10", "norm_anchor=true")}
#: issue 36: edits 1 -> 10,000 of the lifelong-capable methods, one run each, affordable on 2 cores: every
#: CAPACITY_SCORE_EVERY-th edit scored right after it, perplexity / known recall / a fixed sample of earlier
#: edits at CAPACITY_CHECKPOINTS, and a stop rule for a collapsed model (CAPACITY_STOP)
CAPACITY = {k: LONG[k] for k in ("alphaedit-a10", "alphaedit-a10-nas", "emmet", "ultraedit", "rls", "r-rome")}
CAPACITY_CHECKPOINTS = (100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000)
CAPACITY_SCORE_EVERY = 10
#: collapsed: known-fact recall below a quarter of the unedited model's, or perplexity above twice its
CAPACITY_STOP = ("--stop-recall", "0.25", "--stop-ppl", "2")
#: issue 36: one batch from the original weights at each size (records 1..N), MEMIT and EMMET; the targets are
#: kept on disk ($FACTEDIT_HOME/targets, EditCaches.disk_targets), so both methods and every size share them and
#: an interrupted batch continues (the sizes nest); BATCH_SCORE_SAMPLE cases of a larger batch scored right after
#: it, perplexity and known recall at the end
BATCH_SIZES = (100, 1000, 2000, 5000, 10000)
#: (EMMET past the keys' 1,536 dimensions is MEMIT with its weight, docs/ALGORITHMS.md §5: no emmet-2000 and up)
BATCH = {f"{m}-{n}": (m, n) for n in BATCH_SIZES for m in ("memit", "emmet") if m == "memit" or n <= 1536}
#: EMMET with the authors' always-on ridge (emmet_lambda 0.1 on Kᵀ(w·C)⁻¹K, i.e. ridge = 0.1·w here with our
#: w = mom2_update_weight 1000, docs/ALGORITHMS.md §5): what it needs past n = d_ff (1,536), beside the default
BATCH.update({f"emmet-{n}-ridge100": ("emmet", n, "ridge=100") for n in BATCH_SIZES})
#: MEMIT with ten times the default λ (mom2_update_weight 10,000; MEMIT's GPT-J file has 15,000): what a stiffer
#: preservation term keeps of the model at large batches, and what it costs in efficacy
BATCH.update({f"memit-{n}-w10000": ("memit", n, "mom2_update_weight=10000") for n in BATCH_SIZES})
BATCH_SCORE_SAMPLE = 500
#: earlier edits re-scored at each checkpoint of a long run (evenly spaced, first and latest included):
#: all of them would cost O(n²), 5,500 case scorings per run at 0.3–0.8 s each on 2 cores (50 took 16–41 s)
RETENTION = 50
#: MQuAKE: each case's 1-3 edits together (one batch, or one after another for the ROME variants), from the
#: original weights; "rome-noc" is ROME without C⁻¹ (C = I, what an EasyEdit file with mom2_adjustment: false runs)
MQUAKE_RUNS = {"none": ("none", 1), "rome": ("rome", 1), "r-rome": ("r-rome", 1), "rome-noc": ("rome", 1,
               "mom2_adjustment=false"), "memit": ("memit", 1), "emmet": ("emmet", 1), "alphaedit": ("alphaedit", 1)}
#: QAEdit one by one (batch methods: 25 cases per edit, each batch from the original weights) and accumulated
QAEDIT_RUNS = {"none": ("none", 1), "rome": ("rome", 1), "r-rome": ("r-rome", 1),
               "rome-noc": ("rome", 1, "mom2_adjustment=false"), "memit": ("memit", 25), "emmet": ("emmet", 25),
               "alphaedit": ("alphaedit", 25)}
QAEDIT_SEQ = {k: v for k, v in QAEDIT_RUNS.items() if k != "none"}
DATASETS = {"mquake": DATA / "mquake" / "mquake_cf_354.json", "qaedit": DATA / "qaedit" / "qaedit_1k.json",
            "qaedit-seq": DATA / "qaedit" / "qaedit_1k.json"}
PPL_CORPUS = DATA / "corpus" / "wikitext2_test.txt"
KNOWNS = DATA / "knowns" / "known_1000.json"
PARTS = {"single": SINGLE, "sequential": SEQUENTIAL, "long": LONG, "mquake": MQUAKE_RUNS, "qaedit": QAEDIT_RUNS,
         "qaedit-seq": QAEDIT_SEQ, "capacity": CAPACITY, "batch": BATCH}
#: where each part's run directories go (outside git: /runs/ is ignored); a long run spans sessions, and its
#: directory keeps the patch stack a resume re-applies
DEFAULT_OUT = {"single": ROOT / "runs" / "single", "sequential": ROOT / "runs" / "seq", "long": ROOT / "runs" / "long",
               "capacity": ROOT / "runs" / "capacity", "batch": ROOT / "runs" / "batch",
               **{part: ROOT / "runs" / part for part in DATASETS}}
#: where a part's records are copied after each run (kept in git, cited by docs/RESULTS.md; read by `table`)
RECORDS = {"long": ROOT / "results" / "long", "capacity": ROOT / "results" / "capacity",
           "batch": ROOT / "results" / "batch", "qaedit-seq": ROOT / "results" / "qaedit-seq"}
#: the files of a run directory that are copied there: its records, not its patch stack
RECORD_FILES = ("config.json", "cases.jsonl", "downstream.jsonl", "summary.json", "unedited.json", "resources.json")


def _rel(p: Path) -> str:
    """``p`` relative to the repository root (the commands run there), e.g. ``../shared/data/...``."""
    return os.path.relpath(p.resolve(), ROOT)


def command(name: str, part: str, limit: int, out: Path, downstream_n: int, every: int) -> list:
    """The ``factedit eval`` argument list of run ``name`` (what the table prints)."""
    method, batch, *options = PARTS[part][name]
    if part == "batch":  # one batch of its size: the run's records are the first `batch` ones
        limit = batch
    args = ["factedit", "eval", "--method", method, "--dataset", _rel(DATASETS.get(part, CF)), "--limit", str(limit)]
    if batch > 1:
        args += ["--cases-per-edit", str(batch)]
    if part in ("sequential", "long"):
        args += ["--sequential", "--downstream-every", str(every)]
    if part == "qaedit-seq":  # WILD's sequential protocol: every edit re-scored after the last one
        args += ["--sequential", "--checkpoints", str(limit)]
    if part == "sequential":
        args += ["--downstream", _rel(DOWNSTREAM), "--downstream-n", str(downstream_n)]
    if part == "capacity":
        args += ["--sequential", "--checkpoints", ",".join(map(str, CAPACITY_CHECKPOINTS)), "--score-every",
                 str(CAPACITY_SCORE_EVERY), *CAPACITY_STOP]
    if part == "batch":  # the batch, then perplexity and known recall once (a checkpoint re-scores 2 of its cases)
        args += ["--sequential", "--checkpoints", str(batch)]
        if batch > BATCH_SCORE_SAMPLE:
            args += ["--score-sample", str(BATCH_SCORE_SAMPLE)]
    if part in ("long", "capacity", "batch", "qaedit-seq"):  # GLUE/MMLU sit at chance here: perplexity, known facts
        args += ["--ppl-corpus", _rel(PPL_CORPUS), "--knowns", _rel(KNOWNS)]
        if part != "qaedit-seq":  # (it re-scores all of its edits)
            args += ["--retention-sample", str(2 if part == "batch" else RETENTION)]
    if method != "none":
        args += ["--stats-corpus", _rel(CORPUS)]
    for opt in options:
        args += ["--set", opt]
    return args + ["--out", _rel(out / name)]


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def copy_records(run_dir: Path, dest: Path) -> list:
    """Copy the records of ``run_dir`` (:data:`RECORD_FILES` that exist, not ``patches/``) into ``dest``,
    each atomically (a temporary file beside it, then ``os.replace``). Nothing is copied when ``dest``
    already holds more case records than ``run_dir`` (a run started again must not replace the records
    of a longer one; remove ``dest`` to allow it), nor when ``run_dir`` holds none. Returns the paths written."""
    run_dir, dest = Path(run_dir), Path(dest)
    cases = _count_lines(run_dir / "cases.jsonl")
    if not cases:  # stopped before its first case: nothing to keep
        return []
    if _count_lines(dest / "cases.jsonl") > cases:
        print(f"  {dest} holds more case records than {run_dir}: not replaced (remove it to allow it)",
              file=sys.stderr, flush=True)
        return []
    written = []
    for name in RECORD_FILES:
        src = run_dir / name
        if not src.is_file():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{name}.tmp-{os.getpid()}"
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest / name)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(dest / name)
    return written


#: runs whose targets are identical (the Editor's memo shares them): taken chunk by chunk in turn
FAMILIES = (("r-rome", "rome", "p-rome", "rome-noc"),
            ("memit", "emmet", "alphaedit", "memit-zt", "emmet-zt", "alphaedit-zt"))


class _Pause(Exception):
    """Raised after one chunk of a run, to give the next run of its family a turn."""


def run(part: str, methods, limit: int, out: Path, downstream_n: int, every: int, records: Path = None) -> None:
    """Run (or continue) ``methods`` of ``part`` in ``out/<method>``; with ``records``, copy each run's
    records into ``records/<method>`` after it and whenever it stops (:func:`copy_records`)."""
    from factedit import Editor, load_model
    from factedit.cli import parse
    from factedit.core.timing import PeakWindow
    from factedit.evaluation import run_eval

    model, tok = load_model()
    editor = Editor(model, tok, progress=False)
    editor.caches.disk_targets = part == "batch"  # targets shared by both methods and every size, across processes
    # single edits: the runs of a family advance one chunk at a time in turn, so that each chunk's
    # targets are optimised once for all of them, and an interruption loses at most one chunk of it
    groups = [[m] for m in methods]
    if part in ("single", "mquake", "qaedit"):  # runs from the original weights: a family shares its targets
        groups = [[m for m in fam if m in methods] for fam in FAMILIES]
        groups = [g for g in groups if g] + [[m] for m in methods if not any(m in f for f in FAMILIES)]
    for family in groups:
        todo = list(family)
        t0 = {m: None for m in family}
        while todo:
            for m in list(todo):
                argv = command(m, part, limit, out, downstream_n, every)
                settings = parse(argv[1:])
                if t0[m] is None:
                    t0[m] = time.perf_counter()
                    print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(argv)}", file=sys.stderr, flush=True)

                def progress(done: int, total: int, m=m) -> None:
                    print(f"  {m}: {done}/{total} groups, {time.perf_counter() - t0[m]:.0f} s", file=sys.stderr,
                          flush=True)
                    if len(family) > 1 and done < total:
                        raise _Pause()

                memory = PeakWindow()
                try:
                    with memory:
                        s = run_eval(editor, settings.eval, settings["out"], on_group=progress)
                except _Pause:
                    continue
                finally:  # after the run, and when it stops (interrupted, failed): its records to `records`
                    if memory.peak is not None and (out / m).is_dir():
                        _record_peak(out / m, memory.peak)
                    if records is not None and (out / m).is_dir():
                        copy_records(out / m, records / m)
                todo.remove(m)
                shown = [k for k in ("ES", "PS", "NS", "GE", "edit_tf", "multihop_gen", "rewrite_gen", "locality")
                         if s.get(k) is not None]
                print(f"  {m}: " + " ".join(f"{k} {s[k]:.1f}" for k in shown), file=sys.stderr, flush=True)
                if editor.history:  # a sequential run leaves its edits applied: back to the original weights
                    editor.revert(len(editor.history))


def _record_peak(run_dir: Path, peak: float) -> None:
    """Keep the largest peak resident memory (MiB) of the run's stretches in ``run_dir/resources.json``."""
    import json

    from factedit.core.paths import atomic_write_text

    path = run_dir / "resources.json"
    old = json.loads(path.read_text()).get("peak_rss_mib", 0) if path.is_file() else 0
    atomic_write_text(path, json.dumps({"peak_rss_mib": round(max(old, peak), 1),
                                        "what": "peak resident memory of the process while the run ran (Linux "
                                                "VmHWM reset at each start of it; the largest over its stretches)"}))


def table(out: Path, part: str, methods, limit: int, downstream_n: int, every: int, run_out: Path = None) -> str:
    """The tables of the runs in ``out`` (a part's records); the commands they print write to ``run_out``
    (the run directories; default ``out``)."""
    from factedit.evaluation.summarize import batch_table, checkpoint_table, load_run, sequential_table
    from factedit.evaluation.summarize import table as summary_table

    runs = [load_run(out / m) for m in methods if (out / m / "summary.json").is_file()]
    lines = [summary_table(runs), ""]
    if part in ("sequential", "long", "capacity"):
        base = out.parent / "single" / "none"  # the unedited run of the same records: per-record GE baseline
        seq = sequential_table(([load_run(base)] if (base / "summary.json").is_file() else []) + runs)
        if seq:
            lines += [seq, ""]
    if part in ("long", "capacity", "qaedit-seq"):
        for r in runs:
            done = len(r.records)
            lines += [f"Checkpoints of `{r.name}` ({done} of {limit} edits committed"
                      f"{'' if r.summary.get('complete') else ', in progress'}):", "", checkpoint_table(r), ""]
    if part == "batch":
        lines = [batch_table(sorted(runs, key=lambda r: (len(r.records), r.name))), ""]
    lines += ["Commands (from the repository root):", "", "```bash"]
    lines += [shlex.join(command(Path(r.path).name, part, limit, run_out or out, downstream_n, every)) for r in runs]
    lines += ["```"]
    return "\n".join(lines)


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=[*PARTS, "table"])
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of the runs, e.g. ft-b1 (default: all of the part)")
    ap.add_argument("--limit", type=int, default=None, help="records (default 200; long: 1000; capacity: 10000)")
    ap.add_argument("--out", default=None, help="runs directory (default runs/single, runs/seq, runs/long)")
    ap.add_argument("--records", default=None,
                    help="where each run's records are copied, and what `table` reads (default for long: results/long, "
                         "unless --out is given; other parts: not copied, `table` reads --out)")
    ap.add_argument("--downstream-n", type=int, default=32)
    ap.add_argument("--every", type=int, default=None, help="checkpoint every K edits (default 40; long: 100)")
    a = ap.parse_args()
    # stop cleanly on SIGINT or SIGTERM, also when started in the background (where a shell ignores SIGINT for
    # it): the run's committed edits stay, and its records are copied as after any stop
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupted)
    os.chdir(ROOT)  # the commands are relative to the repository root
    parts = list(PARTS) if a.part == "table" else [a.part]
    for part in parts:
        methods = a.methods.split(",") if a.methods else list(PARTS[part])
        out = Path(a.out) if a.out else DEFAULT_OUT[part]
        # a run elsewhere (--out) does not replace the records the docs cite unless --records says so
        records = Path(a.records) if a.records else (None if a.out else RECORDS.get(part))
        limit = a.limit or {"long": 1000, "capacity": 10000}.get(part, 200)
        every = a.every or (100 if part == "long" else 40)
        if a.part == "table":
            print(f"### {part}\n\n{table(records or out, part, methods, limit, a.downstream_n, every, out)}\n")
        else:
            run(part, methods, limit, out, a.downstream_n, every, records)

if __name__ == "__main__":
    main()
