"""The GPU check of issue 14: the embedded model on a CUDA device in float32 and bfloat16, and split across
the GPU and the CPU by an accelerate device map, each compared with the CPU run and timed.

    python bench/gpu_check.py                          # cuda:0; prints a markdown section
    python bench/gpu_check.py --out docs/BENCHMARKS.md # ... and writes it into the GPU section
    python bench/gpu_check.py --device cpu --tokens 20000 --requests 6 --records 4   # smoke run, no GPU

Checks, per placement: statistics of the edited layers (tokens/s), one r-ROME edit (Eiffel Tower -> Rome:
P(new) after, ‖Δ‖ against the CPU's, seconds), a MEMIT batch of the first ``--requests`` CounterFact
requests (efficacy, ‖Δ‖ against the CPU's, seconds), a causal trace (largest difference of any cell
against the CPU's, seconds) and an evaluation of ``--records`` records (ES/PS/NS against the CPU's,
seconds per case). The split placement keeps the embedding, layers 0-4 and the head on the GPU and
everything from layer 5 on (both edited spans) on the CPU, so every step crosses devices. Without a
GPU, ``--device cpu`` runs the same steps with the split as a disk offload (a smoke test of the script).
Installs nothing; each placement gets its own FACTEDIT_HOME so nothing is shared from a cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, cpu_name, publish  # noqa: E402

HEADING = "## GPU check"


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t


def split_map(n_layers: int, gpu: str, second: str) -> dict:
    """Embedding, layers 0-4 and the (tied) head on ``gpu``; layers 5.. and the final norm on ``second``."""
    dm = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "lm_head": gpu, "model.norm": second}
    for i in range(n_layers):
        dm[f"model.layers.{i}"] = gpu if i < 5 else second
    return dm


def run_checks(name: str, load_kwargs: dict, args, reference=None) -> dict:
    """Load the embedded model as ``load_kwargs`` say and run every check; compare with ``reference``."""
    import torch

    from factedit import Editor, Request, load_model
    from factedit.app.edit import efficacy
    from factedit.core.lm import target_probabilities
    from factedit.core.request_files import load_requests
    from factedit.evaluation import EvalConfig, run_eval
    from factedit.trace.causal import TraceConfig, trace_prompt

    os.environ["FACTEDIT_HOME"] = tempfile.mkdtemp(prefix=f"gpu-check-{name.replace(' ', '-')}-")
    ed = Editor(*load_model(**load_kwargs), progress=False)
    out = {"name": name, "input": str(ed.adapter.input_device), "edited layer": str(ed.adapter.w_out_device(5))}
    req = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    stats = dict(stats_corpus=str(CORPUS), stats_tokens=args.tokens)
    layers = sorted({5, *ed.make_config("memit", **stats).layers})
    _, t = _timed(lambda: [ed.stats(l, str(CORPUS), args.tokens) for l in layers])
    out["stats tok/s"] = args.tokens * len(layers) / t
    cfg = ed.make_config("r-rome", **stats)
    ed.templates(cfg.seed, cfg.context_lengths)
    r, t = _timed(lambda: ed.edit(req, config=cfg))
    out["r-rome s"] = t
    out["P(new)"] = target_probabilities(ed.adapter, [req.text], [req.target_new])[0]
    out["rounding"] = max(r.rounding.values())
    d_rome = r.deltas[0].dense().cpu()
    ed.revert()
    reqs, seen = [], set()
    for q in load_requests(CF, limit=2 * args.requests):
        if (q.prompt, q.subject) not in seen and len(reqs) < args.requests:
            seen.add((q.prompt, q.subject))
            reqs.append(q)
    mcfg = ed.make_config("memit", **stats)
    res, t = _timed(lambda: ed.edit(reqs, config=mcfg))
    out["memit s"] = t
    out["memit efficacy"] = efficacy(ed.adapter, reqs)
    d_memit = [d.dense().cpu() for d in res.deltas]
    ed.revert()
    tr, t = _timed(lambda: trace_prompt(ed.adapter, req.text, req.subject, config=TraceConfig(samples=10)))
    out["trace s"] = t
    run_dir = Path(os.environ["FACTEDIT_HOME"]) / "eval"
    ecfg = EvalConfig(method="r-rome", dataset=str(CF), limit=args.records,
                      method_options=tuple(sorted(stats.items())))
    summary, t = _timed(lambda: run_eval(ed, ecfg, run_dir))
    out["eval s/case"] = t / args.records
    out["ES/PS/NS"] = f"{summary['ES']:.1f}/{summary['PS']:.1f}/{summary['NS']:.1f}"
    out["_deltas"] = (d_rome, d_memit)
    out["_trace"] = {k: v.clone() for k, v in tr.scores.items()}
    if reference is not None:
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
        out["Δ r-rome vs cpu"] = rel(d_rome, reference["_deltas"][0])
        out["Δ memit vs cpu"] = max(rel(a, b) for a, b in zip(d_memit, reference["_deltas"][1]))
        out["trace vs cpu"] = max(float((tr.scores[k] - reference["_trace"][k]).abs().nan_to_num().max())
                                  for k in tr.scores)
        out["P(new) vs cpu"] = out["P(new)"] - reference["P(new)"]
    ed = None  # free the model before the next placement loads
    if torch.cuda.is_available():
        out["peak GPU GiB"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    return out


COLUMNS = ["name", "input", "edited layer", "stats tok/s", "r-rome s", "P(new)", "P(new) vs cpu", "Δ r-rome vs cpu",
           "rounding", "memit s", "memit efficacy", "Δ memit vs cpu", "trace s", "trace vs cpu", "eval s/case",
           "ES/PS/NS", "peak GPU GiB"]


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--second", default="cpu", help="the other device of the split placement")
    ap.add_argument("--tokens", type=int, default=40_000, help="statistics tokens per layer")
    ap.add_argument("--requests", type=int, default=20, help="MEMIT batch size")
    ap.add_argument("--records", type=int, default=20, help="evaluation records")
    ap.add_argument("--out", default=None, help="markdown file whose GPU section is replaced")
    args = ap.parse_args()
    import torch

    from factedit.core.models import check_device

    dev = check_device(args.device)  # a clear error (exit 2 below) without CUDA
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ref = run_checks("cpu float32", {"device": "cpu"}, args)
    rows = [ref]
    gpu = dev.type == "cuda"
    placements = [("float32", {"device": str(dev)}), ("bfloat16", {"device": str(dev), "dtype": "bfloat16"})] if gpu \
        else [("again", {"device": "cpu"})]
    for label, kw in placements:
        rows.append(run_checks(f"{dev} {label}", kw, args, ref))
    n_layers = 30
    if gpu:
        split = {"device_map": split_map(n_layers, str(dev), args.second)}
        rows.append(run_checks(f"split {dev} + {args.second}", split, args, ref))
    else:  # the same cut, the second half offloaded to disk by accelerate
        split = {"device_map": split_map(n_layers, "cpu", "disk"),
                 "offload_folder": tempfile.mkdtemp(prefix="offload-")}
        rows.append(run_checks("split cpu + disk offload", split, args, ref))
    total = time.perf_counter() - t0
    machine = (torch.cuda.get_device_name(dev) if gpu else cpu_name()) + f", torch {torch.__version__}"
    cmd = "python bench/gpu_check.py" + ("" if args.device == "cuda:0" else f" --device {args.device}") + \
        ("" if args.tokens == 40_000 else f" --tokens {args.tokens}") + \
        ("" if args.requests == 20 else f" --requests {args.requests}") + \
        ("" if args.records == 20 else f" --records {args.records}")
    lines = [HEADING, "", f"`{cmd}` — {machine}; {datetime.date.today().isoformat()}; whole check {total:.0f} s. "
             f"Embedded SmolLM2-135M; statistics {args.tokens:,} tokens per layer of WikiText-2 validation; MEMIT "
             f"batch of {args.requests} CounterFact requests (layers 4-8); trace: 10 samples; eval: first "
             f"{args.records} CounterFact records, r-ROME single edits. `vs cpu`: relative Frobenius difference of the "
             "updates, largest absolute difference of any trace cell, P(new) difference; `rounding`: the share of the "
             "update lost when written in the weights' dtype (`EditResult.rounding`).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    publish(lines, args.out, HEADING, trailing_newline=True)
    print(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a FactEditError (e.g. no CUDA) is the user's to fix
        from factedit.core.errors import FactEditError

        if not isinstance(e, FactEditError):
            raise
        print(f"gpu_check: {e}", file=sys.stderr)
        sys.exit(2)
