"""``factedit audit`` (registered by :mod:`factedit.cli`)."""

from __future__ import annotations

import json
import sys

from .common import show_progress

__all__ = ["cmd_audit"]


def cmd_audit(settings) -> int:
    from ..audit import TensorFiles, audit_files, save_extracted
    from ..core.errors import FactEditError

    if settings["max_rank"] < 1:
        raise FactEditError(f"--max-rank must be >= 1, got {settings['max_rank']}")
    if settings["key_contexts"] < 0:
        raise FactEditError(f"--key-contexts must be >= 0, got {settings['key_contexts']}")
    from ..audit.explain import explain_report, load_candidates

    candidates = load_candidates(settings["subjects"]) if settings["subjects"] else None  # refused before any work
    base, suspect = TensorFiles.open(settings["base"]), TensorFiles.open(settings["suspect"])
    report = audit_files(base, suspect, max_rank=settings["max_rank"], progress=show_progress(settings))
    if report.edits and settings["explain"]:
        from ..core.models import load_model

        model, tok = load_model(settings["base"])
        stats = {"corpus": settings["stats_corpus"], "n_tokens": settings["stats_tokens"],
                 "seq_len": settings["stats_seq_len"] or 256, "dtype": settings["stats_dtype"] or "float64"}
        contexts = ((5, settings["key_contexts"]),) if settings["key_contexts"] else ()
        explain_report(report, model, tok, candidates, stats, progress=show_progress(settings), contexts=contexts)
    out = report.to_dict()
    if settings["extract_patch"]:
        if not report.edits:
            raise FactEditError(f"the audit found no edit to extract ({report.verdict}); nothing was written")
        out["extracted_patch"] = str(save_extracted(report, base, suspect, settings["extract_patch"]))
    if settings["json"]:
        print(json.dumps(out))
        return 0
    print(report.to_text())
    if "extracted_patch" in out:
        print(f"\n  the edits as a patch: {out['extracted_patch']} (factedit revert {out['extracted_patch']} "
              f"--model {settings['suspect']} takes them out)")
    sys.stdout.flush()
    return 0
