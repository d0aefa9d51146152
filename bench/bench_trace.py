"""Benchmark of causal tracing on the embedded model (issue: locate before you edit).

Measures seconds per single-prompt full trace (hidden + MLP + attention, every token from the
subject on × every layer) and how it scales with prompt length and with the number of layers
(the model cut to its first N layers), next to the count of token-layer evaluations the engine
runs (one unit = one token through one decoder layer).

    python bench/bench_trace.py --out docs/BENCHMARKS.md                 # full settings (minutes)
    python bench/bench_trace.py --lengths 12 --depths 10 --samples 2     # quick check that it runs

Run it alone on the machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_name, publish  # noqa: E402

SUBJECT = "The Space Needle"
TAIL = " is in the city of"
FILLER = (", the tower that was built for the 1962 World's Fair and that visitors see from the ferries"
          " crossing the bay on clear summer days, with its saucer-shaped top house and a restaurant that turns")


def prompt_of_length(tok, n_tokens: int) -> str:
    """``SUBJECT + filler + TAIL`` with the filler cut so that the prompt has ~``n_tokens`` tokens;
    the filler sits after the subject, so every extra token is traced."""
    base = len(tok(SUBJECT + TAIL)["input_ids"])
    filler_ids = tok(FILLER)["input_ids"]
    k = max(0, min(len(filler_ids), n_tokens - base))
    filler = tok.decode(filler_ids[:k]) if k else ""
    return SUBJECT + filler + TAIL


def token_layers(T: int, s0: int, L: int, samples: int, window: int, kinds) -> int:
    """Token-layer evaluations of the restored runs (the engine's schedule without chunk merging)."""
    total = 0
    for t in range(s0, T):
        for layer in range(L):
            for k in kinds:
                start = layer + 1 if k == "hidden" else max(0, layer - window // 2)
                total += samples * (T - t) * (L - start)
    return total


def truncated(model, spec_layers: str, n: int) -> None:
    """Keep the first ``n`` decoder layers (in place; the model must be reloaded afterwards)."""
    parent_path, _, name = spec_layers.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, torch.nn.ModuleList(list(getattr(parent, name))[:n]))
    model.config.num_hidden_layers = n
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n]


def run_one(adapter, prompt: str, samples: int, reps: int) -> dict:
    from factedit.trace.causal import TraceConfig, trace_prompt

    cfg = TraceConfig(samples=samples)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        r = trace_prompt(adapter, prompt, "Space Needle", config=cfg, sigma=0.36)
        times.append(time.perf_counter() - t)
    w = cfg.check(adapter.n_layers).window
    units = token_layers(len(r.tokens), r.subject_range[0], adapter.n_layers, samples, w, cfg.kinds)
    return {"T": len(r.tokens), "L": adapter.n_layers, "seconds": min(times), "units": units}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="9,16,32", help="prompt lengths in tokens (at full depth)")
    ap.add_argument("--depths", default="10,20,30", help="numbers of layers (at the first prompt length)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1, help="repetitions per setting (the fastest counts)")
    ap.add_argument("--out", default=None, help="markdown file to (re)write the section into")
    args = ap.parse_args(argv)

    from factedit import load_model
    from factedit.core.arch import ModelAdapter

    model, tok = load_model()
    adapter = ModelAdapter(model, tok)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    rows = []
    for n in lengths:
        rows.append(("length", run_one(adapter, prompt_of_length(tok, n), args.samples, args.reps)))
        print(rows[-1], flush=True)
    full_L = adapter.n_layers
    for d in sorted(depths, reverse=True):
        if d > full_L:
            continue
        if d == full_L:  # the first length row already ran at full depth
            rows.append(("depth", rows[0][1]))
            continue
        truncated(model, adapter.spec.layers, d)
        adapter = ModelAdapter(model, tok)
        rows.append(("depth", run_one(adapter, prompt_of_length(tok, lengths[0]), args.samples, args.reps)))
        print(rows[-1], flush=True)

    threads = torch.get_num_threads()
    lines = [
        "## Causal tracing (single prompt, all three kinds) on the embedded model", "",
        f"Command: `python bench/bench_trace.py --lengths {args.lengths} --depths {args.depths} "
        f"--samples {args.samples} --reps {args.reps}`  ",
        f"Date: {datetime.date.today()}; machine: {cpu_name()}, torch {torch.__version__}, threads: {threads}.  ",
        f"Prompt: `{SUBJECT}<filler>{TAIL}` (filler after the subject, so every token is traced), "
        f"{args.samples} noise samples, window 10 (or the depth if smaller).", "",
        "| varied | prompt tokens | layers | seconds per full trace | token-layers run | µs per token-layer |",
        "|---|---|---|---|---|---|",
    ]
    for what, r in rows:
        lines.append(f"| {what} | {r['T']} | {r['L']} | {r['seconds']:.1f} | {r['units']:,} | "
                     f"{1e6 * r['seconds'] / r['units']:.1f} |")
    lines += ["", "The work grows as samples × Σ_t (T − t) × Σ_l (L − l): about quadratic in the prompt "
              "length (from the subject on) and in the depth; the last column shows how close the "
              "time follows that count.", ""]
    publish(lines, args.out, "## Causal tracing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
