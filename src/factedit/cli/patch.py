"""``factedit apply | revert | inspect``: patch files on saved models."""

from __future__ import annotations

import json

__all__ = ["cmd_apply", "cmd_revert", "cmd_inspect"]


def cmd_apply(settings) -> int:
    from ..core.models import save_model
    from ..patch.files import Patch, apply_patches

    names = settings["patches"]
    patches = [Patch.load(p) for p in names]  # all validated before the model is touched
    model, tok = settings.model.load()
    apply_patches(settings.model.adapter(model, tok), patches, force=settings["force"])
    out = {"applied": names, "forced": [p.meta.get("forced_mismatch", []) for p in patches]}
    if settings["save_model"]:
        out["saved_model"] = str(save_model(model, tok, settings["save_model"]))
    print(json.dumps(out) if settings["json"] else "\n".join(f"applied {p}" for p in names)
          + (f"\nsaved to {out['saved_model']}" if settings["save_model"] else ""))
    return 0


def cmd_revert(settings) -> int:
    from ..core.errors import ModelLoadError
    from ..core.models import save_model
    from ..patch.files import Patch, revert_patches

    if not settings.model.model:
        raise ModelLoadError("revert needs --model DIR: the saved edited model to revert")
    names = settings["patches"]
    patches = [Patch.load(p) for p in names]
    model, tok = settings.model.load()
    exact = revert_patches(settings.model.adapter(model, tok), patches,
                           force=settings["force"])  # refused unless applied
    target = save_model(model, tok, settings["save_model"] or settings.model.model)
    out = {"reverted": names, "saved_model": str(target), "bit_identical_to_base": exact}
    print(json.dumps(out) if settings["json"] else f"reverted {len(patches)} patch(es); saved to {target}")
    return 0


def cmd_inspect(settings) -> int:
    from ..patch.files import Patch

    info = Patch.load(settings["patch"]).describe()
    if settings["json"]:
        print(json.dumps(info))
        return 0
    print(f"{settings['patch']}: {info['method']} patch of {info['model']} (factedit {info['factedit_version']})")
    for l in info["layers"]:
        print(f"  layer {l}: {info['modules'].get(str(l), '?')}  rank {info['ranks'][str(l)]}  "
              f"||Δ|| {info['norms'][str(l)]:.4f}")
    for r in info["requests"]:
        print(f"  {r['prompt'].replace('{}', r['subject'])!r} -> {r['target_new']!r}"
              + (f" (was {r['target_true']!r})" if r.get("target_true") else ""))
    if info.get("forced"):
        print("  NOTE: applied with --force to a model whose fingerprints differed")
    return 0
