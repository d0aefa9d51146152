"""Statistics on the CPU: one process against a torchrun world, and what a float32 accumulator changes.

1. ``factedit stats`` of the default edit layer of the embedded model: one process with 2 threads against
   ``torchrun --nproc-per-node 2`` (gloo) with 1 thread each; tokens/s of both and the exactness of the
   merge (relative difference of the float64 sums, token counts). Each run writes into a fresh
   FACTEDIT_HOME, so nothing is read from a cache.
2. The same statistics accumulated in float32 (``--stats-dtype float32``): relative difference of C, and of
   the r-ROME updates and P(new) of the first ``--records`` CounterFact requests edited with either C (the
   targets δ are optimised once and shared, so only C differs).

    python bench/bench_stats.py --tokens 100000 --records 20 --out docs/BENCHMARKS.md

Run it alone on the machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, ROOT, cpu_name, publish  # noqa: E402

HEADING = "## Statistics: one process, torchrun, float32 accumulation"


def _stats_run(home: Path, tokens: int, layer: int, world: int, dtype: str = "float64") -> dict:
    args = ["stats", "--stats-corpus", str(CORPUS), "--stats-tokens", str(tokens), "--layers", str(layer), "--json",
            "--stats-dtype", dtype]
    threads = "1" if world > 1 else "2"
    env = {**os.environ, "FACTEDIT_HOME": str(home), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(ROOT / "src")}
    models = Path(os.environ.get("FACTEDIT_HOME", Path.home() / ".cache" / "factedit")) / "models"
    if models.is_dir() and not (home / "models").exists():  # the converted embedded model, not its statistics
        home.mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(models)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "-m", "factedit"] \
        if world > 1 else [sys.executable, "-m", "factedit"]
    out = subprocess.run(launcher + args, env=env, capture_output=True, text=True, check=True)
    rep = json.loads(out.stdout.strip().splitlines()[-1])["layers"][0]
    return rep


def _sum(home: Path):
    from safetensors import safe_open

    path = next((home / "stats").rglob("*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("mom2_sum"), int(f.metadata()["count"])


def float32_effect(tokens: int, layer: int, records: int) -> dict:
    from factedit import Editor, load_model
    from factedit.core.lm import target_probabilities
    from factedit.core.request_files import load_requests
    from factedit.edit.deltas import apply_deltas
    from factedit.edit.methods.rome import rome_delta

    ed = Editor(*load_model(), progress=False)
    reqs = load_requests(CF, limit=records)
    C = {dt: ed.stats(layer, str(CORPUS), tokens, dtype=dt).mom2.double() for dt in ("float64", "float32")}
    out = {"C": float((C["float32"] - C["float64"]).norm() / C["float64"].norm())}
    rel, dp = [], []
    for req in reqs:
        cfg = ed.make_config("r-rome", layer=layer, stats_corpus=str(CORPUS), stats_tokens=tokens)
        values = ed.compute(req, config=cfg).values
        deltas = {dt: rome_delta(C[dt].float(), values, 0, "r-rome", layer) for dt in C}
        a, b = deltas["float64"].dense().double(), deltas["float32"].dense().double()
        rel.append(float((b - a).norm() / a.norm()))
        p = {}
        for dt, d in deltas.items():
            applied = apply_deltas(ed.adapter, [d])
            p[dt] = target_probabilities(ed.adapter, [req.text], [req.target_new])[0]
            applied.revert()
        dp.append(abs(p["float32"] - p["float64"]))
    out.update(delta_max=max(rel), delta_mean=sum(rel) / len(rel), p_max=max(dp), n=len(reqs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stats-"))
    one = _stats_run(tmp / "one", args.tokens, args.layer, 1)
    two = _stats_run(tmp / "two", args.tokens, args.layer, 2)
    s1, n1 = _sum(tmp / "one")
    s2, n2 = _sum(tmp / "two")
    rel = float((s2 - s1).norm() / s1.norm())
    f32 = float32_effect(args.tokens, args.layer, args.records)
    cmd = "python bench/bench_stats.py" + ("" if args.tokens == 100_000 else f" --tokens {args.tokens}") + \
        ("" if args.records == 20 else f" --records {args.records}")
    lines = [HEADING, "", f"`{cmd}` — {cpu_name()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}. "
             f"Embedded SmolLM2-135M, layer {args.layer}, {args.tokens:,} tokens of WikiText-2 validation "
             "(sequences of 256, 8 per batch), each run in a fresh FACTEDIT_HOME.", "",
             "| run | tokens | seconds (statistics) | tokens/s |", "|---|---|---|---|",
             f"| 1 process × 2 threads | {one['tokens']:,} | {one['seconds']:.1f} | "
             f"{one['tokens'] / one['seconds']:,.0f} |",
             f"| torchrun, 2 gloo processes × 1 thread | {two['tokens']:,} | {two['seconds']:.1f} | "
             f"{two['tokens'] / two['seconds']:,.0f} |", "",
             f"Merge: the torchrun file's float64 sum differs from the single process's by {rel:.1e} (relative "
             f"Frobenius); token counts {n2:,} and {n1:,}. Seconds are the statistics' own (the `seconds` of "
             "`factedit stats --json`), without loading the model or starting the processes.", "",
             f"float32 accumulator (`--stats-dtype float32`, half the memory of the d_ff² sum): C differs by "
             f"{f32['C']:.1e} (relative Frobenius); over the first {f32['n']} CounterFact requests edited with "
             f"r-ROME at layer {args.layer} with the same δ, the update differs by {f32['delta_mean']:.1e} on "
             f"average (at most {f32['delta_max']:.1e}) and P(new) after the edit by at most {f32['p_max']:.1e}.", ""]
    publish(lines, args.out, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
