"""Evaluation throughput on the embedded model: cases per second for ES/PS/NS scoring alone (one
call per case, as a sequential run scores each edit; and all cases in one call, as retention checks and
batch methods score; and all cases in one call each on its own edited model, as single-edit runs
score a chunk), and per full case with GE (generations included), alone and in a chunk.

    python bench/bench_eval.py --n 32 --ge-cases 4 --ge-chunk 25 [--dataset PATH] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, cpu_name, publish  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(CF))
    ap.add_argument("--n", type=int, default=32, help="cases for ES/PS/NS scoring")
    ap.add_argument("--ge-cases", type=int, default=4, help="cases for full scoring with GE")
    ap.add_argument("--ge-chunk", type=int, default=25, help="cases sampled together (a single-edit run's chunk)")
    ap.add_argument("--ge-length", type=int, default=100)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from factedit import ModelAdapter, load_model
    from factedit.edit.deltas import LayerDelta
    from factedit.edit.row_deltas import RowDeltas
    from factedit.evaluation import GenerationConfig, load_cases, score_cases
    from factedit.evaluation.score_model import unedited_answers

    model, tok = load_model(device=args.device)
    ad = ModelAdapter(model, tok)
    cases = load_cases(args.dataset, limit=max(args.n, args.ge_cases, args.ge_chunk))
    rows = sum(2 * (1 + len(c.paraphrase_prompts) + len(c.neighborhood_prompts)) for c in cases[: args.n])
    score_cases(ad, cases[:2])  # warm-up
    t_each = timed(lambda: [score_cases(ad, [c]) for c in cases[: args.n]])
    t_all = timed(lambda: score_cases(ad, cases[: args.n]))
    # single-edit runs score a chunk of cases, each on its own edited model (W + Δ_i through RowDeltas):
    # random rank-one deltas on layer 5 of the size of r-ROME's stand in for the edits
    g = torch.Generator().manual_seed(0)
    models = [[LayerDelta(5, torch.randn(ad.d_model, 1, generator=g) * 1e-2, torch.randn(ad.d_ff, 1, generator=g))]
              for _ in range(args.n)]
    with RowDeltas(ad, models) as rd:
        t_rows = timed(lambda: score_cases(ad, cases[: args.n], batch_size=64, models=rd, owners=list(range(args.n))))
    ge = GenerationConfig(length=args.ge_length)
    t_ge = timed(lambda: [score_cases(ad, [c], ge) for c in cases[: args.ge_cases]])
    chunk = cases[: args.ge_chunk]
    with RowDeltas(ad, models[: len(chunk)]) as rd:
        t_ge_chunk = timed(lambda: score_cases(ad, chunk, ge, models=rd, owners=list(range(len(chunk)))))
    # generation-based scores (greedy answers of <= 50 tokens to the first sentence) on a chunk, each case
    # on its own edited model, against the same chunk's teacher-forced scoring alone
    unedited = unedited_answers(ad, chunk)
    with RowDeltas(ad, models[: len(chunk)]) as rd:
        own = list(range(len(chunk)))
        t_tf_chunk = timed(lambda: score_cases(ad, chunk, models=rd, owners=own))
        t_gen_chunk = timed(lambda: score_cases(ad, chunk, models=rd, owners=own, unedited=unedited))
    t_gen_each = timed(lambda: [score_cases(ad, [c], unedited=unedited) for c in cases[: args.ge_cases]])
    t_tf_each = timed(lambda: [score_cases(ad, [c]) for c in cases[: args.ge_cases]])
    res = {"per_case_calls": args.n / t_each, "one_call": args.n / t_all, "row_models": args.n / t_rows,
           "with_ge": args.ge_cases / t_ge, "with_ge_chunk": len(chunk) / t_ge_chunk,
           "gen_chunk_ratio": t_gen_chunk / t_tf_chunk, "gen_each_ratio": t_gen_each / t_tf_each,
           "gen_chunk": t_gen_chunk / len(chunk), "tf_chunk": t_tf_chunk / len(chunk),
           "gen_vs_full": (t_ge_chunk + t_gen_chunk - t_tf_chunk) / t_ge_chunk}
    print(res)
    publish([
        "## Evaluation throughput", "",
        f"Command: `python bench/bench_eval.py --n {args.n} --ge-cases {args.ge_cases} --ge-chunk {args.ge_chunk} "
        f"--ge-length {args.ge_length}`  ",
        f"Date: {datetime.date.today()}; {cpu_name()} ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), device {ad.device}; embedded SmolLM2-135M-Instruct, "
        f"{Path(args.dataset).name} ({rows / args.n:.0f} scored rows per case).", "",
        "| what | cases / s | s / case |", "|---|---|---|",
        f"| ES/PS/NS scoring, one call per case | {res['per_case_calls']:.2f} | {1 / res['per_case_calls']:.3f} |",
        f"| ES/PS/NS scoring, {args.n} cases in one call, one model (retention, batch methods) | {res['one_call']:.2f} "
        f"| {1 / res['one_call']:.3f} |",
        f"| ES/PS/NS scoring, {args.n} cases in one call, each on its own edited model (single-edit runs) | "
        f"{res['row_models']:.2f} | {1 / res['row_models']:.3f} |",
        f"| full case (ES/PS/NS + GE, {args.ge_length}-token samples), one case at a time | {res['with_ge']:.3f} | "
        f"{1 / res['with_ge']:.2f} |",
        f"| full case, {len(chunk)} cases together, each on its own edited model (single-edit runs) | "
        f"{res['with_ge_chunk']:.3f} | {1 / res['with_ge_chunk']:.2f} |",
        f"| ES/PS/NS, {len(chunk)} cases together, each on its own edited model | {1 / res['tf_chunk']:.2f} | "
        f"{res['tf_chunk']:.3f} |",
        f"| ES/PS/NS + generation-based scores (greedy to the first sentence, <= 50 tokens), the same chunk | "
        f"{1 / res['gen_chunk']:.2f} | {res['gen_chunk']:.3f} |", "",
        f"Generation-based scores multiply the scoring time of a case in a chunk of {len(chunk)} by "
        f"{res['gen_vs_full']:.2f} when the case is scored as docs/RESULTS.md scores it (ES/PS/NS + GE; target: at "
        f"most 2), by {res['gen_chunk_ratio']:.2f} against teacher-forced ES/PS/NS alone, and a case scored "
        f"alone (sequential runs, no GE) by {res['gen_each_ratio']:.2f}: a greedy answer is up to 50 one-token "
        "steps, each reading all the weights, where teacher forcing reads a case's 6 prompts in one pass; the "
        "rows that stop leave the batch, but the batch runs until its longest answer stops.", "",
    ], args.out, "## Evaluation throughput")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
