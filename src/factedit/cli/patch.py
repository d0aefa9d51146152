"""``factedit apply | revert | inspect``: patch files on saved models."""

from __future__ import annotations

import json

from .common import add_model_options, arch_spec, load

__all__ = ["add_parsers", "cmd_apply", "cmd_revert", "cmd_inspect"]


def add_parsers(sub) -> None:
    a = sub.add_parser("apply", help="apply patch files (in order) to a model")
    a.add_argument("patches", nargs="+")
    a.add_argument("--force", action="store_true", help="apply even if the base fingerprints differ (recorded)")
    a.add_argument("--save-model", default=None, help="write the patched model here")
    add_model_options(a, corpus=False)

    r = sub.add_parser("revert", help="remove patches (newest last on the command line) from a saved edited model")
    r.add_argument("patches", nargs="+")
    r.add_argument("--save-model", default=None, help="where to write the reverted model (default: in place)")
    r.add_argument("--force", action="store_true",
                   help="subtract even when the model's matrices are not what the patches left (not applied)")
    add_model_options(r, corpus=False)

    i = sub.add_parser("inspect", help="show what a patch file changes")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true")



def cmd_apply(args) -> int:
    from ..core.arch import ModelAdapter
    from ..core.models import save_model
    from ..patch.files import Patch, apply_patches

    patches = [Patch.load(p) for p in args.patches]  # all validated before the model is touched
    model, tok = load(args)
    adapter = ModelAdapter(model, tok, arch_spec(args.arch_spec), args.prompt_prefix)
    apply_patches(adapter, patches, force=args.force)
    out = {"applied": args.patches, "forced": [p.meta.get("forced_mismatch", []) for p in patches]}
    if args.save_model:
        out["saved_model"] = str(save_model(model, tok, args.save_model))
    print(json.dumps(out) if args.json else "\n".join(f"applied {p}" for p in args.patches)
          + (f"\nsaved to {out['saved_model']}" if args.save_model else ""))
    return 0


def cmd_revert(args) -> int:
    from ..core.arch import ModelAdapter
    from ..core.errors import ModelLoadError
    from ..core.models import save_model
    from ..patch.files import Patch, revert_patches

    if not args.model:
        raise ModelLoadError("revert needs --model DIR: the saved edited model to revert")
    patches = [Patch.load(p) for p in args.patches]
    model, tok = load(args)
    adapter = ModelAdapter(model, tok, arch_spec(args.arch_spec), args.prompt_prefix)
    exact = revert_patches(adapter, patches, force=args.force)  # refused (nothing written) unless applied
    target = save_model(model, tok, args.save_model or args.model)
    out = {"reverted": args.patches, "saved_model": str(target), "bit_identical_to_base": exact}
    print(json.dumps(out) if args.json else f"reverted {len(patches)} patch(es); saved to {target}")
    return 0


def cmd_inspect(args) -> int:
    from ..patch.files import Patch

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
