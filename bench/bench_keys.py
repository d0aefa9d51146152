"""The keys of a batch edit's span, per layer from the embeddings against resumed (issue 36).

A MEMIT-family edit of n requests reads, for each layer l of its span, the keys entering W_out at l of every
request in every context template, and the current residual at the span's last layer of the bare prompts, on the
weights the layers below l were just updated to. Before 2026-12-07 each layer's pass ran every row from the
embeddings; now (:class:`factedit.edit.keys.TemplateKeys`) each pass starts from the rows' residual stream below
the previous pass's key layer, which that layer's update cannot have changed. This times both ways on the
embedded model, paired (old, new, old, new, ...), with the method's own layers and templates, and checks on the
way that both give bit-identical keys with a rank-one change written into each layer after its pass (as the edit
writes its update there).

    FACTEDIT_HOME=runs/home python bench/bench_keys.py --n 100 --pairs 3 --out docs/BENCHMARKS.md

Run it alone on the machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, cpu_name, publish  # noqa: E402

HEADING = "## Batch edits: the span's keys, resumed layer by layer (issue 36)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="requests (the first n CounterFact records)")
    p.add_argument("--method", default="memit")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", default=None, help="replace this benchmark's section in that markdown file")
    a = p.parse_args(argv)

    from factedit import Editor, load_model
    from factedit.core.request_files import load_requests
    from factedit.edit.keys import RESUME_BUDGET, TemplateKeys, template_keys

    model, tok = load_model()
    ed = Editor(model, tok, progress=False)
    ad = ed.adapter
    cfg = ed.make_config(a.method)
    layers, L = list(cfg.layers), cfg.layers[-1]
    templates = ed.templates(cfg.seed, cfg.context_lengths)
    reqs = load_requests(CF, limit=a.n)
    saved = {l: ad.w_out_stored(l).clone() for l in layers}
    g = torch.Generator().manual_seed(0)
    nudges = {l: 1e-3 * torch.randn(ad.d_model, 1, generator=g) @ torch.randn(1, ad.d_ff, generator=g)
              for l in layers}

    def span(resumed: bool):
        """Both reads of every layer, each layer nudged after its pass; the weights restored after."""
        keys = TemplateKeys(ad, reqs, templates, cfg.fact_token, budget=RESUME_BUDGET) if resumed else None
        bare = TemplateKeys(ad, reqs, ["{}"], cfg.fact_token, budget=RESUME_BUDGET // 4) if resumed else None
        out = []
        t = time.perf_counter()
        try:
            for l in layers:
                if resumed:
                    K, _ = keys(l)
                    _, Z = bare(l, L)
                else:
                    K, _ = template_keys(ad, reqs, templates, l, None, cfg.fact_token)
                    _, Z = template_keys(ad, reqs, ["{}"], l, L, cfg.fact_token)
                out.append((K, Z))
                ad.add_to_w_out(l, nudges[l].to(ad.w_out_device(l)))
            return time.perf_counter() - t, out
        finally:
            for l in layers:
                ad.set_w_out(l, saved[l])

    span(True)  # warm-up (allocator, thread pool)
    old, new, same = [], [], True
    for _ in range(a.pairs):
        t_old, got_old = span(False)
        t_new, got_new = span(True)
        old.append(t_old)
        new.append(t_new)
        same = same and all(torch.equal(x, y) for (k0, z0), (k1, z1) in zip(got_old, got_new)
                            for x, y in ((k0, k1), (z0, z1)))
    rows = len(reqs) * len(templates)
    m_old, m_new = statistics.median(old), statistics.median(new)
    lines = [HEADING, "",
             f"Command: `python bench/bench_keys.py --n {a.n} --pairs {a.pairs}`  ",
             f"Date: {datetime.date.today()}; machine: {cpu_name()}, {torch.get_num_threads()} threads, alone.  ",
             f"Embedded model, `{a.method}`'s span (layers {layers[0]}–{layers[-1]}), {len(templates)} context "
             f"templates: {rows} template rows and {len(reqs)} bare rows per layer.", "",
             "| keys of the span | median s | min s | max s |", "|---|---|---|---|",
             f"| each layer from the embeddings (before) | {m_old:.2f} | {min(old):.2f} | {max(old):.2f} |",
             f"| each layer from where the last stopped (now) | {m_new:.2f} | {min(new):.2f} | {max(new):.2f} |", "",
             f"Paired over {a.pairs} alternations: **{m_old / m_new:.2f}× faster** (pair by pair "
             f"{min(o / n for o, n in zip(old, new)):.2f}–{max(o / n for o, n in zip(old, new)):.2f}×); keys and "
             f"residuals bit-identical both ways: **{'yes' if same else 'NO'}**. This is the solve phase of a batch "
             f"edit but for the closed form itself (a few n × n or d_ff × d_ff solves); the targets are apart."]
    publish(lines, a.out, HEADING)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
