"""The page of ``factedit ui``: Gradio components wired to a :class:`~factedit.ui.session.Session`.

Nothing here edits, traces or scores: every button calls one session method (which calls the same
library functions as the command line) and renders what it returns. A :class:`FactEditError` becomes
a readable message in the tab's status line; the server keeps running and the model is unchanged.
"""

from __future__ import annotations

import html
import itertools
import queue
import threading
from pathlib import Path
from typing import List, Optional

from ..core.errors import FactEditError
from .session import METHOD_CHOICES, Session, result_message

__all__ = ["build_app", "DEFAULT_DATASET"]

#: the CounterFact file the Evaluate tab offers when it exists (the shared data beside a checkout)
DEFAULT_DATASET = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "counterfact" / \
    "counterfact_knowedit.jsonl"

CSS = """
.fe-table {border-collapse: collapse; margin: 0.4em 0; font-size: 0.95em}
.fe-table th, .fe-table td {border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left}
.fe-table td.num {text-align: right; font-variant-numeric: tabular-nums}
.fe-ok {color: #1a7f37; font-weight: 600} .fe-bad {color: #b42318; font-weight: 600}
.fe-error {color: #b42318; font-weight: 600}
"""


_SEQ = itertools.count(1)


def _out(body: str) -> str:
    """Every rendered output carries a fresh sequence number (a page script or test sees it is new)."""
    return f'<div class="fe-out" data-seq="{next(_SEQ)}">{body}</div>'


def _e(x) -> str:
    return html.escape(str(x))


