"""Where a warm `factedit edit` spends its time (issue: fast where users wait).

Runs the README's demo command (`bash scripts/demo.sh --json --profile`: the Eiffel Tower demo on the
embedded model, statistics, templates and guard calibration already cached) several times, each a fresh
process, and reports per phase the median seconds and the peak RSS, the wall time of the whole command
and its peak RSS; then profiles one `Editor.edit` of the same fact in this process (model loaded, warm).
A yardstick measured in the same run, one forward of the embedded model on 8 × 64 tokens, says how fast
the machine was: the targets are stated in yardsticks too.

    python bench/profile_edit.py --runs 5 --out docs/BENCHMARKS.md

Run it alone on the machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, cpu_name, publish  # noqa: E402

HEADING = "## A warm `factedit edit`, phase by phase"


def yardstick(adapter, reps: int = 5) -> float:
    """Median seconds of one forward of the model on 8 × 64 tokens."""
    ids = torch.randint(100, 10_000, (8, 64), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        adapter.model(input_ids=ids)
        for _ in range(reps):
            t = time.perf_counter()
            adapter.model(input_ids=ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def demo_run() -> dict:
    """One `bash scripts/demo.sh --json --profile` in a fresh process: wall, peak RSS, its phase table."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(["bash", "scripts/demo.sh", "--json", "--profile"], cwd=ROOT, stdout=out, stderr=err)
        _, status = os.waitpid(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"demo failed:\n{stderr}")
    profile = next(json.loads(line)["profile"] for line in stderr.splitlines() if line.startswith('{"profile"'))
    report = json.loads(stdout)
    return {"wall": wall, "profile": profile, "seconds": report["seconds"], "rss": profile[-1]["peak_rss_mb"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="markdown file to (re)write the section into")
    args = ap.parse_args()

    from factedit import Editor, Request, load_model
    from factedit.core.timing import profiling

    model, tok = load_model()
    editor = Editor(model, tok, progress=False)
    stick = yardstick(editor.adapter)
    runs = [demo_run() for _ in range(args.runs + 1)][1:]  # the first run warms the caches of this machine
    stick_after = yardstick(editor.adapter)
    # one Editor.edit of the demo fact, in process: warm (one edit made and reverted first)
    req = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    corpus = str(ROOT.parent / "shared" / "data" / "corpus" / "wikitext2_valid.txt")
    editor.edit(req, stats_corpus=corpus)
    editor.revert()
    edits = []
    for _ in range(3):
        editor.caches._memo.clear()  # the targets of this fact on these weights are memoised: optimise again
        with profiling() as prof:
            t = time.perf_counter()
            res = editor.edit(req, stats_corpus=corpus)
            dt = time.perf_counter() - t
        editor.revert()
        edits.append((dt, prof.to_dict(), res.info[0]["steps"]))

    names = [r["phase"] for r in runs[0]["profile"]]
    depth = {r["phase"]: r["depth"] for r in runs[0]["profile"]}
    med = {n: statistics.median(next(r["seconds"] for r in run["profile"] if r["phase"] == n) for run in runs)
           for n in names}
    rss = {n: max(next(r["peak_rss_mb"] for r in run["profile"] if r["phase"] == n) for run in runs) for n in names}
    walls = sorted(run["wall"] for run in runs)
    wall = statistics.median(walls)
    y = statistics.median([stick, stick_after])
    peak = max(run["rss"] for run in runs)
    lines = [
        HEADING, "",
        f"Command: `python bench/profile_edit.py --runs {args.runs}`  ",
        f"Date: {datetime.date.today().isoformat()}; machine: {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads.  ",
        f"Yardstick: one forward of the embedded model on 8 × 64 tokens, {y:.3f} s (median; {stick:.3f} s before "
        f"the runs, {stick_after:.3f} s after).",
        "",
        f"The README's demo command, warm (`bash scripts/demo.sh --json --profile`, {args.runs} fresh processes "
        "after one untimed): wall time median "
        f"**{wall:.1f} s** ({wall / y:.1f} yardsticks; min {walls[0]:.1f} s, max {walls[-1]:.1f} s), peak RSS "
        f"**{peak:.0f} MiB** (largest of the runs; Linux VmHWM of the `factedit` process).",
        "",
        "| phase (inside `factedit edit`) | median seconds | share of the command's phases | peak RSS after it |",
        "|---|---|---|---|",
    ]
    total = sum(med[n] for n in names if depth[n] == 0)
    for n in names:
        lines.append(f"| {'&nbsp;' * 4 * depth[n]}{n} | {med[n]:.3f} | {100 * med[n] / total:.1f}% | "
                     f"{rss[n]:.0f} MiB |")
    lines += [f"| total of the phases | {total:.3f} | | |", ""]
    dts = sorted(d for d, _, _ in edits)
    lines += [f"`Editor.edit` of the same fact in one process (model loaded, warm; 3 edits, each reverted and its "
              "memoised target forgotten): median "
              f"**{statistics.median(dts):.2f} s** ({statistics.median(dts) / y:.1f} yardsticks), "
              f"{edits[0][2]} optimisation steps; phases of the median one:", "",
              "| phase (inside `Editor.edit`) | seconds |", "|---|---|"]
    median_edit = sorted(edits, key=lambda e: e[0])[1]
    for r in median_edit[1]:
        lines.append(f"| {'&nbsp;' * 4 * r['depth']}{r['phase']} | {r['seconds']:.3f} |")
    publish(lines, args.out, HEADING)


if __name__ == "__main__":
    main()
