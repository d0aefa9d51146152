"""Benchmark of batch editing (MEMIT, EMMET) on the embedded model.

For each batch size n, a fresh process edits the first n CounterFact records (KnowEdit layout)
with distinct (prompt, subject) — CounterFact has a few contradictory pairs, which a batch refuses —
with each method in turn (reverting in between) and reports total seconds, seconds per edit,
the split between target optimisation and the rest (keys + solves), efficacy, and peak RSS.
The target residuals z* are the same for MEMIT and EMMET (same code, same inputs), so they are
optimised once per process, by the first method; later methods reuse them (the Editor's target
memo) and their total is reported as the shared target time plus their own keys + solves.

    python bench/bench_batch.py --sizes 10,100,1000 --methods memit,emmet --out docs/BENCHMARKS.md

Run it alone on the machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, cpu_name, publish  # noqa: E402


def one(methods: list, n: int) -> list:
    """Run inside a fresh process: load, edit n requests with each method, measure."""
    from factedit import Editor, load_model
    from factedit.app.edit import efficacy
    from factedit.core.request_files import load_requests

    reqs, seen = [], set()
    for r in load_requests(CF, limit=2 * n):  # the first n records with distinct (prompt, subject)
        if (r.prompt, r.subject) not in seen and len(reqs) < n:  # (CounterFact has contradictory pairs)
            seen.add((r.prompt, r.subject))
            reqs.append(r)
    model, tok = load_model()
    editor = Editor(model, tok, progress=False)
    rows, shared_values = [], None
    for method in methods:
        cfg = editor.make_config(method, stats_corpus=str(CORPUS))
        for l in cfg.layers:  # statistics are a one-off cost (cached); not part of the edit timing
            editor.stats(l, cfg.stats_corpus, cfg.stats_tokens)
        editor.templates(cfg.seed, cfg.context_lengths)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        result = editor.edit(reqs, config=cfg)
        total = time.perf_counter() - t
        eff = efficacy(editor.adapter, reqs)
        editor.revert()
        values = result.timings.get("values", 0.0)
        rest = total - values
        if shared_values is None:
            shared_values, shared = values, False
        else:
            shared = True
        total = shared_values + rest
        rows.append({"method": method, "n": len(reqs), "seconds": total, "per_edit": total / len(reqs),
                     "values": shared_values, "values_shared": shared, "rest": rest,
                     "solve": result.timings.get("solve", 0.0), "efficacy": eff, "layers": result.layers,
                     "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_edit_mb": rss0})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--methods", default="memit,emmet")
    ap.add_argument("--single-edit-seconds", type=float, default=None,
                    help="median r-ROME edit time to compare with (from bench_edit.py)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--include", default=None,
                    help="JSONL of rows of earlier runs (e.g. smaller sizes): added to the table; "
                         "new rows are appended")
    ap.add_argument("--one", nargs=2, metavar=("METHODS", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0].split(","), int(args.one[1]))))
        return
    rows = []
    if args.include:
        rows += [json.loads(l) for l in Path(args.include).read_text().splitlines() if l.strip()]
    for n in [int(x) for x in args.sizes.split(",") if x]:
        out = subprocess.run([sys.executable, __file__, "--one", args.methods, str(n)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(out.returncode)
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.include:  # keep the raw rows for later runs of other sizes
                with open(args.include, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    cpu = cpu_name()
    lines = ["## Batch editing (MEMIT, EMMET) on the embedded model", "",
             "Command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`"
             + (f" (rows in {args.include} come from earlier runs of this script)" if args.include else "") + "  ",
             f"Date: {datetime.date.today()}; machine: {cpu}, {os.cpu_count()} cores. Each row is a fresh process; "
             "statistics for the span (layers " + ", ".join(map(str, rows[0]['layers']))
             + ", 100k WikiText-2 tokens each) "
             "were cached beforehand and are not in the timings. Target optimisation (*) is shared: "
             "optimised once per process by the first method and reused by the next (identical inputs).", "",
             "| method | n | total s | s / edit | target optimisation s | keys + solves s | efficacy | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = "—" if r["efficacy"] is None else f"{r['efficacy']:.3f}"
        star = " *" if r["values_shared"] else ""
        lines.append(f"| {r['method']} | {r['n']} | {r['seconds']:.1f} | {r['per_edit']:.2f} | "
                     f"{r['values']:.1f}{star} | {r['rest']:.1f} | {eff} | {r['rss_mb']:.0f} |")
    if args.single_edit_seconds:
        lines += ["", f"Single r-ROME edit (median, bench_edit.py): {args.single_edit_seconds:.2f} s; target for a "
                  f"1000-edit batch: ≤ {args.single_edit_seconds / 3:.2f} s per edit."]
    lines += ["", "Memory: keys are kept as (n, d_ff) and residuals as (n, d_model); the solves use "
              "(d_ff × d_ff) systems whatever n is (MEMIT: λC + KKᵀ; EMMET: C⁻¹K then an n × n system), "
              "so memory grows linearly in n; target optimisation runs `batch_size` requests at a time.", ""]
    publish(lines, args.out, "## Batch editing")


if __name__ == "__main__":
    main()