def _p(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def _error(e: BaseException) -> str:
    if isinstance(e, FactEditError):
        return _out(f'<p class="fe-error" role="alert">Error: {_e(e)}</p>')
    return _out(f'<p class="fe-error" role="alert">Internal error ({_e(type(e).__name__)}): {_e(e)}. The model is '
                "as it was before this action.</p>")


def _ok(text: str) -> str:
    return _out(f'<p class="fe-ok">{_e(text)}</p>')


def _table(headers: List[str], rows: List[List[str]], table_id: str = "") -> str:
    """An HTML table; cells are already HTML (``<td>`` attributes may come in a ``(attrs, html)`` pair)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = ""
    for row in rows:
        cells = "".join(f"<td {c[0]}>{c[1]}</td>" if isinstance(c, tuple) else f"<td>{c}</td>" for c in row)
        body += f"<tr>{cells}</tr>"
    return f'<table class="fe-table" id="{table_id}">{head}<tbody>{body}</tbody></table>'


def _progress(gr_progress):
    def report(fraction: Optional[float], message: str) -> None:
        gr_progress(0.0 if fraction is None else fraction, desc=message)
    return report


# ---------------------------------------------------------------------- renderers
def render_edit(report: dict) -> str:
    """The edit's before/after: probabilities, continuations (prompt and paraphrases), chat answer, decision."""
    r, b, a = report["request"], report["before"], report["after"]
    rows = [["P(new) " + _e(repr(r["target_new"])), ('class="num" id="p-new-before"', _p(b["p_new"])),
             ('class="num" id="p-new-after"', _p(a["p_new"]))]]
    if r.get("target_true"):
        rows.append(["P(true) " + _e(repr(r["target_true"])), ('class="num" id="p-true-before"', _p(b["p_true"])),
                     ('class="num" id="p-true-after"', _p(a["p_true"]))])
    probs = _table(["", "before", "after"], rows, "edit-probabilities")
    gens = [(report["prompts"][0], b["generation"], a["generation"])]
    gens += list(zip(report["prompts"][1:], b["paraphrase_generations"], a["paraphrase_generations"]))
    if "chat_answer" in a:
        gens.append(("as a chat turn: " + report["prompts"][0], b["chat_answer"], a["chat_answer"]))
    cont = _table(["prompt", "before", "after"],
                  [[_e(p), ('class="gen-before"', _e(x.strip())), ('class="gen-after"', _e(y.strip()))]
                   for p, x, y in gens], "edit-continuations")
    g = report.get("guard")
    guard = "off" if not g else ("passed" if g["passed"] else "fired: " + "; ".join(g["fired"])) + (
        f" (generation entropy {g['entropy_before']:.2f} → {g['entropy_after']:.2f} bits"
        + "".join(f"; ‖Δ‖ limit of layer {l} {v:.3g}" for l, v in g.get("limits", {}).items()) + ")")
    took = '<span class="fe-ok">yes</span>' if report["verified"] else '<span class="fe-bad">NO</span>'
    facts = _table([], [
        ["method", _e(report["method"]) + (" (as a chat turn)" if report.get("chat") else "")],
        ["layer", _e(", ".join(map(str, report["layers"]))) + f" ({_e(report['layer_rule'])})"],
        ["took (verified on its own prompt)", took + (" (after a retry)" if report.get("retried") else "")],
        ["collapse guard", _e(guard)],
        ["‖Δ‖", ('class="num" id="delta-norm"', f"{report['delta_norm']:.4f}")],
        ["seconds", ('class="num" id="edit-seconds"', f"{report['seconds']:.1f}")],
    ] + ([["of which key statistics (computed once, then cached)",
           ('class="num"', f"{report['timings']['stats']:.1f}")]]
         if report.get("timings", {}).get("stats", 0) >= 0.5 else []), "edit-facts")
    kept = "fe-ok" if report["kept"] and report["verified"] else "fe-bad"
    return _out(f'<p class="{kept}" id="edit-decision">{_e(result_message(report))}</p>' + probs + cont + facts
                + render_side_effects(report.get("side_effects"), r["target_new"]))


def render_side_effects(fx: Optional[dict], target: str) -> str:
    """The blast radius: each probe's answer before and after, the changed ones flagged."""
    if not fx:
        return ""
    head = (f'<p id="side-effects-summary">Side effects ({_e(fx["source"])} probes): <b>{fx["changed"]}</b> of '
            f'{fx["probed"]} answers changed, <b>{fx["leaked_target"]}</b> now name {_e(repr(target))}.</p>')
    rows = [[_e(p["kind"]), _e(p["prompt"]), _e(p["before"]), _e(p["after"]),
             '<span class="fe-bad">leaked the target</span>' if p["leaked"] else
             ('<span class="fe-bad">changed</span>' if p["changed"] else "same")] for p in fx["probes"]]
    return head + _table(["probe", "prompt", "before", "after", ""], rows, "side-effects")


def render_batch(report: dict) -> str:
    eff = report["efficacy"]
    head = (f"<p>{report['n_requests']} requests, {_e(report['method'])} at layers "
            f"{_e(', '.join(map(str, report['layers'])))} in {report['seconds']:.1f} s; took: "
            f"{report['n_verified']} of {report['n_requests']}; efficacy (P(new) > P(true)): "
            + ("n/a" if eff is None else f"{report['efficacy_before']:.3f} → {eff:.3f}")
            + f"; ‖Δ‖ {report['delta_norm']:.3f}</p>")
    rows = [[_e(o["prompt"]), _e(o["target_new"]), ('class="num"', _p(o["p_new_before"])),
             ('class="num"', _p(o["p_new"])), ('class="num"', _p(o["p_true_before"])), ('class="num"', _p(o["p_true"])),
             '<span class="fe-ok">yes</span>' if o["verified"] else '<span class="fe-bad">no</span>']
            for o in report["requests"]]
    return _out(head + _table(["prompt", "new target", "P(new) before", "P(new) after", "P(true) before",
                               "P(true) after", "took"], rows, "batch-table"))


def render_history(rows: List[dict]) -> str:
    if not rows:
        return _out('<p id="history-empty">No edits applied: the model has its original weights.</p>')
    return _out(_table(["#", "method", "layers", "facts", "‖Δ‖", "took"],
                  [[str(r["edit"]), _e(r["method"]), _e(r["layers"]), _e(r["facts"]),
                    ('class="num"', f"{r['delta_norm']:.4f}"),
                    {True: "yes", False: "no", None: "–"}[r["verified"]]] for r in rows], "history-table"))


def render_trace(obj: dict) -> str:
    rec = obj.get("recommended_layer")
    return _out(f'<p id="trace-summary">Traced answer {_e(repr(obj["answer"]))}: P clean {obj["p_clean"]:.4f}, P with the '
            f'subject corrupted {obj["p_corrupt"]:.4f} ({obj["samples"]} noise samples, {obj["seconds"]} s).</p>'
            f'<p>Recommended edit layer (strongest MLP effect at the last subject token): '
            f'<b id="trace-layer">{_e(rec)}</b></p>')


EVAL_KEYS = ("n", "ES", "PS", "NS", "S", "gen_ES", "gen_PS", "gen_NS", "gen_leak", "GE")


def render_eval(summary: dict, records: List[dict], done: bool) -> str:
    def f(v):
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else _e(v))

    top = _table([k.replace("_", "-") for k in EVAL_KEYS], [[('class="num"', f(summary.get(k))) for k in EVAL_KEYS]],
                 "eval-summary")
    per_case = ("ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS")
    rows = [[str(r.get("case_id")), _e(r["request"]["prompt"].replace("{}", r["request"]["subject"])),
             _e(r["request"]["target_new"]), *(('class="num"', f(r.get(k))) for k in per_case),
             _e(((r.get("gen_texts") or {}).get("rewrite") or [""])[0]), _e(r.get("error", ""))] for r in records]
    state = "complete" if done else "running"
    return _out(f'<p id="eval-state">{len(records)} cases scored ({state}).</p>' + top
                + _table(["case", "prompt", "new target", *(k.replace("_", "-") for k in per_case), "greedy answer",
                      "error"], rows, "eval-cases"))


