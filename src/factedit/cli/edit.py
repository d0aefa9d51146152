"""``factedit edit``: one fact (before/after probabilities and continuations) or a file of requests."""

from __future__ import annotations

import json
import time

from ..app.edit import edit_batch, edit_fact, refuse_flagged, refuse_unverified, save_outputs
from ..core.timing import phase
from .common import show_progress

__all__ = ["cmd_edit"]


def cmd_edit(settings) -> int:
    es, options = settings.edit, settings.method
    if es.requests:
        return _edit_many(settings, es, options)
    from ..app.edit import request_of

    request_of(es)  # a bad request fails before the model loads
    t0 = time.perf_counter()
    with phase("load the model"):
        model, tok = settings.model.load()
    mo = settings.model
    prefix = "none" if es.chat and mo.prompt_prefix == "auto" else None  # chat markup starts the prompt
    with phase("editor and config"):
        editor = mo.editor(model, tok, progress=show_progress(settings), prompt_prefix=prefix)
        cfg = editor.make_config(options)  # method, layer and options are checked before any work
    result, report = edit_fact(editor, options, es, config=cfg)
    report.total_seconds = time.perf_counter() - t0
    with phase("save outputs"):
        report.saved = save_outputs(editor, result, es)
    print(json.dumps(report.to_dict()) if settings["json"] else report.to_text())
    refuse_unverified(result, es)
    refuse_flagged(result, es)
    return 0


def _edit_many(settings, es, options) -> int:
    from ..core.request_files import load_requests

    requests = load_requests(es.requests, limit=es.limit)  # a bad file fails before the model loads
    model, tok = settings.model.load()
    editor = settings.model.editor(model, tok, progress=show_progress(settings))
    cfg = editor.make_config(options)
    result, report = edit_batch(editor, options, es, config=cfg, requests=requests)
    report.saved = save_outputs(editor, result, es)
    print(json.dumps(report.to_dict()) if settings["json"] else report.to_text())
    refuse_unverified(result, es)
    refuse_flagged(result, es)
    return 0
