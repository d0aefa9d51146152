"""Find disabling edits of the original ROME code (``rome``) among CounterFact records and show that
r-ROME on the same records does not collapse (ALGORITHMS.md §3), with the evaluation harness's metrics.

Records are screened without any optimisation: for the same δ, ‖Δ_rome‖ / ‖Δ_r-rome‖ =
|k*ᵀC⁻¹k* / k_oᵀC⁻¹k*|, which needs only the keys. The records with the largest ratio are then
edited under both variants (collapse guard off) and scored: ‖Δ‖/numel, generation entropy GE of the
case's prompts and of generic prompts, ES / PS / NS.

    python bench/eval_disabling.py --screen 1000 --top 6 [--out docs/EVALUATION.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, publish  # noqa: E402

GENERIC = ("The most important thing about history is", "My favorite food is", "The city was quiet when",
           "Once upon a time, there was", "Scientists have discovered that")


def screen(ed, cases, cfg, n_templates=None):
    from factedit.edit.methods.rome import rome_norm_ratio

    C = ed.stats(cfg.layer, cfg.stats_corpus, cfg.stats_tokens).mom2
    templates = ed.templates(cfg.seed, cfg.context_lengths)[: n_templates or None]
    return rome_norm_ratio(ed.adapter, C, [c.request for c in cases], templates, cfg.layer)


def generic_entropy(adapter, length: int) -> float:
    from factedit.evaluation.score_model import sample_texts
    from factedit.evaluation.scoring import text_entropy

    return 100 * text_entropy(sample_texts(adapter, GENERIC, length, seed=0))


def greedy_entropy(adapter) -> float:
    """The collapse guard's probe: entropy ×100 of 24-token greedy continuations of generic prompts."""
    from factedit.edit.guard import GuardConfig, entropy_probe

    return 100 * entropy_probe(adapter, GuardConfig())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--screen", type=int, default=1000, help="CounterFact records screened by the key ratio")
    ap.add_argument("--offset", type=int, default=0, help="first screened record")
    ap.add_argument("--screen-templates", type=int, default=None,
                    help="screen with only the first N context templates (cheaper, approximate ratios)")
    ap.add_argument("--top", type=int, default=6, help="highest-ratio records edited under rome and r-rome")
    ap.add_argument("--cases", default=None, help="comma-separated case ids to edit instead of the top of the screen")
    ap.add_argument("--ge-length", type=int, default=60)
    ap.add_argument("--out", default=None, help="markdown file to write the section into")
    args = ap.parse_args()

    from factedit import Editor, GuardConfig, load_model
    from factedit.evaluation import GenerationConfig, load_cases, score_cases
    from factedit.evaluation.scoring import normalized_delta_norm

    ed = Editor(*load_model(), progress=False)
    cfg = ed.make_config("r-rome", stats_corpus=str(CORPUS))
    cases = load_cases(CF, limit=args.screen, offset=args.offset)
    if args.cases:  # only these (the key ratio is then computed for them alone)
        wanted = {int(x) for x in args.cases.split(",")}
        cases = [c for c in cases if c.case_id in wanted]
    t0 = time.time()
    ratio = screen(ed, cases, cfg, None if args.cases else args.screen_templates)
    t_screen = time.time() - t0
    ranked = sorted(range(len(cases)), key=lambda i: -float(ratio[i]))
    print("highest key ratios:", [(cases[i].case_id, round(float(ratio[i]), 2)) for i in ranked[:15]], flush=True)
    order = ranked if args.cases else ranked[: args.top]
    ge = GenerationConfig(length=args.ge_length)
    base_generic = generic_entropy(ed.adapter, args.ge_length)
    base_greedy = greedy_entropy(ed.adapter)
    rows = []
    for i in order:
        case = cases[i]
        base = score_cases(ed.adapter, [case], ge)[0]
        for method in ("rome", "r-rome"):
            res = ed.edit(case.request, method, guard=GuardConfig(enabled=False), stats_corpus=str(CORPUS))
            try:
                s = score_cases(ed.adapter, [case], ge)[0]
                row = {"case_id": case.case_id, "ratio": float(ratio[i]), "method": method,
                       "delta_norm": normalized_delta_norm(res.deltas)[0], "GE_case": 100 * s["GE"],
                       "GE_case_before": 100 * base["GE"], "GE_generic": generic_entropy(ed.adapter, args.ge_length),
                       "GE_generic_before": base_generic, "greedy": greedy_entropy(ed.adapter),
                       "greedy_before": base_greedy, "ES": s["ES"], "PS": s["PS"], "NS": s["NS"],
                       "sample": s["generations"][0][:160]}
            finally:
                ed.revert()
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "## Disabling edits of `rome`, and r-ROME on the same records", "",
        f"Command: `python bench/eval_disabling.py --screen {args.screen} --top {args.top} --ge-length {args.ge_length}"
        + (f" --cases {args.cases}" if args.cases else "") + "`  ",
        f"Date: {time.strftime('%Y-%m-%d')}; embedded SmolLM2-135M-Instruct, layer {cfg.layer}, statistics from "
        f"WikiText-2, collapse guard off. Screening {len(cases)} records by |k*ᵀC⁻¹k*/k_oᵀC⁻¹k*| took "
        f"{t_screen:.0f} s (median ratio {float(ratio.median()):.2f}, max {float(ratio.max()):.3g}). GE ×100 of "
        f"{args.ge_length}-token top-5 samples of the case's prompts and of generic prompts (before any edit: "
        f"{base_generic:.0f}); greedy: the collapse guard's probe (24-token greedy continuations, ×100; before: "
        f"{base_greedy:.0f}).", "",
        "| case | key ratio | method | ‖Δ‖/numel | GE case (before → after) | GE generic | greedy | ES | PS | NS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case_id']} | {r['ratio']:.3g} | {r['method']} | {r['delta_norm']:.3g} | "
                     f"{r['GE_case_before']:.0f} → {r['GE_case']:.0f} | {r['GE_generic']:.0f} | {r['greedy']:.0f} | "
                     f"{r['ES']:.0f} | {r['PS']:.0f} | {r['NS']:.0f} |")
    publish(lines, args.out, "## Disabling edits", head="# Evaluation\n\n", trailing_newline=True)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