# ---------------------------------------------------------------------- the page
def build_app(session: Session):
    """The Gradio Blocks app over ``session`` (launch it with :func:`factedit.ui.serve`)."""
    import gradio as gr

    ad = session.editor.adapter
    chat = session.has_chat_template

    def layer_hint(method: str) -> str:
        try:
            return f"default: {', '.join(map(str, session.default_layers(method)))} (from the depth)"
        except FactEditError as e:
            return str(e)

    with gr.Blocks(title="factedit") as app:
        gr.Markdown(f"## factedit — {session.model_name}\n{ad.n_layers} layers, width {ad.d_model}, "
                    f"MLP {ad.d_ff}" + (", chat template" if chat else "") + ". One model, edits applied "
                    "in this session stack up (see *Edits in this session*).")
        with gr.Tabs():
            # ---------------------------------------------------------- Locate
            with gr.Tab("Locate", id="locate"):
                with gr.Row():
                    t_prompt = gr.Textbox(label="Prompt (subject written in, or {} for it)",
                                          value="The Eiffel Tower is located in the city of", elem_id="trace-prompt")
                    t_subject = gr.Textbox(label="Subject", value="Eiffel Tower", elem_id="trace-subject")
                    t_answer = gr.Textbox(label="Answer to trace (optional; default the model's next token)",
                                          elem_id="trace-answer")
                t_samples = gr.Slider(1, 20, value=10, step=1, label="Noise samples")
                t_go = gr.Button("Trace", variant="primary", elem_id="trace-button")
                t_status = gr.HTML(elem_id="trace-status")
                with gr.Row():
                    t_imgs = [gr.Image(label=f"{k} (restored)", show_label=False, type="filepath", elem_id=f"trace-{k}")
                              for k in ("hidden", "mlp", "attn")]

                def do_trace(prompt, subject, answer, samples, progress=gr.Progress(track_tqdm=True)):
                    try:
                        obj = session.locate(prompt, subject, answer, int(samples), progress=_progress(progress))
                    except Exception as e:
                        return [_error(e)] + [gr.update()] * 3
                    return [render_trace(obj)] + [obj["images"][k] for k in ("hidden", "mlp", "attn")]

                t_go.click(do_trace, [t_prompt, t_subject, t_answer, t_samples], [t_status, *t_imgs])

            # ---------------------------------------------------------- Edit
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    e_prompt = gr.Textbox(label="Prompt (template with {} for the subject, or filled in)",
                                          value="{} is located in the city of", elem_id="edit-prompt")
                    e_subject = gr.Textbox(label="Subject", value="Eiffel Tower", elem_id="edit-subject")
                with gr.Row():
                    e_target = gr.Textbox(label="New target", value="Rome", elem_id="edit-target")
                    e_true = gr.Textbox(label="True target (optional)", value="Paris", elem_id="edit-true")
                with gr.Row():
                    e_method = gr.Dropdown(list(METHOD_CHOICES), value=METHOD_CHOICES[0], label="Method",
                                           elem_id="edit-method")
                    e_layer = gr.Textbox(label="Layer", placeholder=layer_hint(METHOD_CHOICES[0]), elem_id="edit-layer")
                e_para = gr.Textbox(label="Paraphrases to show (one per line; default two rephrasings)", lines=2,
                                    elem_id="edit-paraphrases")
                with gr.Row():
                    e_chat = gr.Checkbox(label="as a chat turn (edit the fact as the chat model sees it)", value=False,
                                         visible=chat, elem_id="edit-chat")
                    e_keep = gr.Checkbox(label="keep an edit that did not take", value=False, elem_id="edit-keep")
                    e_guard = gr.Checkbox(label="collapse guard", value=True, elem_id="edit-guard")
                    e_fx = gr.Checkbox(label="side effects (probe other subjects and relations)", value=True,
                                       elem_id="edit-side-effects")
                e_go = gr.Button("Edit", variant="primary", elem_id="edit-button")
                e_out = gr.HTML(elem_id="edit-result")
                with gr.Accordion("Report (what `factedit edit --json` prints)", open=False):
                    e_json = gr.JSON(elem_id="edit-json")
                e_method.change(lambda m: gr.update(placeholder=layer_hint(m)), e_method, e_layer)

            # ---------------------------------------------------------- Batch
            with gr.Tab("Batch", id="batch"):
                gr.Markdown("A requests file: JSONL or JSON, factedit's layout (prompt, subject, target_new, "
                            "target_true) or either CounterFact layout. Batch methods edit all at once; ROME "
                            "variants one after another.")
                with gr.Row():
                    b_file = gr.File(label="Requests file", file_types=[".jsonl", ".json"], type="filepath",
                                     elem_id="batch-file")
                    b_method = gr.Dropdown(list(METHOD_CHOICES), value="memit", label="Method", elem_id="batch-method")
                    b_layer = gr.Textbox(label="Layer (ROME variants, ft)", placeholder="default from the depth")
                    b_limit = gr.Number(label="Use the first N (empty: all)", value=None, precision=0)
                    b_guard = gr.Checkbox(label="collapse guard", value=True)
                b_go = gr.Button("Edit all", variant="primary", elem_id="batch-button")
                b_out = gr.HTML(elem_id="batch-result")

            # ---------------------------------------------------------- History
            with gr.Tab("Edits in this session", id="history") as h_tab:
                h_table = gr.HTML(render_history([]), elem_id="history")
                h_status = gr.HTML(elem_id="history-status")
                with gr.Row():
                    h_num = gr.Number(label="Edit #", value=1, precision=0, elem_id="history-number")
                    h_inspect = gr.Button("Inspect", elem_id="inspect-button")
                    h_patch = gr.Button("Download as patch", elem_id="download-patch-button")
                    h_n = gr.Number(label="Revert the last N", value=1, precision=0, elem_id="revert-n")
                    h_revert = gr.Button("Revert", variant="stop", elem_id="revert-button")
                with gr.Row():
                    h_peft = gr.Button("Download all as a PEFT LoRA adapter (.zip)", elem_id="download-peft-button")
                    h_vllm = gr.Checkbox(label="vLLM variant", value=False)
                h_file = gr.File(label="Download", interactive=False, elem_id="history-download")
                h_info = gr.JSON(label="Inspect", elem_id="history-inspect")
                with gr.Row():
                    h_upload = gr.File(label="Upload a patch to apply", file_types=[".safetensors"], type="filepath",
                                       elem_id="upload-patch")
                    h_force = gr.Checkbox(label="apply even if the base fingerprints differ", value=False)
                    h_apply = gr.Button("Apply patch", elem_id="apply-patch-button")

            # ---------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    v_path = gr.Textbox(label="CounterFact / zsRE file (path on the server)",
                                        value=str(DEFAULT_DATASET) if DEFAULT_DATASET.is_file() else "",
                                        elem_id="eval-path")
                    v_file = gr.File(label="... or upload one", file_types=[".jsonl", ".json"], type="filepath")
                with gr.Row():
                    v_n = gr.Number(label="Records", value=10, precision=0, elem_id="eval-n")
                    v_method = gr.Dropdown(list(METHOD_CHOICES), value=METHOD_CHOICES[0], label="Method",
                                           elem_id="eval-method")
                    v_layer = gr.Textbox(label="Layer", placeholder="default from the depth")
                    v_ge = gr.Checkbox(label="generation entropy (GE; slower)", value=False)
                v_go = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
                v_out = gr.HTML(elem_id="eval-result")

        # -------------------------------------------------------------- handlers
        def history_html():
            return render_history(session.history())

        def do_edit(prompt, subject, target, true, method, layer, para, as_chat, keep, guard, fx,
                    progress=gr.Progress(track_tqdm=True)):
            try:
                report = session.edit(prompt, subject, target, true, method, layer, (para or "").splitlines(),
                                      chat=bool(as_chat), keep_unverified=bool(keep), guard=bool(guard),
                                      side_effects=bool(fx), progress=_progress(progress))
            except Exception as e:
                return _error(e), gr.update(), history_html()
            return render_edit(report), report, history_html()

        e_go.click(do_edit, [e_prompt, e_subject, e_target, e_true, e_method, e_layer, e_para, e_chat, e_keep,
                             e_guard, e_fx], [e_out, e_json, h_table])

        def do_batch(path, method, layer, limit, guard, progress=gr.Progress(track_tqdm=True)):
            try:
                report = session.batch(path, method, layer, limit, bool(guard), progress=_progress(progress))
            except Exception as e:
                return _error(e), history_html()
            return render_batch(report), history_html()

        b_go.click(do_batch, [b_file, b_method, b_layer, b_limit, b_guard], [b_out, h_table])

        def do_inspect(number):
            try:
                return "", session.inspect(number)
            except Exception as e:
                return _error(e), None

        def do_patch(number):
            try:
                path = session.download_patch(number)
            except Exception as e:
                return _error(e), None
            return _ok(f"edit {int(number)} written as {Path(path).name}"), path

        def do_peft(vllm, progress=gr.Progress()):
            try:
                path = session.download_peft(bool(vllm), progress=_progress(progress))
            except Exception as e:
                return _error(e), None
            return _ok("all edits of the session written as one LoRA adapter"), path

        def do_revert(n, progress=gr.Progress()):
            try:
                left = session.revert(n, progress=_progress(progress))
            except Exception as e:
                return _error(e), history_html()
            return _ok(f"reverted; {left} edit(s) remain" + ("" if left else ": the model has its original weights")), \
                history_html()

        def do_apply(path, force, progress=gr.Progress()):
            try:  # the upload field is emptied either way, ready for the next file
                info = session.upload_patch(path, bool(force), progress=_progress(progress))
            except Exception as e:
                return _error(e), history_html(), None
            return _ok(f"applied a {info['method']} patch of layers {info['layers']}"
                       + (" (forced: base fingerprints differed)" if info.get("forced") else "")), history_html(), None

        h_inspect.click(do_inspect, h_num, [h_status, h_info])
        h_patch.click(do_patch, h_num, [h_status, h_file])
        h_peft.click(do_peft, h_vllm, [h_status, h_file])
        h_revert.click(do_revert, h_n, [h_status, h_table])
        h_apply.click(do_apply, [h_upload, h_force], [h_status, h_table, h_upload])

        def do_eval(path, upload, n, method, layer, ge, progress=gr.Progress()):
            updates: "queue.Queue" = queue.Queue()
            outcome = {}

            def work():
                try:
                    outcome["result"] = session.evaluate(upload or (path or "").strip(), n, method, layer, bool(ge),
                                                         on_update=lambda s, r: updates.put((s, r)),
                                                         progress=_progress(progress))
                except Exception as e:  # shown on the page
                    outcome["error"] = e
                finally:
                    updates.put(None)

            threading.Thread(target=work, daemon=True).start()
            yield _out('<p id="eval-state">starting (statistics and targets are prepared first)…</p>')
            while True:
                item = updates.get()
                if item is None:
                    break
                yield render_eval(*item, done=False)
            if "error" in outcome:
                yield _error(outcome["error"])
                return
            from ..evaluation.store import read_jsonl

            records, _ = read_jsonl(Path(outcome["result"]["run"]) / "cases.jsonl")
            yield render_eval(outcome["result"]["summary"], records, done=True)

        v_go.click(do_eval, [v_path, v_file, v_n, v_method, v_layer, v_ge], v_out)
        app.load(history_html, None, h_table)
        h_tab.select(history_html, None, h_table)  # edits made in other browser tabs show up
    return app


def serve(session: Session, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page on ``host:port`` (queue on: long work streams its progress)."""
    app = build_app(session)
    app.queue(default_concurrency_limit=8)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
               allowed_paths=[str(session.workdir)], css=CSS, quiet=True)
    return app
