"""Benchmark of the single-edit path on the embedded model (issue: r-ROME core).

Measures, on this machine:
  * median wall time of one r-ROME edit (model loaded, statistics and templates cached),
    split into value optimisation and the rest, and seconds per optimisation step;
  * a lower bound per step from the FLOPs that truly depend on δ and the measured matmul rate;
  * statistics throughput (tokens/s) with the early-stopped forward vs a full forward;
  * a yardstick: one forward of the embedded model on 8 × 64 tokens (the demo command itself, its wall
    time and peak RSS phase by phase: bench/profile_edit.py).

    python bench/bench_edit.py --records 10 --out docs/BENCHMARKS.md

Run it alone on the machine: timings are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, cpu_name, publish  # noqa: E402
from profile_edit import yardstick  # noqa: E402


def matmul_gflops(n=2048, reps=10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def delta_dependent_flops(adapter, problem) -> float:
    """FLOPs of one optimisation step that depend on δ: forward through layers l..L-1 at the
    positions from the fact token on (real tokens only), attention over the cached prefix,
    logits at the selected positions; backward w.r.t. activations only (≈ the forward again)."""
    l = problem.layer
    per_tok = 0
    for i in range(l, adapter.n_layers):
        layer = adapter.layers[i]
        for name, p in layer.named_parameters():
            if p.ndim == 2:
                per_tok += 2 * p.numel()
    mask = problem.suf["attention_mask"]
    suf_real = int(mask[:, problem.P:].sum())
    ctx = int(mask.sum(1).float().mean())  # mean attended length
    cfg = adapter.model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = adapter.d_model // heads
    attn = 4 * heads * head_dim * ctx * (adapter.n_layers - l)  # QKᵀ and AV per token
    n_sel = len(problem.sel_rows)
    head = 2 * adapter.d_model * adapter.unembed.weight.shape[0] * n_sel
    fwd = suf_real * (per_tok + attn) + head
    return 2 * fwd


def bench_edits(editor, records, layer):
    from factedit import Request
    from factedit.edit.guard import GuardConfig, probe_tokens
    from factedit.edit.values import ValueProblem

    gcfg = GuardConfig()
    unedited = probe_tokens(editor.adapter, gcfg)
    rows = []
    for rec in records:
        req = Request.from_filled(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
        t = time.perf_counter()
        res = editor.edit(req, stats_corpus=str(CORPUS))
        dt = time.perf_counter() - t
        # the guard's fluency probe after the edit: as the guard runs it (the unedited tokens as a draft,
        # verified in one forward) and as it ran before (24 decode steps); both must give the same tokens
        t = time.perf_counter()
        drafted = probe_tokens(editor.adapter, gcfg, draft=unedited)
        probe_draft = time.perf_counter() - t
        t = time.perf_counter()
        plain = probe_tokens(editor.adapter, gcfg)
        probe_plain = time.perf_counter() - t
        editor.revert()
        steps = res.info[0]["steps"]
        problem = ValueProblem(editor.adapter, layer, [req], editor.templates()).prepare()
        rows.append(dict(case=rec["case_id"], seconds=dt, values=res.timings["values"], steps=steps,
                         flops_step=delta_dependent_flops(editor.adapter, problem), probe_draft=probe_draft,
                         probe_plain=probe_plain, probe_same=drafted == plain, probe_held=plain == unedited))
    return rows


def bench_stats(adapter, layer, n_tokens):
    from factedit.stats.corpus import resolve_corpus
    from factedit.stats.layer import layer_stats, token_chunks

    t = time.perf_counter()
    st = layer_stats(adapter, layer, corpus=str(CORPUS), n_tokens=n_tokens, cache=False, progress=False)
    early = st.count / (time.perf_counter() - t)
    # full forward over the same chunks (what an implementation without early stop pays)
    chunks = list(token_chunks(adapter.tokenizer, resolve_corpus(str(CORPUS)), 256, n_tokens))
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(chunks), 8):
            batch = chunks[i:i + 8]
            w = max(map(len, batch))
            ids = torch.tensor([c + [0] * (w - len(c)) for c in batch])
            adapter.model(input_ids=ids)
    full = sum(map(len, chunks)) / (time.perf_counter() - t)
    return early, full


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10)
    ap.add_argument("--stats-tokens", type=int, default=20_000)
    ap.add_argument("--out", default=None, help="markdown file to (re)write the section into")
    args = ap.parse_args()

    from factedit import Editor, load_model
    from factedit.edit.methods.rome import default_layer

    gflops = matmul_gflops()
    model, tok = load_model()
    editor = Editor(model, tok, progress=False)
    layer = default_layer(editor.adapter.n_layers)
    with open(CF, encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(args.records)]
    from factedit import Request  # warm-up edit: statistics and templates cached
    editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"), stats_corpus=str(CORPUS))
    editor.revert()
    rows = bench_edits(editor, records, layer)
    early, full = bench_stats(editor.adapter, layer, args.stats_tokens)
    stick = yardstick(editor.adapter)

    med = statistics.median(r["seconds"] for r in rows)
    per_step = [r["values"] / max(r["steps"], 1) for r in rows]
    bound_step = [r["flops_step"] / (gflops * 1e9) for r in rows]
    med_bound_edit = statistics.median(r["flops_step"] * max(r["steps"], 1) / (gflops * 1e9) for r in rows)
    cpu = cpu_name()
    lines = [
        "## Single edit (r-ROME) on the embedded model",
        "",
        f"Command: `python bench/bench_edit.py --records {args.records} --stats-tokens {args.stats_tokens}`  ",
        f"Date: {datetime.date.today()}; machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; measured fp32 matmul rate {gflops:.0f} GFLOP/s.  ",
        f"Model: SmolLM2-135M-Instruct (30 layers), edit layer {layer}, 21 context templates, ≤ 25 steps, "
        "statistics (100k WikiText-2 tokens) and templates cached, model loaded.",
        "",
        "| figure | measured | lower bound from δ-dependent FLOPs | target |",
        "|---|---|---|---|",
        f"| median wall time of one `Editor.edit` ({len(rows)} CounterFact records) | {med:.2f} s "
        f"({med / stick:.1f} yardsticks) | {med_bound_edit:.2f} s | ≤ 2.5 s (≤ 3.1 yardsticks) |",
        f"| seconds per optimisation step (median; the value optimisation's time over its steps) | "
        f"{statistics.median(per_step):.3f} s ({statistics.median(p / b for p, b in zip(per_step, bound_step)):.1f}"
        f" × the bound) | {statistics.median(bound_step):.3f} s | ≤ 1.5 × the bound |",
        f"| optimisation steps used (median, early stop) | {statistics.median(r['steps'] for r in rows):.0f} | "
        "— | ≤ 25 |",
        f"| statistics throughput, early stop after layer {layer} | {early:.0f} tok/s | — | ≥ 2220 tok/s (3 × 740) |",
        f"| statistics throughput, full forward (for comparison) | {full:.0f} tok/s | — | — |",
        f"| guard fluency probe after an edit, as the guard runs it (median; the probe before the edit verified "
        f"as a draft) | {statistics.median(r['probe_draft'] for r in rows):.3f} s | — | ≤ 0.3 s |",
        f"| the same probe decoded step by step (median; the guard before 2026-12-02) | "
        f"{statistics.median(r['probe_plain'] for r in rows):.3f} s | — | — |",
        f"| ... the same tokens both ways / continuations unchanged by the edit | "
        f"{sum(r['probe_same'] for r in rows)} / {sum(r['probe_held'] for r in rows)} of {len(rows)} | — | all / — |",
        "",
        f"Yardstick: one forward of the embedded model on 8 × 64 tokens, {stick:.3f} s (median of 5, same run). "
        "The demo command as a whole (wall time, peak RSS, phases): the next section, `bench/profile_edit.py`.",
        "",
        "Per record (seconds, steps): " + ", ".join(f"#{r['case']}: {r['seconds']:.1f} s/{r['steps']}" for r in rows),
        "",
        "The lower bound counts, per step, the forward FLOPs of layers ≥ the edit layer at the positions from "
        "the fact token on (the prefix is cached, lower layers skipped), attention over the cached prefix, "
        "and the LM head at the target and essence positions only, times two for the backward pass w.r.t. "
        "activations (no weight gradients), divided by the measured matmul rate.",
        "",
    ]
    publish(lines, args.out, "## Single edit (r-ROME)")


if __name__ == "__main__":
    main()
