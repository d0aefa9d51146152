"""``factedit edit``: one fact (before/after probabilities and continuations) or a file of requests."""

from __future__ import annotations

import json
import os
import sys
import time

from ..edit.verify import VERIFY_MIN_P
from .common import add_model_options, arch_spec, layer_arg, layers_arg, load, method_names, stats_options

__all__ = ["add_parser", "cmd_edit"]

DEMO = dict(prompt="{} is located in the city of", subject="Eiffel Tower", target="Rome", true="Paris")


def add_parser(sub) -> None:
    e = sub.add_parser("edit", help="edit one fact and show the model before and after")
    e.add_argument("--prompt", default=None, help="template with {} for the subject (default: the Eiffel Tower demo)")
    e.add_argument("--subject", default=None)
    e.add_argument("--target", default=None, help="the new object")
    e.add_argument("--true", default=None, dest="true", help="the current object (optional, for comparison)")
    e.add_argument("--method", default="r-rome", help=method_names())
    e.add_argument("--layer", type=layer_arg, default=None,
                   help="edited layer: a number, or 'traced' for the layer `factedit trace --dataset` recommended "
                        "(default: from the model depth, round(0.17 x layers); the same in Python and eval)")
    e.add_argument("--layers", type=layers_arg, default=None,
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
    e.add_argument("--chat", action="store_true",
                   help="edit the fact as the chat model sees it: the prompt as the user's turn, the assistant's "
                        "answer beginning with it (the tokenizer's chat template; read without a prompt prefix)")
    e.add_argument("--allow-unverified", action="store_true",
                   help="keep (and save) an edit that did not take on its own prompt (default: exit 2, nothing saved)")
    e.add_argument("--no-side-effects", action="store_true",
                   help="skip the blast-radius report (probes of the same relation with other subjects and of the "
                        "subject with other relations, answered before and after)")
    e.add_argument("--side-effects-bank", default=None, metavar="KNOWNS",
                   help="known facts (known_1000.json or JSONL) whose subjects and templates the probes use "
                        "(default: $FACTEDIT_KNOWNS, else a built-in list)")
    e.add_argument("--no-guard", action="store_true",
                   help="skip the collapse guard (apply even an edit that looks like it would break the model)")
    e.add_argument("--save-patch", default=None, help="write the edit as a patch file (safetensors)")
    e.add_argument("--save-model", default=None, help="write the edited model as a Hugging Face folder")
    add_model_options(e)


def _guard(args):
    from ..edit.guard import GuardConfig

    return GuardConfig(enabled=not args.no_guard)


def cmd_edit_many(args) -> int:
    from ..editor import Editor
    from ..edit.methods.options import parse_options
    from ..core.request_files import load_requests
    from ..report import batch_report

    reqs = load_requests(args.requests, limit=args.limit)
    model, tok = load(args)
    editor = Editor(model, tok, arch=arch_spec(args.arch_spec), prompt_prefix=args.prompt_prefix, progress=not args.json and sys.stderr.isatty())
    overrides = dict(stats_options(args), seed=args.seed)
    if args.layers is not None:
        overrides["layers"] = tuple(args.layers)
    else:
        overrides["layer"] = args.layer
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    cfg = editor.make_config(args.method, steps=args.steps, options=parse_options(args.set or ()), **overrides)
    result, out = batch_report(editor, reqs, cfg, guard=_guard(args))
    out = {**out, "method": args.method, **_save_outputs(args, editor, result)}
    outcomes, before, after, seconds = out["requests"], out["efficacy_before"], out["efficacy"], out["seconds"]
    if args.json:
        print(json.dumps(out))
    else:
        eff = "n/a (no target_true)" if after is None else f"{before:.3f} -> {after:.3f}"
        print(f"factedit {args.method} on {out['model']}, layers {result.layers}: {len(reqs)} requests "
              f"in {seconds:.1f} s\n  efficacy (P(new) > P(true)): {eff}\n  took (verified on its own prompt): "
              f"{out['n_verified']} of {len(reqs)}\n  ||Δ|| = {result.delta_norm:.3f}")
        for o in outcomes:
            true = "" if o["p_true"] is None else f", P(true) {o['p_true']:.4f}"
            print(f"  {'ok    ' if o['verified'] else 'FAILED'} {o['prompt']!r} -> {o['target_new']!r}: "
                  f"P(new) {o['p_new']:.4f}{true}")
    _refuse_unverified(args, result)
    return 0


def _refuse_unverified(args, result) -> None:
    """Exit 2 (nothing was saved) when an edit did not take, unless ``--allow-unverified``."""
    if result.verified is False and not args.allow_unverified:
        from ..core.errors import UnverifiedEditError

        failed = [r for r, v in zip(result.requests, result.verification) if not v["verified"]]
        hint = ""
        if not result.prompt_prefix and any(r.prompt.startswith("{}") for r in failed):
            hint = (" A subject at the very start of a prompt read without a prompt prefix sits on the "
                    "attention-sink position 0, where edits do not take: use --prompt-prefix auto.")
        raise UnverifiedEditError(
            f"{len(failed)} of {len(result.verification)} edits did not take on their own prompt (the new target is "
            f"neither the greedy continuation nor at P >= {VERIFY_MIN_P}, or the true target still wins"
            + (", even after the retry" if result.retried else "") + "); nothing was saved. Try another layer "
            "or more steps, or pass --allow-unverified to keep it." + hint)


def cmd_edit(args) -> int:
    from ..editor import Editor
    from ..core.errors import RequestError
    from ..edit.methods.options import parse_options
    from ..core.requests import Request
    from ..report import edit_prompts, edit_report
    from ..side_effects import load_bank

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
    model, tok = load(args)
    prefix = "none" if args.chat and args.prompt_prefix == "auto" else args.prompt_prefix  # chat markup starts it
    editor = Editor(model, tok, arch=arch_spec(args.arch_spec), prompt_prefix=prefix, progress=not args.json and sys.stderr.isatty())
    shown = req
    overrides = dict(layer=args.layer, seed=args.seed, **stats_options(args))
    if args.layers is not None:
        overrides["layers"] = tuple(args.layers)
        overrides.pop("layer")
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    # validates method, layer and options before any work
    cfg = editor.make_config(args.method, steps=args.steps, options=parse_options(args.set or ()), **overrides)
    req, names, prompts = edit_prompts(editor, shown, chat=args.chat, paraphrases=args.paraphrase)
    bank = None if args.no_side_effects else load_bank(args.side_effects_bank or os.environ.get("FACTEDIT_KNOWNS"))
    result, out = edit_report(editor, req, cfg, shown=shown, prompts=prompts, chat=args.chat, guard=_guard(args),
                              max_new_tokens=args.max_new_tokens, side_effects=not args.no_side_effects, bank=bank)
    before, after = out["before"], out["after"]
    out = {**out, "method": args.method, "total_seconds": round(time.perf_counter() - t0, 3),
           **_save_outputs(args, editor, result)}
    if args.json:
        print(json.dumps(out))
        _refuse_unverified(args, result)
        return 0
    w = max(len(target), len(true or "")) + 4
    print(f"factedit {args.method} on {out['model']}, layer {', '.join(map(str, result.layers))} "
          f"({result.config.layer_rule})" + (", as a chat turn" if args.chat else ""))
    print(f"  {'':<{w}} {'before':>8} {'after':>8}")
    print(f"  {'P(' + target + ')':<{w}} {before['p_new']:>8.4f} {after['p_new']:>8.4f}")
    if true:
        print(f"  {'P(' + true + ')':<{w}} {before['p_true']:>8.4f} {after['p_true']:>8.4f}")
    for i, p in enumerate(names):
        b = before["generation"] if i == 0 else before["paraphrase_generations"][i - 1]
        a = after["generation"] if i == 0 else after["paraphrase_generations"][i - 1]
        print(f"\n  {p!r}\n    before: {b.strip()!r}\n    after:  {a.strip()!r}")
    if "chat_answer" in after:
        print(f"\n  as a chat turn (the prompt as the user's message)\n    before: {before['chat_answer'].strip()!r}"
              f"\n    after:  {after['chat_answer'].strip()!r}")
    fx = out.get("side_effects")
    if fx:
        print(f"\n  side effects ({fx['source']} probes): {fx['changed']} of {fx['probed']} answers changed, "
              f"{fx['leaked_target']} now name {target!r}")
        for r in fx["probes"]:
            if r["changed"]:
                print(f"    {'LEAK  ' if r['leaked'] else 'changed'} {r['prompt']!r}: {r['before'].strip()!r} -> "
                      f"{r['after'].strip()!r}")
    print(f"\n  ||Δ|| = {result.delta_norm:.3f}   edit {result.seconds:.1f} s "
          f"(values {result.timings.get('values', 0):.1f} s, statistics {result.timings.get('stats', 0):.1f} s)")
    worst = max(result.rounding.values(), default=0.0)
    if worst > 1e-4:  # float32 weights round at ~1e-7; only half precision shows here
        print(f"  written in {editor.adapter.w_out_parameter(result.layers[0]).dtype}: {100 * worst:.2f}% of the update's "
              "effect on its key lost to rounding")
    print("  the edit took: " + ("yes" if result.verified else "NO") + (" (after a retry)" if result.retried else ""))
    _refuse_unverified(args, result)
    return 0


def _save_outputs(args, editor, result) -> dict:
    """Write --save-patch / --save-model; nothing for an edit that did not take (unless --allow-unverified)."""
    out = {}
    if result.verified is False and not args.allow_unverified:
        return out
    if getattr(args, "save_patch", None):
        from ..patch.files import Patch

        out["patch"] = str(Patch.from_result(result).save(args.save_patch))
    if getattr(args, "save_model", None):
        from ..core.models import save_model

        out["saved_model"] = str(save_model(editor.model, editor.tokenizer, args.save_model))
    return out
