"""The page of ``factedit ui``: one function per tab, Gradio components wired to a
:class:`~factedit.app.session.Session`.

Nothing here edits, traces or scores: every button collects its form's values (the controls are built from
the option declarations, :mod:`.controls`), calls one session method (which calls the same functions as
the command line) and renders what it returns (:mod:`.render`). An error becomes a readable message in the
tab's status line (:func:`_shown`); the server keeps running and the model is unchanged.
"""

from __future__ import annotations

import functools
import queue
import threading
from pathlib import Path
from typing import Callable, Optional

from ..app.session import Session
from ..core.errors import FactEditError
from .controls import control, form_values
from .render import (
    CSS,
    error,
    ok,
    out,
    render_audit,
    render_batch,
    render_edit,
    render_eval,
    render_history,
    render_trace,
)

__all__ = ["build_app", "serve"]

TRACE_KINDS = ("hidden", "mlp", "attn")


def _progress(gr_progress):
    def report(fraction: Optional[float], message: str) -> None:
        gr_progress(0.0 if fraction is None else fraction, desc=message)
    return report


def _shown(on_error: Callable[[str], object]):
    """Wrap a handler: an error it raises is shown (``on_error(html)`` gives the outputs then) instead of
    reaching Gradio; the session has left the model as it was."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # the page's one catch-all: every error becomes a message
                return on_error(error(e))
        return handler
    return wrap


def _locate_tab(gr, session: Session) -> None:
    names = ["prompt", "subject", "answer", "samples"]
    with gr.Row():
        fields = [control(gr, "page.locate", "prompt", elem_id="trace-prompt"),
                  control(gr, "page.locate", "subject", elem_id="trace-subject"),
                  control(gr, "page.locate", "answer", elem_id="trace-answer")]
    fields.append(control(gr, "page.locate", "samples", widget="slider", minimum=1, maximum=20))
    go = gr.Button("Trace", variant="primary", elem_id="trace-button")
    status = gr.HTML(elem_id="trace-status")
    with gr.Row():
        images = [gr.Image(label=f"{k} (restored)", show_label=False, type="filepath", elem_id=f"trace-{k}")
                  for k in TRACE_KINDS]

    @_shown(lambda html: [html] + [gr.update()] * len(TRACE_KINDS))
    def trace(*values, progress=gr.Progress(track_tqdm=True)):
        obj = session.locate(form_values("page.locate", names, values), progress=_progress(progress))
        return [render_trace(obj)] + [obj["images"][k] for k in TRACE_KINDS]

    go.click(trace, fields, [status, *images])


def _edit_tab(gr, session: Session, history_table, history_html) -> None:
    names = ["prompt", "subject", "target", "true", "method", "layer", "paraphrases", "chat", "allow_unverified",
             "guard", "side_effects", "strict"]
    c = functools.partial(control, gr, "page.edit")
    with gr.Row():
        fields = [c("prompt", elem_id="edit-prompt"), c("subject", elem_id="edit-subject")]
    with gr.Row():
        fields += [c("target", elem_id="edit-target"), c("true", elem_id="edit-true")]
    with gr.Row():
        method = c("method", elem_id="edit-method")
        layer = c("layer", elem_id="edit-layer", placeholder=_layer_hint(session, method.value))
    fields += [method, layer, c("paraphrases", elem_id="edit-paraphrases")]
    with gr.Row():
        fields += [c("chat", elem_id="edit-chat", visible=session.has_chat_template),
                   c("allow_unverified", elem_id="edit-keep"), c("guard", elem_id="edit-guard"),
                   c("side_effects", elem_id="edit-side-effects"), c("strict", elem_id="edit-strict")]
    go = gr.Button("Edit", variant="primary", elem_id="edit-button")
    result = gr.HTML(elem_id="edit-result")
    with gr.Accordion("Report (what `factedit edit --json` prints)", open=False):
        report_json = gr.JSON(elem_id="edit-json")
    method.change(lambda m: gr.update(placeholder=_layer_hint(session, m)), method, layer)

    @_shown(lambda html: (html, gr.update(), history_html()))
    def edit(*values, progress=gr.Progress(track_tqdm=True)):
        report = session.edit(form_values("page.edit", names, values), progress=_progress(progress))
        return render_edit(report), report.to_dict(), history_html()

    go.click(edit, fields, [result, report_json, history_table])


def _layer_hint(session: Session, method: str) -> str:
    try:
        return f"default: {', '.join(map(str, session.default_layers(method)))} (from the depth)"
    except FactEditError as e:
        return str(e)


def _batch_tab(gr, session: Session, history_table, history_html) -> None:
    gr.Markdown("A requests file: JSONL or JSON, factedit's layout (prompt, subject, target_new, target_true) or "
                "either CounterFact layout. Batch methods edit all at once; ROME variants one after another.")
    names = ["requests", "method", "layer", "limit", "guard"]
    c = functools.partial(control, gr, "page.batch")
    with gr.Row():
        fields = [c("requests", widget="file", file_types=[".jsonl", ".json"], type="filepath", elem_id="batch-file"),
                  c("method", elem_id="batch-method"), c("layer", placeholder="default from the depth"),
                  c("limit", label="Use the first N (empty: all)"), c("guard")]
    go = gr.Button("Edit all", variant="primary", elem_id="batch-button")
    result = gr.HTML(elem_id="batch-result")

    @_shown(lambda html: (html, history_html()))
    def batch(*values, progress=gr.Progress(track_tqdm=True)):
        report = session.batch(form_values("page.batch", names, values), progress=_progress(progress))
        return render_batch(report), history_html()

    go.click(batch, fields, [result, history_table])


def _history_tab(gr, session: Session, history_table, history_html) -> None:
    history_table.render()
    status = gr.HTML(elem_id="history-status")
    with gr.Row():
        number = gr.Number(label="Edit #", value=1, precision=0, elem_id="history-number")
        inspect = gr.Button("Inspect", elem_id="inspect-button")
        patch = gr.Button("Download as patch", elem_id="download-patch-button")
        n = gr.Number(label="Revert the last N", value=1, precision=0, elem_id="revert-n")
        revert = gr.Button("Revert", variant="stop", elem_id="revert-button")
    with gr.Row():
        peft = gr.Button("Download all as a PEFT LoRA adapter (.zip)", elem_id="download-peft-button")
        vllm = gr.Checkbox(label="vLLM variant", value=False)
    download = gr.File(label="Download", interactive=False, elem_id="history-download")
    info = gr.JSON(label="Inspect", elem_id="history-inspect")
    with gr.Row():
        upload = gr.File(label="Upload a patch to apply (and its .sig file, when it is signed)",
                         file_types=[".safetensors", ".sig"], file_count="multiple", type="filepath",
                         elem_id="upload-patch")
        force = gr.Checkbox(label="apply anyway (base fingerprints differ, or the delta does not do what the patch "
                                  "claims)", value=False)
        apply = gr.Button("Apply patch", elem_id="apply-patch-button")

    @_shown(lambda html: (html, None))
    def do_inspect(k):
        return "", session.inspect(k)

    @_shown(lambda html: (html, None))
    def download_patch(k):
        path = session.download_patch(k)
        return ok(f"edit {int(k)} written as {Path(path).name}"), path

    @_shown(lambda html: (html, None))
    def download_peft(v, progress=gr.Progress()):
        path = session.download_peft(bool(v), progress=_progress(progress))
        return ok("all edits of the session written as one LoRA adapter"), path

    @_shown(lambda html: (html, history_html()))
    def do_revert(k, progress=gr.Progress()):
        left = session.revert(k, progress=_progress(progress))
        return ok(f"reverted; {left} edit(s) remain" + ("" if left else ": the model has its original weights")), \
            history_html()

    @_shown(lambda html: (html, history_html(), None))
    def do_apply(path, forced, progress=gr.Progress()):  # the upload field is emptied either way
        got = session.upload_patch(path, bool(forced), progress=_progress(progress))
        return ok(f"applied a {got['method']} patch of layers {got['layers']}"
                  + (" (forced: base fingerprints differed)" if got.get("forced") else "")
                  + f"; signature: {got['signature']['state']}; claims: "
                  + ("hold" if got["claims"]["ok"] else "NOT checked" if not got["claims"]["checked"] else "FAIL")
                  ), history_html(), None

    inspect.click(do_inspect, number, [status, info])
    patch.click(download_patch, number, [status, download])
    peft.click(download_peft, vllm, [status, download])
    revert.click(do_revert, n, [status, history_table])
    apply.click(do_apply, [upload, force], [status, history_table, upload])


def _audit_tab(gr, session: Session) -> None:
    gr.Markdown("Compare a checkpoint you were given with the model it was made from: which tensors changed, which "
                "changes are edits, what each edit rewrites (docs/AUDIT.md). Paths are on the server; or upload the "
                "files (an upload replaces the path beside it).")
    names = ["base", "suspect", "subjects", "explain"]
    c = functools.partial(control, gr, "page.audit")
    with gr.Row():
        paths = [c("base", elem_id="audit-base", placeholder="empty: the model this page has loaded"),
                 c("suspect", elem_id="audit-suspect")]
    with gr.Row():
        uploads = [gr.File(label="... or upload the base (a .gguf file)", file_types=[".gguf"], type="filepath",
                           elem_id="audit-base-file"),
                   gr.File(label="... or upload the suspect (a .gguf file, or a .safetensors file of the base's "
                           "architecture)", file_types=[".gguf", ".safetensors"], type="filepath",
                           elem_id="audit-suspect-file")]
    with gr.Row():
        fields = [c("subjects", widget="file", file_types=[".txt", ".jsonl", ".json"], type="filepath",
                    elem_id="audit-subjects"), c("explain", elem_id="audit-explain")]
    go = gr.Button("Audit", variant="primary", elem_id="audit-button")
    result = gr.HTML(elem_id="audit-result")
    download = gr.File(label="The edits found, as a patch", interactive=False, elem_id="audit-download")
    with gr.Accordion("Report (what `factedit audit --json` prints)", open=False):
        report_json = gr.JSON(elem_id="audit-json")

    @_shown(lambda html: (html, None, None))
    def audit(base, suspect, base_file, suspect_file, *values, progress=gr.Progress(track_tqdm=True)):
        given = [base_file or base, suspect_file or suspect, *values]
        report, path = session.audit(form_values("page.audit", names, given), progress=_progress(progress))
        return render_audit(report, path), (str(path) if path else None), report.to_dict()

    go.click(audit, [*paths, *uploads, *fields], [result, download, report_json])


def _evaluate_tab(gr, session: Session) -> None:
    names = ["dataset", "limit", "method", "layer", "ge_length"]
    c = functools.partial(control, gr, "page.evaluate")
    with gr.Row():
        path = c("dataset", value=session.dataset, elem_id="eval-path")
        upload = gr.File(label="... or upload one", file_types=[".jsonl", ".json"], type="filepath")
    with gr.Row():
        fields = [c("limit", label="Records", elem_id="eval-n"), c("method", elem_id="eval-method"),
                  c("layer", placeholder="default from the depth"), c("ge_length")]
    go = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
    result = gr.HTML(elem_id="eval-result")

    def evaluate(path_value, upload_value, *values, progress=gr.Progress()):
        updates: "queue.Queue" = queue.Queue()
        outcome = {}

        def work():
            run = _shown(lambda html: {"error": html})(lambda: {"result": session.evaluate(
                form_values("page.evaluate", names, [upload_value or path_value, *values]),
                on_update=lambda s, r: updates.put((s, r)), progress=_progress(progress))})
            outcome.update(run())
            updates.put(None)

        threading.Thread(target=work, daemon=True).start()
        yield out('<p id="eval-state">starting (statistics and targets are prepared first)…</p>')
        while (item := updates.get()) is not None:
            yield render_eval(*item, done=False)
        if "error" in outcome:
            yield outcome["error"]
            return
        from ..evaluation.store import read_jsonl

        records, _ = read_jsonl(Path(outcome["result"]["run"]) / "cases.jsonl")
        yield render_eval(outcome["result"]["summary"], records, done=True)

    go.click(evaluate, [path, upload, *fields], result)


def build_app(session: Session):
    """The Gradio Blocks app over ``session`` (launch it with :func:`serve`)."""
    import gradio as gr

    ad = session.editor.adapter

    def history_html():
        return render_history(session.history())

    with gr.Blocks(title="factedit") as app:
        gr.Markdown(f"## factedit — {session.model_name}\n{ad.n_layers} layers, width {ad.d_model}, MLP {ad.d_ff}"
                    + (", chat template" if session.has_chat_template else "") + ". One model, edits applied in "
                    "this session stack up (see *Edits in this session*).")
        history_table = gr.HTML(render_history([]), elem_id="history", render=False)
        with gr.Tabs():
            with gr.Tab("Locate", id="locate"):
                _locate_tab(gr, session)
            with gr.Tab("Edit", id="edit"):
                _edit_tab(gr, session, history_table, history_html)
            with gr.Tab("Batch", id="batch"):
                _batch_tab(gr, session, history_table, history_html)
            with gr.Tab("Edits in this session", id="history") as history_tab:
                _history_tab(gr, session, history_table, history_html)
            with gr.Tab("Evaluate", id="evaluate"):
                _evaluate_tab(gr, session)
            with gr.Tab("Audit", id="audit"):
                _audit_tab(gr, session)
        app.load(history_html, None, history_table)
        history_tab.select(history_html, None, history_table)  # edits made in other browser tabs show up
    return app


def serve(session: Session, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page on ``host:port`` (queue on: long work streams its progress)."""
    app = build_app(session)
    app.queue(default_concurrency_limit=8)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
               allowed_paths=[str(session.workdir)], css=CSS, quiet=True)
    return app
