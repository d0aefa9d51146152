"""Evaluation throughput on the embedded model: cases per second for ES/PS/NS scoring alone (one
call per case, as a single-edit run scores; and all cases in one call, as retention checks and
batch methods score), and per full case with GE (generations included).

    python bench/bench_eval.py --n 32 --ge-cases 4 [--dataset PATH] [--out docs/BENCHMARKS.md]
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
from _report import cpu_name, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_knowedit.jsonl"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(CF))
    ap.add_argument("--n", type=int, default=32, help="cases for ES/PS/NS scoring")
    ap.add_argument("--ge-cases", type=int, default=4, help="cases for full scoring with GE")
    ap.add_argument("--ge-length", type=int, default=100)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from factedit import ModelAdapter, load_model
    from factedit.evaluation import GenerationConfig, load_cases, score_cases

    model, tok = load_model(device=args.device)
    ad = ModelAdapter(model, tok)
    cases = load_cases(args.dataset, limit=max(args.n, args.ge_cases))
    rows = sum(2 * (1 + len(c.paraphrase_prompts) + len(c.neighborhood_prompts)) for c in cases[: args.n])
    score_cases(ad, cases[:2])  # warm-up
    t_each = timed(lambda: [score_cases(ad, [c]) for c in cases[: args.n]])
    t_all = timed(lambda: score_cases(ad, cases[: args.n]))
    ge = GenerationConfig(length=args.ge_length)
    t_ge = timed(lambda: [score_cases(ad, [c], ge) for c in cases[: args.ge_cases]])
    res = {"per_case_calls": args.n / t_each, "one_call": args.n / t_all, "with_ge": args.ge_cases / t_ge}
    print(res)
    text = "\n".join([
        "## Evaluation throughput", "",
        f"Command: `python bench/bench_eval.py --n {args.n} --ge-cases {args.ge_cases} --ge-length {args.ge_length}`  ",
        f"Date: {datetime.date.today()}; {cpu_name()} ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), device {ad.device}; embedded SmolLM2-135M-Instruct, "
        f"{Path(args.dataset).name} ({rows / args.n:.0f} scored rows per case).", "",
        "| what | cases / s |", "|---|---|",
        f"| ES/PS/NS scoring, one call per case (single-edit runs) | {res['per_case_calls']:.2f} |",
        f"| ES/PS/NS scoring, {args.n} cases in one call (retention, batch methods) | {res['one_call']:.2f} |",
        f"| full case: ES/PS/NS + GE ({args.ge_length}-token samples) | {res['with_ge']:.3f} |", "",
    ])
    print(text)
    if args.out:
        write_section(args.out, "## Evaluation throughput", text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
