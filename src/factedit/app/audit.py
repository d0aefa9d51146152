"""Auditing as users do it (``factedit audit`` and the page's Audit tab): read the options, refuse bad input
before any work, compare, explain on the base weights, extract.

    report, patch_path = audit_checkpoint(settings)                  # the command line
    report, patch_path = audit_checkpoint(settings, model=m, tokenizer=t, extract_to=path)   # the page
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from ..core.errors import FactEditError

__all__ = ["audit_checkpoint", "check_audit_settings"]


def check_audit_settings(settings) -> None:
    """Refuse bad numbers before anything is read."""
    if not settings.get("suspect"):
        raise FactEditError("audit needs a suspect checkpoint (--suspect MODEL: a hub id, a folder, a .gguf file or a "
                            "model.safetensors file with --base)")
    if settings.get("max_rank", 256) < 1:
        raise FactEditError(f"--max-rank must be >= 1, got {settings.get('max_rank')}")
    if settings.get("key_contexts", 0) < 0:
        raise FactEditError(f"--key-contexts must be >= 0, got {settings.get('key_contexts')}")


def audit_checkpoint(settings, model=None, tokenizer=None, extract_to=None,
                     progress: bool = False) -> Tuple[object, Optional[Path]]:
    """The :class:`~factedit.audit.AuditReport` of ``settings`` (an ``audit`` command's or the Audit form's) and
    the path of the extracted patch (``extract_to``, else ``--extract-patch``; None when nothing was written);
    without a base the :class:`~factedit.audit.anomaly.BaseFreeReport` of the suspect's spectra.
    ``model``/``tokenizer``: the base model already loaded with the base's weights (the page's), used for the
    explanation instead of loading the base."""
    from ..audit import TensorFiles, audit_files, save_extracted
    from ..audit.anomaly import audit_without_base
    from ..audit.explain import explain_report, load_candidates

    check_audit_settings(settings)
    if not settings.get("base"):  # no base: the spectra alone (nothing to extract, no edit to explain)
        if settings.get("extract_patch"):
            raise FactEditError("--extract-patch needs --base: without the base model no edit can be separated "
                                "from the weights")
        if TensorFiles.is_bare_file(settings.get("suspect")):
            raise FactEditError(f"{settings.get('suspect')} is a bare .safetensors file: it needs --base, the model "
                                "folder, GGUF file or hub id that gives its architecture (config.json)")
        return audit_without_base(TensorFiles.open(settings.get("suspect"))), None
    # settings.get: the page's form has no --max-rank, --key-contexts or --extract-patch (their defaults apply)
    candidates = load_candidates(settings.get("subjects")) if settings.get("subjects") else None  # before any work
    if TensorFiles.is_bare_file(settings.get("base")):
        raise FactEditError(f"{settings.get('base')}: the base must be a model folder, a .gguf file or a hub id "
                            "(its config.json gives the architecture); a bare .safetensors file can be the suspect")
    base = TensorFiles.open(settings.get("base"))
    suspect = TensorFiles.of_file(settings.get("suspect"), base.config) \
        if TensorFiles.is_bare_file(settings.get("suspect")) else TensorFiles.open(settings.get("suspect"))
    report = audit_files(base, suspect, max_rank=settings.get("max_rank", 256), progress=progress)
    if report.edits and settings.get("explain"):
        if model is None:
            from ..core.models import load_model

            model, tokenizer = load_model(settings.get("base"))
        stats = {"corpus": settings.get("stats_corpus"), "n_tokens": settings.get("stats_tokens"),
                 "seq_len": settings.get("stats_seq_len", 256), "dtype": settings.get("stats_dtype", "float64")}
        k = settings.get("key_contexts", 0)
        explain_report(report, model, tokenizer, candidates, stats, progress=progress,
                       contexts=((5, k),) if k else ())
    target = extract_to or settings.get("extract_patch")
    if settings.get("extract_patch") and not report.edits:
        raise FactEditError(f"the audit found no edit to extract ({report.verdict}); nothing was written")
    path = save_extracted(report, base, suspect, target) if target and report.edits else None
    return report, path
