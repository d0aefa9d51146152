"""Command line: ``factedit edit | stats | apply | revert | inspect | trace | eval | summarize``.

Errors that are the user's to fix print one message on stderr and exit with status 2;
the model and caches are left as they were.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

__all__ = ["main"]

DEMO = dict(prompt="{} is located in the city of", subject="Eiffel Tower", target="Rome", true="Paris")
DEFAULT_PARAPHRASES = ("Fact: {prompt}", "Q: Where is {subject}? A: {prompt}")


def _layers(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None


def _arch_spec(path: Optional[str]):
    if not path:
        return None
    from .arch import ArchSpec
    from .errors import ArchitectureError

    try:
        return ArchSpec(**json.loads(open(path, encoding="utf-8").read()))
    except (OSError, ValueError, TypeError) as e:
        raise ArchitectureError(f"cannot read architecture spec {path}: {e}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cpu)")
    p.add_argument("--corpus", default=None,
                   help="text for the key statistics: .txt/.jsonl path, wikitext-103, wikipedia, model, auto (default)")
    p.add_argument("--stats-tokens", type=int, default=None, help="tokens for the statistics (default from the model width)")
    p.add_argument("--arch-spec", default=None, help="JSON file naming the modules of an unknown architecture")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="factedit", description="Locate and edit facts inside language models.")
    sub = ap.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit one fact and show the model before and after")
    e.add_argument("--prompt", default=None, help="template with {} for the subject (default: the Eiffel Tower demo)")
    e.add_argument("--subject", default=None)
    e.add_argument("--target", default=None, help="the new object")
    e.add_argument("--true", default=None, dest="true", help="the current object (optional, for comparison)")
    e.add_argument("--method", default="r-rome", help="r-rome (default), rome, p-rome, memit, emmet, alphaedit, ft")
    e.add_argument("--layer", type=int, default=None,
                   help="edited layer (default: the cached causal-trace recommendation for ROME variants, "
                        "see `factedit trace --dataset`; otherwise from the model depth)")
    e.add_argument("--layers", type=_layers, default=None,
                   help="edited layers of a multi-layer method, e.g. 3,4,5,6,7 (default: a span from the depth)")
    e.add_argument("--requests", default=None,
                   help="JSONL/JSON file of requests (factedit or CounterFact layouts) instead of --prompt/--subject/--target")
    e.add_argument("--limit", type=int, default=None, help="with --requests: use only the first N")
    e.add_argument("--batch-size", type=int, default=None, help="requests per target-optimisation batch (batch methods)")
    e.add_argument("--seed", type=int, default=0, help="seed of the context templates")
    e.add_argument("--steps", type=int, default=None, help="max optimisation steps (default 25)")
    e.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="any field of the method's config, e.g. norm_constraint=0.01 (ft) or value.lr=0.1; repeatable")
    e.add_argument("--paraphrase", action="append", default=None,
                   help="an extra prompt to show before/after (repeatable; default: two rephrasings)")
    e.add_argument("--max-new-tokens", type=int, default=12)
    e.add_argument("--no-guard", action="store_true",
                   help="skip the collapse guard (apply even an edit that looks like it would break the model)")
    e.add_argument("--save-patch", default=None, help="write the edit as a patch file (safetensors)")
    e.add_argument("--save-model", default=None, help="write the edited model as a Hugging Face folder")
    _common(e)

    a = sub.add_parser("apply", help="apply patch files (in order) to a model")
    a.add_argument("patches", nargs="+")
    a.add_argument("--force", action="store_true", help="apply even if the base fingerprints differ (recorded)")
    a.add_argument("--save-model", default=None, help="write the patched model here")
    _common(a)

    r = sub.add_parser("revert", help="remove patches (newest last on the command line) from a saved edited model")
    r.add_argument("patches", nargs="+")
    r.add_argument("--save-model", default=None, help="where to write the reverted model (default: in place)")
    _common(r)

    i = sub.add_parser("inspect", help="show what a patch file changes")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true")

    s = sub.add_parser("stats", help="compute and cache the key statistics C ahead of time")
    s.add_argument("--layers", type=_layers, default=None, help="comma-separated layers (default: the default edit layer)")
    s.add_argument("--force", action="store_true", help="recompute even if cached")
    _common(s)

    from .cli_trace import add_parser as add_trace_parser

    add_trace_parser(sub)
    from .cli_eval import add_parsers

    add_parsers(sub, _common)
    return ap


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:
            pass


def _snapshot(adapter, req, prompts):
    from .generation import greedy_continuation, target_probabilities

    snap = {"p_new": target_probabilities(adapter, [req.text], [req.target_new])[0]}
    if req.target_true:
        snap["p_true"] = target_probabilities(adapter, [req.text], [req.target_true])[0]
    gens = [greedy_continuation(adapter, p, _snapshot.max_new_tokens) for p in prompts]
    snap["generation"] = gens[0]
    snap["paraphrase_generations"] = gens[1:]
    return snap


def _guard(args):
    from .guard import GuardConfig

    return GuardConfig(enabled=not args.no_guard)


def _efficacy(adapter, reqs):
    from .generation import target_logprobs

    known = [r for r in reqs if r.target_true]
    if not known:
        return None
    new = target_logprobs(adapter, [r.text for r in known], [r.target_new for r in known])
    true = target_logprobs(adapter, [r.text for r in known], [r.target_true for r in known])
    return sum(a > b for a, b in zip(new, true)) / len(known)


def cmd_edit_many(args) -> int:
    from .cli_trace import traced_layer
    from .editor import Editor
    from .methods.options import parse_options
    from .models import load_model, model_name
    from .requests_io import load_requests

    reqs = load_requests(args.requests, limit=args.limit)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    editor = Editor(model, tok, arch=_arch_spec(args.arch_spec), progress=not args.json and sys.stderr.isatty())
    overrides = dict(stats_corpus=args.corpus, stats_tokens=args.stats_tokens, seed=args.seed)
    if args.layers is not None:
        overrides["layers"] = tuple(args.layers)
    else:
        overrides["layer"] = args.layer if args.layer is not None else traced_layer(editor.adapter, args.method)
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    cfg = editor.make_config(args.method, steps=args.steps, options=parse_options(args.set or ()), **overrides)
    before = _efficacy(editor.adapter, reqs)
    t = time.perf_counter()
    result = editor.edit(reqs, config=cfg, guard=_guard(args))
    seconds = time.perf_counter() - t
    after = _efficacy(editor.adapter, reqs)
    saved = _save_outputs(args, editor, result)
    out = {"method": args.method, "model": model_name(model), "layers": result.layers, "n_requests": len(reqs),
           "seconds": round(seconds, 3), "efficacy": after, "efficacy_before": before,
           "delta_norm": result.delta_norm, "timings": {k: round(v, 3) for k, v in result.timings.items()}, **saved}
    if args.json:
        print(json.dumps(out))
    else:
        eff = "n/a (no target_true)" if after is None else f"{before:.3f} -> {after:.3f}"
        print(f"factedit {args.method} on {out['model']}, layers {result.layers}: {len(reqs)} requests "
              f"in {seconds:.1f} s\n  efficacy (P(new) > P(true)): {eff}\n  ||Δ|| = {result.delta_norm:.3f}")
    return 0


def cmd_edit(args) -> int:
    from .cli_trace import traced_layer
    from .editor import Editor
    from .errors import RequestError
    from .methods.options import parse_options
    from .models import load_model, model_name
    from .requests import Request

    if args.requests:
        return cmd_edit_many(args)
    given = [args.prompt, args.subject, args.target]
    if all(x is None for x in given):
        prompt, subject, target, true = DEMO["prompt"], DEMO["subject"], DEMO["target"], args.true or DEMO["true"]
    elif any(x is None for x in given):
        raise RequestError("give --prompt, --subject and --target together (or none of them for the demo edit)")
    else:
        prompt, subject, target, true = args.prompt, args.subject, args.target, args.true
    req = Request.from_filled(prompt, subject, target, true) if "{}" not in prompt else Request(prompt, subject, target, true)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    editor = Editor(model, tok, arch=_arch_spec(args.arch_spec), progress=not args.json and sys.stderr.isatty())
    layer = args.layer if args.layer is not None or args.layers is not None else traced_layer(editor.adapter, args.method)
    overrides = dict(layer=layer, seed=args.seed, stats_corpus=args.corpus, stats_tokens=args.stats_tokens)
    if args.layers is not None:
        overrides["layers"] = tuple(args.layers)
        overrides.pop("layer")
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    # validates method, layer and options before any work
    cfg = editor.make_config(args.method, steps=args.steps, options=parse_options(args.set or ()), **overrides)
    paraphrases = args.paraphrase or [p.format(prompt=req.text, subject=req.subject) for p in DEFAULT_PARAPHRASES]
    prompts = [req.text] + paraphrases
    _snapshot.max_new_tokens = args.max_new_tokens
    before = _snapshot(editor.adapter, req, prompts)
    result = editor.edit(req, config=cfg, guard=_guard(args))
    after = _snapshot(editor.adapter, req, prompts)
    saved = _save_outputs(args, editor, result)
    out = {
        "method": args.method, "model": model_name(model), "layers": result.layers,
        "request": req.to_dict(), "before": before, "after": after,
        "delta_norm": result.delta_norm, "seconds": round(result.seconds, 3), "guard": result.guard,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "total_seconds": round(time.perf_counter() - t0, 3), **saved,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    w = max(len(target), len(true or "")) + 4
    print(f"factedit {args.method} on {out['model']}, layer {', '.join(map(str, result.layers))}")
    print(f"  {'':<{w}} {'before':>8} {'after':>8}")
    print(f"  {'P(' + target + ')':<{w}} {before['p_new']:>8.4f} {after['p_new']:>8.4f}")
    if true:
        print(f"  {'P(' + true + ')':<{w}} {before['p_true']:>8.4f} {after['p_true']:>8.4f}")
    for i, p in enumerate(prompts):
        b = before["generation"] if i == 0 else before["paraphrase_generations"][i - 1]
        a = after["generation"] if i == 0 else after["paraphrase_generations"][i - 1]
        print(f"\n  {p!r}\n    before: {b.strip()!r}\n    after:  {a.strip()!r}")
    print(f"\n  ||Δ|| = {result.delta_norm:.3f}   edit {result.seconds:.1f} s "
          f"(values {result.timings.get('values', 0):.1f} s, statistics {result.timings.get('stats', 0):.1f} s)")
    return 0


def _save_outputs(args, editor, result) -> dict:
    out = {}
    if getattr(args, "save_patch", None):
        from .patch import Patch

        out["patch"] = str(Patch.from_result(result).save(args.save_patch))
    if getattr(args, "save_model", None):
        from .models import save_model

        out["saved_model"] = str(save_model(editor.model, editor.tokenizer, args.save_model))
    return out


def cmd_apply(args) -> int:
    from .arch import ModelAdapter
    from .models import load_model, save_model
    from .patch import Patch, apply_patches

    patches = [Patch.load(p) for p in args.patches]  # all validated before the model is touched
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    adapter = ModelAdapter(model, tok, _arch_spec(args.arch_spec))
    apply_patches(adapter, patches, force=args.force)
    out = {"applied": args.patches, "forced": [p.meta.get("forced_mismatch", []) for p in patches]}
    if args.save_model:
        out["saved_model"] = str(save_model(model, tok, args.save_model))
    print(json.dumps(out) if args.json else "\n".join(f"applied {p}" for p in args.patches)
          + (f"\nsaved to {out['saved_model']}" if args.save_model else ""))
    return 0


def cmd_revert(args) -> int:
    from .arch import ModelAdapter
    from .errors import ModelLoadError
    from .models import load_model, save_model
    from .patch import Patch, revert_patch

    if not args.model:
        raise ModelLoadError("revert needs --model DIR: the saved edited model to revert")
    patches = [Patch.load(p) for p in args.patches]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    adapter = ModelAdapter(model, tok, _arch_spec(args.arch_spec))
    exact = {}
    for p in reversed(patches):
        exact.update(revert_patch(adapter, p))
    target = save_model(model, tok, args.save_model or args.model)
    out = {"reverted": args.patches, "saved_model": str(target), "bit_identical_to_base": exact}
    print(json.dumps(out) if args.json else f"reverted {len(patches)} patch(es); saved to {target}")
    return 0


def cmd_inspect(args) -> int:
    from .patch import Patch

    info = Patch.load(args.patch).describe()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.patch}: {info['method']} patch of {info['model']} (factedit {info['factedit_version']})")
    for l in info["layers"]:
        print(f"  layer {l}: {info['modules'].get(str(l), '?')}  rank {info['ranks'][str(l)]}  "
              f"||Δ|| {info['norms'][str(l)]:.4f}")
    for r in info["requests"]:
        print(f"  {r['prompt'].replace('{}', r['subject'])!r} -> {r['target_new']!r}"
              + (f" (was {r['target_true']!r})" if r.get("target_true") else ""))
    if info.get("forced"):
        print("  NOTE: applied with --force to a model whose fingerprints differed")
    return 0


def cmd_stats(args) -> int:
    from .arch import ModelAdapter
    from .methods.rome import default_layer, default_stats_tokens
    from .models import load_model
    from .stats import layer_stats

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    adapter = ModelAdapter(model, tok, _arch_spec(args.arch_spec))
    layers = args.layers or [default_layer(adapter.n_layers)]
    for l in layers:
        adapter.check_layer(l)
    n_tokens = args.stats_tokens or default_stats_tokens(adapter.d_ff)
    report = []
    for l in layers:
        t = time.perf_counter()
        st = layer_stats(adapter, l, corpus=args.corpus, n_tokens=n_tokens, force=args.force,
                         progress=not args.json and sys.stderr.isatty())
        dt = time.perf_counter() - t
        report.append({"layer": l, "tokens": st.count, "corpus": st.meta.get("corpus"), "seconds": round(dt, 2),
                       "trace": float(st.mom2.trace())})
    if args.json:
        print(json.dumps({"layers": report}))
    else:
        for r in report:
            print(f"layer {r['layer']}: {r['tokens']} tokens from {r['corpus']} ({r['seconds']} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli_trace import cmd_trace
    from .errors import FactEditError

    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    from .cli_eval import cmd_eval, cmd_summarize

    try:
        return {"edit": cmd_edit, "stats": cmd_stats, "apply": cmd_apply, "revert": cmd_revert,
                "inspect": cmd_inspect, "trace": cmd_trace, "eval": cmd_eval,
                "summarize": cmd_summarize}[args.command](args)
    except FactEditError as e:
        print(f"factedit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("factedit: interrupted; weights and caches are unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
