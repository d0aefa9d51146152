"""The application layer between the library and its front ends (the command line, the evaluation and the
web page): every user-facing option declared once (:mod:`.options`), what a user gave as typed settings
(:mod:`.settings`: model, method, edit, evaluation), editing as users do it (:mod:`.edit`), what an edit
shows as typed reports with their text and JSON renderings (:mod:`.reports`), and the blast radius
(:mod:`.side_effects`).

    settings = Settings("edit", {"target": "Rome", ...})
    result, report = edit_fact(editor, settings.method, settings.edit)
    print(report.to_text())
"""

from .edit import edit_batch, edit_fact, refuse_unverified, request_of, save_outputs
from .options import OPTIONS, Option, add_arguments, options_of
from .reports import BatchReport, EditReport, RequestOutcome, Snapshot
from .settings import EditSettings, ModelOptions, Settings

__all__ = ["OPTIONS", "Option", "options_of", "add_arguments", "Settings", "ModelOptions", "EditSettings",
           "EditReport", "BatchReport", "RequestOutcome", "Snapshot", "edit_fact", "edit_batch", "request_of",
           "refuse_unverified", "save_outputs"]
