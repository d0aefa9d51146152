"""Fewer value-optimisation steps without a different edit? (issue 35)

r-ROME's target δ is the first point of an Adam path (lr 0.5, ROME's loss, norm clamp) whose rewrite NLL is
below 0.05. A rule that reaches that NLL in fewer steps is only worth having if it ends at (nearly) the same δ:
the closed form scales with it, so ‖Δ‖ and the edit's side effects follow ‖δ‖. For the first N CounterFact
records (model loaded, templates cached) this optimises each record's δ under every candidate rule and reports
the steps, the value optimisation's seconds, ‖δ‖/‖v0‖, and ‖δ‖ and the direction against today's rule.

    python bench/step_rules.py --records 12 --out docs/BENCHMARKS.md

Run it alone on the machine: timings are wall-clock. A rule that passes here still needs the 200-record
`factedit eval` check of the issue (ES/PS/NS and the gen scores within one record of docs/RESULTS.md's row).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, cpu_name, publish, write_rows  # noqa: E402

#: the optimiser the value optimisation builds, before :func:`optimiser` swaps it
_ADAM = torch.optim.Adam


class _Warm(_ADAM):
    """Adam whose first ``warm`` steps take ``factor`` × lr (then the configured lr)."""

    warm, factor = 2, 2.0

    def step(self, closure=None):
        n = getattr(self, "_n", 0)
        self._n = n + 1
        base = [g["lr"] for g in self.param_groups]
        if n < self.warm:
            for g in self.param_groups:
                g["lr"] = g["lr"] * self.factor
        out = super().step(closure)
        for g, lr in zip(self.param_groups, base):
            g["lr"] = lr
        return out


def _beta2(params, lr):
    return _ADAM(params, lr=lr, betas=(0.9, 0.99))


#: name → (ValueConfig overrides, optimiser factory or None for Adam)
RULES = {
    "today (Adam, lr 0.5)": ({}, None),
    "Adam, lr 0.7": ({"lr": 0.7}, None),
    "Adam, lr 1.0 for 2 steps, then 0.5": ({}, _Warm),
    "Adam, β₂ 0.99": ({}, _beta2),
    "NAdam, lr 0.5": ({"optimizer": "nadam"}, None),  # Nesterov momentum, μ = β₁/2 constant
}


@contextlib.contextmanager
def optimiser(factory):
    """``torch.optim.Adam`` as the value optimisation sees it (``ValueConfig.make_optimizer`` builds
    ``torch.optim.Adam([δ], lr=…)``)."""
    if factory is None:
        yield
        return
    torch.optim.Adam = factory
    try:
        yield
    finally:
        torch.optim.Adam = _ADAM


def trajectory(problem):
    """Record the rewrite NLL at every evaluated δ (wraps ``problem.losses``)."""
    seen = []
    losses = problem.losses

    def spy(logits, active=None):
        nll, kl = losses(logits, active=active)
        seen.append(float(nll.detach()[0]))
        return nll, kl

    problem.losses = spy
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=12)
    ap.add_argument("--out", default=None, help="markdown file to (re)write the section into")
    ap.add_argument("--rows", default=None, help="per-record rows as JSON lines")
    args = ap.parse_args()

    from dataclasses import replace

    from factedit import Editor, Request, load_model
    from factedit.edit.methods.rome import ROMEConfig
    from factedit.edit.values import ValueProblem, optimize_values

    model, tok = load_model()
    editor = Editor(model, tok, progress=False)
    cfg = ROMEConfig().resolved(editor.adapter)  # r-ROME's defaults on this model (layer, value optimisation)
    layer = cfg.layer
    editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"), stats_corpus=str(CORPUS))
    editor.revert()  # statistics and templates cached, kernels warm
    templates = editor.templates()
    with open(CF, encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(args.records)]

    rows = []
    for rec in records:
        req = Request.from_filled(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
        base = None
        for name, (over, factory) in RULES.items():
            problem = ValueProblem(editor.adapter, layer, [req], templates, cfg.essence_prompts, cfg.fact_token)
            seen = trajectory(problem)
            vcfg = replace(cfg.value, **over)
            with optimiser(factory):
                t = time.perf_counter()
                res = optimize_values(problem, vcfg)
                dt = time.perf_counter() - t
            d, v0 = res.delta[0], res.v0[0]
            if base is None:
                base = d
            rows.append(dict(case=rec["case_id"], rule=name, steps=res.steps_each[0], seconds=dt,
                             delta_v0=float(d.norm() / v0.norm()), nll_after=res.nll_after[0],
                             norm_vs_today=float(d.norm() / base.norm()),
                             cos_vs_today=float(torch.nn.functional.cosine_similarity(d, base, dim=0)),
                             clamped=bool(d.norm() >= 0.999 * vcfg.clamp_norm_factor * v0.norm()), nll=seen))
            print(f"#{rec['case_id']:>5} {name:38s} {rows[-1]['steps']:2d} steps {dt:5.2f} s "
                  f"‖δ‖/‖v0‖ {rows[-1]['delta_v0']:.2f} vs today {rows[-1]['norm_vs_today']:.3f} "
                  f"cos {rows[-1]['cos_vs_today']:.3f}", flush=True)
    write_rows(args.rows, rows)

    def med(xs):
        return statistics.median(xs)

    lines = [
        "## Fewer value-optimisation steps? (issue 35)",
        "",
        f"Command: `python bench/step_rules.py --records {args.records}`  ",
        f"Date: {datetime.date.today()}; machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.  ",
        f"r-ROME's target δ of the first {args.records} CounterFact records at layer {layer} (model loaded, "
        "templates cached; the stop: rewrite NLL < 0.05, at most 25 steps, clamp 4 ‖v0‖), under each rule.",
        "",
        "| rule | steps (median; min–max) | seconds (median) | ‖δ‖/‖v0‖ (median) | ‖δ‖ against today's "
        "(median; min–max) | cos(δ, today's δ) (median; min) | at the clamp | NLL ≥ 0.05 at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in RULES:
        rs = [r for r in rows if r["rule"] == name]
        steps, ratio, cos = [r["steps"] for r in rs], [r["norm_vs_today"] for r in rs], [r["cos_vs_today"] for r in rs]
        lines.append(
            f"| {name} | {med(steps):.1f}; {min(steps)}–{max(steps)} | {med(r['seconds'] for r in rs):.2f} | "
            f"{med(r['delta_v0'] for r in rs):.2f} | {med(ratio):.3f}; {min(ratio):.3f}–{max(ratio):.3f} | "
            f"{med(cos):.3f}; {min(cos):.3f} | {sum(r['clamped'] for r in rs)} | "
            f"{sum(r['nll_after'] >= 0.05 for r in rs)} |")
    today = [r for r in rows if r["rule"] == next(iter(RULES))]
    above1 = [sum(x >= 1.0 for x in r["nll"]) for r in today]
    lines += ["", f"Where today's steps go (median over the records): {med(above1):.0f} evaluations with the "
              f"rewrite NLL ≥ 1, {med(len(r['nll']) - a for r, a in zip(today, above1)):.0f} below it "
              "(the last one is the evaluation that stops).", ""]
    publish(lines, args.out, "## Fewer value-optimisation steps?")


if __name__ == "__main__":
    main()
