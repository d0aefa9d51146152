"""``factedit trace``: causal tracing of one prompt, or averaged over known facts.

    factedit trace --prompt "The Space Needle is in the city of" --subject "Space Needle" --out out/
    factedit trace --dataset known_1000.json --limit 100 --kind mlp --classes last_subject --out out/rec/

The data-set form also caches the recommended edit layer of the model, which ``factedit edit``
edits when given ``--layer traced`` (:meth:`factedit.Editor.make_config`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .common import add_model_options, arch_spec, load

__all__ = ["add_parser", "cmd_trace"]



def _kinds(text: str):
    from ..trace.causal import KINDS

    kinds = KINDS if text == "all" else tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"--kind must be hidden, mlp, attn, all or a comma list; got {text!r}")
    return kinds


def _classes(text: str):
    from ..trace.causal import TOKEN_CLASSES

    classes = tuple(c.strip() for c in text.split(",") if c.strip())
    if not classes or set(classes) - set(TOKEN_CLASSES):
        raise argparse.ArgumentTypeError(f"--classes must be a comma list of {', '.join(TOKEN_CLASSES)}; got {text!r}")
    return classes


def add_parser(sub) -> None:
    t = sub.add_parser("trace", help="causal tracing: which layers and tokens carry a fact")
    t.add_argument("--prompt", default=None, help="the prompt, subject filled in (or with {} for the subject)")
    t.add_argument("--subject", default=None, help="the subject, as it appears in the prompt")
    t.add_argument("--answer", default=None, help="the answer to trace (default: the model's greedy next token)")
    t.add_argument("--dataset", default=None,
                   help="known facts (ROME's known_1000.json or JSONL with prompt/subject/attribute): average "
                        "over the facts the model answers correctly")
    t.add_argument("--limit", type=int, default=100, help="with --dataset: facts to average (default 100)")
    t.add_argument("--kind", type=_kinds, default="all", help="hidden, mlp, attn or all (default)")
    t.add_argument("--samples", type=int, default=10, help="noise samples per prompt (default 10)")
    t.add_argument("--window", type=int, default=None,
                   help="MLP/attention layers restored together (default 10, or the depth of a shallower model)")
    t.add_argument("--classes", type=_classes, default=None,
                   help="trace only these token classes, e.g. last_subject (the recommendation needs only it; "
                        "default: every token)")
    t.add_argument("--noise-factor", type=float, default=3.0, help="σ = this × embedding std of subjects (default 3)")
    t.add_argument("--seed", type=int, default=0, help="seed of the noise")
    t.add_argument("--out", required=True, help="directory for the JSON and the heatmaps")
    add_model_options(t, corpus=False)


def _write(out_dir: Path, name: str, obj: dict, plot, kinds, model: str, extra=()) -> list:
    """Write ``obj`` as ``out_dir/name.json`` plus one heatmap per kind (``plot(obj, kind, path)``);
    returns the paths written (the JSON first, then ``extra``, then the plots)."""
    from ..core.paths import atomic_write_text

    atomic_write_text(out_dir / f"{name}.json", json.dumps(obj))
    files = [str(out_dir / f"{name}.json"), *map(str, extra)]
    prefix = "" if name == "trace" else f"{name}_"
    for k in kinds:
        files.append(str(plot(obj, k, out_dir / f"{prefix}{k}.png", model=model)))
    return files


def cmd_trace(args) -> int:
    from ..core.errors import RequestError, TraceError

    if args.dataset and (args.prompt or args.subject or args.answer):
        raise RequestError("give either --dataset or --prompt/--subject (/--answer), not both")
    if not args.dataset and (args.prompt is None or args.subject is None):
        raise RequestError("give --prompt and --subject (or --dataset FILE)")
    if args.dataset and args.limit < 1:
        raise TraceError(f"--limit must be at least 1, got {args.limit}")
    from ..core.arch import ModelAdapter
    from ..core.models import model_name
    from ..trace.causal import TraceConfig

    facts = None
    if args.dataset:
        from ..core.known_facts import load_known_facts

        facts = load_known_facts(args.dataset)  # validated before the model loads
    model, tok = load(args)
    adapter = ModelAdapter(model, tok, arch_spec(args.arch_spec), args.prompt_prefix)
    cfg = TraceConfig(kinds=args.kind, samples=args.samples, window=args.window, noise_factor=args.noise_factor,
                      seed=args.seed, classes=args.classes).check(adapter.n_layers)
    out_dir = Path(args.out)
    if facts is not None:
        return _dataset(args, adapter, cfg, facts, out_dir, model_name(model))
    return _single(args, adapter, cfg, out_dir, model_name(model))


def _single(args, adapter, cfg, out_dir: Path, name: str) -> int:
    from ..trace.plots import plot_trace
    from ..trace.causal import trace_prompt

    t = time.perf_counter()
    result = trace_prompt(adapter, args.prompt, args.subject, args.answer, cfg)
    obj = {"model": name, **result.to_dict(), "seconds": round(time.perf_counter() - t, 2)}
    files = _write(out_dir, "trace", obj, plot_trace, cfg.kinds, name)
    if args.json:
        print(json.dumps(obj))
        return 0
    print(f"factedit trace on {name}: {obj['prompt']!r} -> {obj['answer']!r}  "
          f"p_clean {obj['p_clean']:.4f}, p_corrupt {obj['p_corrupt']:.4f}  ({obj['seconds']} s)")
    s, e = result.subject_range
    for k in cfg.kinds:
        m = result.scores[k]
        t_, l_ = divmod(int(m.argmax()), m.shape[1])
        print(f"  {k:<6} strongest at token {t_} {result.tokens[t_]!r}, layer {l_}: p = {float(m[t_, l_]):.4f}")
    if result.recommended_layer is not None:
        print(f"  strongest MLP effect at the last subject token {result.tokens[e - 1]!r}: layer {result.recommended_layer}")
    print("  wrote " + ", ".join(files))
    return 0


def _dataset(args, adapter, cfg, facts, out_dir: Path, name: str) -> int:
    from ..core.errors import TraceError
    from ..trace.average import TraceAverage, known_facts
    from ..trace.cache import LayerRecommendation, noise_sigma, save_recommendation
    from ..trace.plots import plot_average
    from ..trace.causal import trace_prompt

    t0 = time.perf_counter()
    sigma = noise_sigma(adapter, factor=cfg.noise_factor)
    avg = TraceAverage(adapter.n_layers, cfg.kinds)
    lines = []
    show = not args.json and sys.stderr.isatty()
    for n, fact in enumerate(known_facts(adapter, facts, args.limit)):
        # a seed per fact: the average sees fresh noise draws, not one draw reused
        r = trace_prompt(adapter, fact.prompt, fact.subject, fact.answer, replace(cfg, seed=cfg.seed + n), sigma)
        avg.update(r)
        lines.append(json.dumps({"id": fact.id, **r.to_dict()}))
        if show:
            print(f"\r  traced {avg.n}/{args.limit} facts ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr)
    if show:
        print(file=sys.stderr)
    if not avg.n:
        raise TraceError(f"the model answers none of the {len(facts)} facts in {args.dataset} correctly")
    obj = {"model": name, "dataset": str(args.dataset), **avg.to_dict(), "kinds": list(cfg.kinds),
           "samples": cfg.samples, "window": cfg.window, "noise_sigma": sigma,
           "seconds": round(time.perf_counter() - t0, 1)}
    if "mlp" in cfg.kinds:
        rec = LayerRecommendation(avg.recommended_layer, tuple(avg.mlp_curve()), avg.n, cfg.samples, cfg.window,
                                  str(args.dataset))
        obj["recommendation_cache"] = str(save_recommendation(adapter, rec))
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..core.paths import atomic_write_text

    atomic_write_text(out_dir / "facts.jsonl", "\n".join(lines) + "\n")
    files = _write(out_dir, "average", obj, plot_average, cfg.kinds, name, extra=[out_dir / "facts.jsonl"])
    if args.json:
        print(json.dumps(obj))
        return 0
    print(f"factedit trace on {name}: {avg.n} correctly answered facts from {args.dataset} ({obj['seconds']} s)"
          + ("" if avg.n >= args.limit else f" — fewer than --limit {args.limit}: no more facts are answered correctly"))
    print(f"  mean p_clean {avg.p_clean:.4f}, p_corrupt {avg.p_corrupt:.4f}")
    if obj.get("recommended_layer") is not None:
        print(f"  strongest average MLP effect at the last subject token: layer {obj['recommended_layer']} "
              f"(cached in {obj['recommendation_cache']}: `factedit edit --layer traced` edits it)")
    print("  wrote " + ", ".join(files))
    return 0
