"""``factedit trace``: causal tracing of one prompt, or averaged over known facts.

    factedit trace --prompt "The Space Needle is in the city of" --subject "Space Needle" --out out/
    factedit trace --dataset known_1000.json --limit 100 --kind mlp --classes last_subject --out out/rec/

The data-set form also caches the recommended edit layer of the model, which ``factedit edit``
edits when given ``--layer traced`` (:meth:`factedit.Editor.make_config`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .common import show_progress

__all__ = ["cmd_trace"]



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


def cmd_trace(settings) -> int:
    from ..core.errors import RequestError, TraceError

    s = settings
    if s["dataset"] and (s["prompt"] or s["subject"] or s["answer"]):
        raise RequestError("give either --dataset or --prompt/--subject (/--answer), not both")
    if not s["dataset"] and (s["prompt"] is None or s["subject"] is None):
        raise RequestError("give --prompt and --subject (or --dataset FILE)")
    if s["dataset"] and s["limit"] < 1:
        raise TraceError(f"--limit must be at least 1, got {s['limit']}")
    from ..core.models import model_name
    from ..trace.causal import TraceConfig

    facts = None
    if s["dataset"]:
        from ..core.known_facts import load_known_facts

        facts = load_known_facts(s["dataset"])  # validated before the model loads
    model, tok = s.model.load()
    adapter = s.model.adapter(model, tok)
    cfg = TraceConfig(kinds=s["kind"], samples=s["samples"], window=s["window"], noise_factor=s["noise_factor"],
                      seed=s["seed"], classes=s["classes"]).check(adapter.n_layers)
    out_dir = Path(s["out"])
    if facts is not None:
        return _dataset(s, adapter, cfg, facts, out_dir, model_name(model))
    return _single(s, adapter, cfg, out_dir, model_name(model))


def _single(s, adapter, cfg, out_dir: Path, name: str) -> int:
    from ..trace.causal import trace_prompt
    from ..trace.plots import plot_trace

    t = time.perf_counter()
    result = trace_prompt(adapter, s["prompt"], s["subject"], s["answer"], cfg)
    obj = {"model": name, **result.to_dict(), "seconds": round(time.perf_counter() - t, 2)}
    files = _write(out_dir, "trace", obj, plot_trace, cfg.kinds, name)
    if s["json"]:
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
        print(f"  strongest MLP effect at the last subject token {result.tokens[e - 1]!r}: "
              f"layer {result.recommended_layer}")
    print("  wrote " + ", ".join(files))
    return 0


def _dataset(s, adapter, cfg, facts, out_dir: Path, name: str) -> int:
    from ..core.errors import TraceError
    from ..trace.average import TraceAverage, known_facts
    from ..trace.cache import LayerRecommendation, noise_sigma, save_recommendation
    from ..trace.causal import trace_prompt
    from ..trace.plots import plot_average

    t0 = time.perf_counter()
    sigma = noise_sigma(adapter, factor=cfg.noise_factor)
    avg = TraceAverage(adapter.n_layers, cfg.kinds)
    lines = []
    show, limit = show_progress(s), s["limit"]
    for n, fact in enumerate(known_facts(adapter, facts, limit)):
        # a seed per fact: the average sees fresh noise draws, not one draw reused
        r = trace_prompt(adapter, fact.prompt, fact.subject, fact.answer, replace(cfg, seed=cfg.seed + n), sigma)
        avg.update(r)
        lines.append(json.dumps({"id": fact.id, **r.to_dict()}))
        if show:
            print(f"\r  traced {avg.n}/{limit} facts ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr)
    if show:
        print(file=sys.stderr)
    if not avg.n:
        raise TraceError(f"the model answers none of the {len(facts)} facts in {s['dataset']} correctly")
    obj = {"model": name, "dataset": str(s["dataset"]), **avg.to_dict(), "kinds": list(cfg.kinds),
           "samples": cfg.samples, "window": cfg.window, "noise_sigma": sigma,
           "seconds": round(time.perf_counter() - t0, 1)}
    if "mlp" in cfg.kinds:
        rec = LayerRecommendation(avg.recommended_layer, tuple(avg.mlp_curve()), avg.n, cfg.samples, cfg.window,
                                  str(s["dataset"]))
        obj["recommendation_cache"] = str(save_recommendation(adapter, rec))
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..core.paths import atomic_write_text

    atomic_write_text(out_dir / "facts.jsonl", "\n".join(lines) + "\n")
    files = _write(out_dir, "average", obj, plot_average, cfg.kinds, name, extra=[out_dir / "facts.jsonl"])
    if s["json"]:
        print(json.dumps(obj))
        return 0
    print(f"factedit trace on {name}: {avg.n} correctly answered facts from {s['dataset']} ({obj['seconds']} s)"
          + ("" if avg.n >= limit else f" — fewer than --limit {limit}: no more facts are answered correctly"))
    print(f"  mean p_clean {avg.p_clean:.4f}, p_corrupt {avg.p_corrupt:.4f}")
    if obj.get("recommended_layer") is not None:
        print(f"  strongest average MLP effect at the last subject token: layer {obj['recommended_layer']} "
              f"(cached in {obj['recommendation_cache']}: `factedit edit --layer traced` edits it)")
    print("  wrote " + ", ".join(files))
    return 0
