"""``factedit audit`` (registered by :mod:`factedit.cli`)."""

from __future__ import annotations

import json

from .common import show_progress

__all__ = ["cmd_audit"]


def cmd_audit(settings) -> int:
    from ..app.audit import audit_checkpoint

    report, path = audit_checkpoint(settings, progress=show_progress(settings))
    out = report.to_dict()
    if path is not None:
        out["extracted_patch"] = str(path)
    if settings["json"]:
        print(json.dumps(out))
        return 0
    print(report.to_text())
    if path is not None:
        print(f"\n  the edits as a patch: {path} (factedit revert {path} --model {settings['suspect']} takes them out)")
    return 0
