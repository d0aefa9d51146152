"""``factedit apply | revert | inspect``: patch files on saved models."""

from __future__ import annotations

import json

__all__ = ["cmd_apply", "cmd_revert", "cmd_inspect"]


def _signatures(settings, names) -> list:
    """Each file's signature status, refusing a bad one (and, with --require-signature, a missing one)."""
    from ..core.signing import require, trust_anchors

    trust = trust_anchors(settings["trust"] or ())
    return [require(n, trust, settings["require_signature"]) for n in names]


def cmd_apply(settings) -> int:
    from ..core.models import save_model
    from ..core.signing import sign
    from ..patch.claims import check_claims
    from ..patch.files import Patch, PatchError
    from ..patch.saved import apply_with_undo, records_of, with_applied, write_records

    names = settings["patches"]
    statuses = _signatures(settings, names)  # before anything is loaded
    patches = [Patch.load(p) for p in names]  # all validated before the model is touched
    source = settings.model.model
    record, entries = records_of(source)
    model, tok = settings.model.load()
    adapter = settings.model.adapter(model, tok)
    claims = []

    def claims_hold(p) -> None:  # each patch checked on the model as the patches before it left it
        report = check_claims(adapter, p)
        claims.append(report)
        if report.checked and not report.ok and not settings["force"]:
            raise PatchError(f"{names[len(claims) - 1]}: {report.describe()}; nothing was applied (--force applies "
                             "it anyway)")

    _, undo = apply_with_undo(adapter, patches, force=settings["force"], before=claims_hold)
    out = {"applied": names, "forced": [p.meta.get("forced_mismatch", []) for p in patches],
           "signatures": [s.to_dict() for s in statuses], "claims": [c.to_dict() for c in claims]}
    if settings["save_model"]:
        records = with_applied(record, entries, patches, names, undo, source, [s.to_dict() for s in statuses])
        target = save_model(model, tok, settings["save_model"], also=lambda folder: write_records(folder, *records))
        out["saved_model"] = str(target)
        if settings["sign_key"]:
            out["signature"] = str(sign(target, settings["sign_key"]))
    if settings["json"]:
        print(json.dumps(out))
        return 0
    for name, status, report in zip(names, statuses, claims):
        print(f"applied {name}\n  signature: {status.describe()}\n  {report.describe()}")
    if settings["save_model"]:
        print(f"saved to {out['saved_model']} (with {len(undo)} undo record(s) for an exact revert)"
              + (f"; signed: {out['signature']}" if "signature" in out else ""))
    return 0


def cmd_revert(settings) -> int:
    from ..core.errors import ModelLoadError
    from ..core.models import save_model
    from ..patch.files import Patch, revert_patches
    from ..patch.saved import records_of, without_reverted, write_records

    source = settings.model.model
    if not source:
        raise ModelLoadError("revert needs --model DIR: the saved edited model to revert")
    names = settings["patches"]
    patches = [Patch.load(p) for p in names]
    record, entries = records_of(source)  # read before a save in place replaces the folder
    model, tok = settings.model.load()
    exact = revert_patches(settings.model.adapter(model, tok), patches, force=settings["force"],
                           undo=entries)  # refused (nothing written) unless applied
    records = without_reverted(record, entries, patches)
    target = save_model(model, tok, settings["save_model"] or source,
                        also=lambda folder: write_records(folder, *records))
    out = {"reverted": names, "saved_model": str(target), "bit_identical_to_base": exact}
    if settings["json"]:
        print(json.dumps(out))
        return 0
    print(f"reverted {len(patches)} patch(es); saved to {target}")
    inexact = [m for m, ok in exact.items() if not ok]
    print("  bit-identical to the base: " + ("yes" if not inexact else
          f"no ({', '.join(inexact)}: no undo data for them — the model was not saved by factedit apply/edit "
          "--save-model — so (W + Δ) − Δ rounds differently in a few entries; re-applying needs --force)"))
    return 0


def _claims_of(settings, patch):
    """The patch's claims replayed on its base: ``--model``, else the model the patch names (a report that
    says why not when it cannot be loaded)."""
    from dataclasses import replace

    from ..core.errors import FactEditError
    from ..patch.claims import ClaimReport, check_claims

    if not settings["claims"]:
        return ClaimReport(checked=False, reason="--no-claims")
    mo = settings.model if settings.model.model else replace(settings.model, model=patch.meta.get("model"))
    try:
        model, tok = mo.load()
    except FactEditError as e:
        return ClaimReport(checked=False, reason=f"cannot load its base model {mo.model!r} ({e}); give --model")
    return check_claims(mo.adapter(model, tok), patch)


def cmd_inspect(settings) -> int:
    from ..core.signing import check, trust_anchors
    from ..patch.files import Patch

    patch = Patch.load(settings["patch"])
    info = patch.describe()
    status = check(settings["patch"], trust_anchors(settings["trust"] or ()))
    claims = _claims_of(settings, patch)
    info.update(signature=status.to_dict(), claims=claims.to_dict())
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
    _details(info)
    print(f"  signature: {status.describe()}")
    print(f"  {claims.describe()}")
    for r in claims.to_dict()["requests"]:
        print(f"    {r['prompt']!r} -> {r['target_new']!r}: P(new) {r['p_new_before']:.4f} -> {r['p_new_after']:.4f}"
              + ("" if r["p_true_after"] is None else f", P(true) {r['p_true_before']:.4f} -> {r['p_true_after']:.4f}"))
    return 0


def _details(info: dict) -> None:
    """Provenance lines of ``inspect``: the configuration, statistics and fingerprints."""
    cfg = info.get("config") or {}
    keys = ("method", "layer", "layers", "layer_rule", "stats_tokens", "seed")
    shown = ", ".join(f"{k}={cfg[k]}" for k in keys if cfg.get(k) is not None)
    value = cfg.get("value") or {}
    if value:
        shown += ", value: " + ", ".join(f"{k}={value[k]}" for k in ("steps", "lr", "clamp_norm_factor") if k in value)
    print(f"  config: {shown or '(none recorded)'}")
    for layer, st in (info.get("statistics") or {}).items():
        print(f"  statistics of layer {layer}: {st.get('tokens')} tokens of {st.get('corpus')}"
              + (f" ({st['reason']})" if st.get("reason") else ""))
    print(f"  prompt prefix: {info.get('prompt_prefix')!r}; took: {info.get('verified')}; format {info.get('format')}")
    for name, fp in (info.get("fingerprints") or {}).items():
        after = (info.get("fingerprints_after") or {}).get(name, "?")
        print(f"  {name}: base {fp[:16]}…, after the edit {after[:16]}…")
