"""How well does the collapse guard separate normal edits from disabling ones?

For each CounterFact record the target value δ is optimised once; the update is then formed
both as r-ROME (k* everywhere) and as the original code's `rome` (k_o in residual and
denominator), as in ALGORITHMS.md §3. Each is applied, judged by the guard, and judged
independently for collapse, then reverted.

Disabling edits are rare, so records are first *screened* without any optimisation: for the
same δ, ‖Δ_rome‖ / ‖Δ_r-rome‖ = |k*ᵀC⁻¹k* / k_oᵀC⁻¹k*| exactly, which needs only the keys. The
records with the largest ratio and a random sample of the others are then evaluated in full.

Independent collapse label ("disabling edit"), on inputs the guard never sees: the mean
generation entropy of 48-token greedy continuations of held-out prompts falls by more than 40%,
or at least 3 of 5 unrelated probe facts change their greedy answer, or the mean NLL of a held-out
WikiText-2 test passage (1,024 tokens) rises by more than 0.5 nats/token (perplexity × 1.65).

    python bench/guard_eval.py --screen 2000 --top 8 --random 12 --out docs/GUARD.md

Known disabling records (found by ``bench/eval_disabling.py`` over the first 9,250 records, see
docs/EVALUATION.md) can be added without screening them again: ``--cases 6276,1357,583``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, publish  # noqa: E402

HELD_OUT = ("Once upon a time, there was", "The weather today is", "Scientists have discovered that",
            "The best way to learn a language is", "Last summer we went to", "The company announced")
PROBES = ("The capital of Japan is", "The Eiffel Tower is located in the city of",
          "The largest planet in the solar system is", "Water is made of hydrogen and",
          "The author of Romeo and Juliet is")


@torch.no_grad()
def held_out_entropy(adapter):
    from factedit.edit.guard import GuardConfig, entropy_probe

    return entropy_probe(adapter, GuardConfig(prompts=HELD_OUT, max_new_tokens=48))


@torch.no_grad()
def held_out_nll(adapter, text: str) -> float:
    """Mean next-token NLL (nats) of a held-out WikiText-2 passage (4 × 256 tokens)."""
    ids = adapter.tokenizer(text, return_tensors="pt")["input_ids"][:, : 4 * 256].reshape(4, 256).to(adapter.device)
    logits = adapter.model(input_ids=ids).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1)))


def probe_answers(adapter):
    from factedit.core.lm import greedy_continuation

    return [greedy_continuation(adapter, p, 3).strip().split(" ")[0] for p in PROBES]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--screen", type=int, default=2000, help="records screened by the key ratio")
    ap.add_argument("--top", type=int, default=8, help="highest-ratio records evaluated in full")
    ap.add_argument("--random", type=int, default=12, help="random other records evaluated in full")
    ap.add_argument("--cases", default="", help="comma-separated record indices evaluated in full as well")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from factedit import Editor, GuardConfig, load_model
    from factedit.edit.deltas import apply_deltas
    from factedit.edit.guard import check, entropy_probe, norm_reference
    from factedit.edit.methods.rome import default_layer, rome_delta, rome_norm_ratio
    from factedit.evaluation import load_cases

    model, tok = load_model()
    ed = Editor(model, tok, progress=False)
    import random

    cases = load_cases(CF, limit=args.screen)
    screened = [c.request for c in cases]
    layer = default_layer(ed.adapter.n_layers)
    cfg = ed.make_config("r-rome", stats_corpus=str(CORPUS))
    C = ed.stats(layer, cfg.stats_corpus, cfg.stats_tokens).mom2
    templates = ed.templates(cfg.seed, cfg.context_lengths)
    t_screen = time.time()
    ratio = rome_norm_ratio(ed.adapter, C, screened, templates, layer)
    t_screen = time.time() - t_screen
    order = sorted(range(len(screened)), key=lambda i: -float(ratio[i]))
    top = order[: args.top]
    rest = random.Random(0).sample(order[args.top:], args.random)
    # --cases are CounterFact case ids (not line numbers); those beyond the screen are looked up
    extra = {int(x) for x in args.cases.split(",") if x.strip()}
    by_id = {c.case_id: (i, c.request) for i, c in enumerate(cases)}
    missing = extra - set(by_id)
    if missing:
        for c in load_cases(CF):
            if c.case_id in missing:
                by_id[c.case_id] = (None, c.request)
    picked = [(cases[i].case_id, i, screened[i]) for i in top + rest]
    picked += [(cid, *by_id[cid]) for cid in sorted(extra) if cid not in {p[0] for p in picked}]
    reqs = [p[2] for p in picked]
    ratios = [float(ratio[i]) if i is not None else float(rome_norm_ratio(ed.adapter, C, [r], templates, layer)[0])
              for _, i, r in picked]

    gcfg = GuardConfig()
    base_h = held_out_entropy(ed.adapter)
    base_answers = probe_answers(ed.adapter)
    passage = (CORPUS.parent / "wikitext2_test.txt").read_text(encoding="utf-8")[:20000]
    base_nll = held_out_nll(ed.adapter, passage)
    g_before = entropy_probe(ed.adapter, gcfg)
    rows = []
    t0 = time.time()
    for i, req in enumerate(reqs):
        c = ed.compute(req, "r-rome", stats_corpus=str(CORPUS))
        layer = c.config.layer
        ref = norm_reference(ed.adapter, ed.caches, layer, c.config.stats_corpus, c.config.stats_tokens,
                             c.config.value.clamp_norm_factor)
        variants = {"r-rome": c.deltas, "rome": [rome_delta(c.C, c.values, 0, "rome", layer)]}
        for name, deltas in variants.items():
            applied = apply_deltas(ed.adapter, deltas)
            try:
                fake = type("R", (), {"deltas": deltas})()
                decision = check(fake, {layer: ref}, g_before, entropy_probe(ed.adapter, gcfg), gcfg)
                h = held_out_entropy(ed.adapter)
                changed = sum(a != b for a, b in zip(probe_answers(ed.adapter), base_answers))
                nll = held_out_nll(ed.adapter, passage)
            finally:
                applied.revert()
            collapsed = h < 0.6 * base_h or changed >= 3 or nll > base_nll + 0.5
            rows.append({"case": picked[i][0], "ratio": ratios[i], "variant": name,
                         "norm": float(decision["norms"][str(layer)]),
                         "limit": float(decision["limits"][str(layer)]), "guard_fired": not decision["passed"],
                         "reasons": decision["fired"], "held_out_entropy": h, "probes_changed": changed,
                         "held_out_nll": nll,
                         "collapsed": collapsed})
            print(json.dumps(rows[-1]), flush=True)

    def rate(sel, key):
        return sum(r[key] for r in sel) / max(1, len(sel))

    rr = [r for r in rows if r["variant"] == "r-rome"]
    ro = [r for r in rows if r["variant"] == "rome"]
    dis = [r for r in rows if r["collapsed"]]
    normal = [r for r in rr if not r["collapsed"]]
    norm_med = statistics.median(r["norm"] for r in rr)
    lines = [
        "## Collapse guard: false positives and detection", "",
        f"Command: `python bench/guard_eval.py --screen {args.screen} --top {args.top} --random {args.random}"
        + (f" --cases {args.cases}" if args.cases else "") + "`  ",
        f"Date: {datetime.date.today()}; embedded SmolLM2-135M-Instruct, layer {layer}, statistics from WikiText-2 "
        f"(100k tokens), guard defaults (norm factor {gcfg.norm_factor:g}, entropy drop {gcfg.entropy_drop:.0%}). "
        f"Run time {time.time() - t0:.0f} s.", "",
        f"Screening: {args.screen} CounterFact records in {t_screen:.0f} s; key ratio |k*ᵀC⁻¹k*/k_oᵀC⁻¹k*| "
        f"median {float(ratio.median()):.2f}, max {float(ratio.max()):.3g}; "
        f"{int((ratio > 10).sum())} records above 10. Evaluated in full: the {args.top} highest and "
        f"{args.random} random others" + (f", plus records {args.cases} (known disabling edits of `rome`, "
        "found by bench/eval_disabling.py; see docs/EVALUATION.md)" if args.cases else "") + ".", "",
        f"Baseline: held-out generation entropy {base_h:.2f}, held-out WikiText-2 NLL {base_nll:.3f} nats/token. "
        "An edit counts as *disabling* when, on inputs the guard never sees, that entropy falls below 60%, "
        "≥ 3 of 5 unrelated probe facts change, or the NLL rises by more than 0.5.", "",
        "| | edits | disabling (independent label) | guard fired | median ‖Δ‖ | max ‖Δ‖ |",
        "|---|---|---|---|---|---|",
        f"| r-ROME | {len(rr)} | {sum(r['collapsed'] for r in rr)} | {sum(r['guard_fired'] for r in rr)} | "
        f"{norm_med:.3g} | {max(r['norm'] for r in rr):.3g} |",
        f"| ROME (original code) | {len(ro)} | {sum(r['collapsed'] for r in ro)} | "
        f"{sum(r['guard_fired'] for r in ro)} | "
        f"{statistics.median(r['norm'] for r in ro):.3g} | {max(r['norm'] for r in ro):.3g} |", "",
        f"* False-positive rate on normal r-ROME edits: {rate(normal, 'guard_fired'):.1%} "
        f"({sum(r['guard_fired'] for r in normal)} of {len(normal)}).",
        f"* Detection rate on disabling edits (all variants): {rate(dis, 'guard_fired'):.1%} "
        f"({sum(r['guard_fired'] for r in dis)} of {len(dis)}).",
        f"* Norm limit of this layer: {rows[0]['limit']:.3g}.", "",
        "| case | variant | key ratio | ‖Δ‖ | guard | held-out entropy | probes changed | held-out NLL | disabling |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [f"| {r['case']} | {r['variant']} | {r['ratio']:.3g} | {r['norm']:.3g} | "
         f"{'fired' if r['guard_fired'] else 'passed'} | {r['held_out_entropy']:.2f} | {r['probes_changed']} | "
         f"{r['held_out_nll']:.3f} | {'yes' if r['collapsed'] else 'no'} |" for r in rows] + [""]
    publish(lines, args.out, "## Collapse guard",
            head="# Collapse guard\n\nSee `src/factedit/edit/guard.py` for what the guard checks.\n\n")


if __name__ == "__main__":
    main()
