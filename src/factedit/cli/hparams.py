"""``factedit hparams FILE [--model M]`` (registered by :mod:`factedit.cli`): what a ROME/MEMIT-repository or
EasyEdit hyperparameter file maps to here."""

from __future__ import annotations

import json

__all__ = ["cmd_hparams"]


def cmd_hparams(settings) -> int:
    from ..edit.methods.hparams import check_modules, read_hparams
    from ..edit.methods.options import to_jsonable

    hp = read_hparams(settings["hparams_file"])
    out = {"file": hp.path, "method": hp.method,
           "mapping": [{"key": k, "value": v, "option": o, "as": to_jsonable(x), "note": n}
                       for k, v, o, x, n in hp.rows],
           "warnings": list(hp.warnings)}
    if settings["model"]:
        from ..editor import Editor

        model, tok = settings.model.load()
        ed = Editor(model, tok, progress=False)
        cfg = ed.make_config(hp.options)  # layers in range, options valid for this model
        out["model"] = settings["model"]
        out["warnings"] += check_modules(ed.adapter, hp, cfg.layers)
        out["config"] = to_jsonable(cfg)
    if settings["json"]:
        print(json.dumps(out))
        return 0
    print(f"{hp.path}: {hp.method}")
    w = max(len(r["key"]) for r in out["mapping"])
    for r in out["mapping"]:
        target = f"--set {r['option']}={json.dumps(r['as'])}" if r["option"] and "." in r["option"] or r["option"] in (
            "fact_token", "context_lengths", "mom2_adjustment", "mom2_update_weight", "nullspace_threshold", "alpha",
            "ridge") else (f"--{r['option'].replace('_', '-')} {json.dumps(r['as'])}" if r["option"] else "–")
        print(f"  {r['key']:<{w}}  {json.dumps(r['value']) if r['value'] is not None else '':<34} {target}"
              + (f"   ({r['note']})" if r["note"] else ""))
    for text in out["warnings"]:
        print(f"  note: {text}")
    if "config" in out:
        print(f"  checked against {settings['model']}: layers {list(cfg.layers)}, modules as the file names them")
    return 0
