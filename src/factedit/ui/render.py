"""HTML of what the page shows: an edit's report, a batch, the session's edits, a trace, an evaluation,
errors. Pure functions of the typed reports (:mod:`factedit.app.reports`) and the session's dicts; every
output carries a fresh sequence number (``data-seq``) so that a page script or a test sees it is new."""

from __future__ import annotations

import html
import itertools
from typing import List, Optional

from ..core.errors import FactEditError

__all__ = ["CSS", "out", "error", "ok", "table", "render_edit", "render_side_effects", "render_batch", "render_wear",
           "render_history", "render_trace", "render_eval", "result_message", "EVAL_KEYS"]

CSS = """
.fe-table {border-collapse: collapse; margin: 0.4em 0; font-size: 0.95em}
.fe-table th, .fe-table td {border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left}
.fe-table td.num {text-align: right; font-variant-numeric: tabular-nums}
.fe-ok {color: #1a7f37; font-weight: 600} .fe-bad {color: #b42318; font-weight: 600}
.fe-error {color: #b42318; font-weight: 600}
"""

_SEQ = itertools.count(1)


def out(body: str) -> str:
    """Every rendered output carries a fresh sequence number (a page script or test sees it is new)."""
    return f'<div class="fe-out" data-seq="{next(_SEQ)}">{body}</div>'


def _e(x) -> str:
    return html.escape(str(x))


def _p(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def error(e: BaseException) -> str:
    """An error as the page shows it: the message of one the user can fix, else its type too."""
    if isinstance(e, FactEditError):
        return out(f'<p class="fe-error" role="alert">Error: {_e(e)}</p>')
    return out(f'<p class="fe-error" role="alert">Internal error ({_e(type(e).__name__)}): {_e(e)}. The model is '
               "as it was before this action.</p>")


def ok(text: str) -> str:
    return out(f'<p class="fe-ok">{_e(text)}</p>')


def table(headers: List[str], rows: List[List[str]], table_id: str = "") -> str:
    """An HTML table; cells are already HTML (``<td>`` attributes may come in a ``(attrs, html)`` pair)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = ""
    for row in rows:
        cells = "".join(f"<td {c[0]}>{c[1]}</td>" if isinstance(c, tuple) else f"<td>{c}</td>" for c in row)
        body += f"<tr>{cells}</tr>"
    return f'<table class="fe-table" id="{table_id}">{head}<tbody>{body}</tbody></table>'


def result_message(report) -> str:
    """One line on whether an edit took and what happened to it."""
    if report.kept and report.verified:
        return "The edit took" + (" (after a retry)" if report.retried else "") + " and is applied."
    if report.kept:
        return "The edit did NOT take on its own prompt; it is applied because 'keep an edit that did not take' is on."
    if report.verified and (report.side_effects or {}).get("flagged"):
        return ("The edit took, but it changed what the model says about other subjects (see the side effects) and "
                "'refuse an edit that changes other subjects' answers' is on: it was reverted, the model is unchanged.")
    return ("The edit did NOT take on its own prompt (the new target is neither the greedy continuation nor likely "
            "enough, or the true target still wins); it was reverted: the model is unchanged. Try another layer, "
            "or keep it anyway.")


def _guard_text(g: Optional[dict]) -> str:
    if not g:
        return "off"
    return ("passed" if g["passed"] else "fired: " + "; ".join(g["fired"])) + (
        f" (generation entropy {g['entropy_before']:.2f} → {g['entropy_after']:.2f} bits"
        + "".join(f"; ‖Δ‖ limit of layer {k} {v:.3g}" for k, v in g.get("limits", {}).items()) + ")")


def render_edit(report) -> str:
    """An :class:`~factedit.app.reports.EditReport`: probabilities, continuations (prompt, paraphrases, chat
    answer), the decision and the blast radius."""
    r, b, a = report.request, report.before, report.after
    rows = [["P(new) " + _e(repr(r.target_new)), ('class="num" id="p-new-before"', _p(b.p_new)),
             ('class="num" id="p-new-after"', _p(a.p_new))]]
    if r.target_true:
        rows.append(["P(true) " + _e(repr(r.target_true)), ('class="num" id="p-true-before"', _p(b.p_true)),
                     ('class="num" id="p-true-after"', _p(a.p_true))])
    probs = table(["", "before", "after"], rows, "edit-probabilities")
    cont = table(["prompt", "before", "after"],
                 [[_e(p), ('class="gen-before"', _e(x.strip())), ('class="gen-after"', _e(y.strip()))]
                  for p, x, y in report.continuations()], "edit-continuations")
    took = '<span class="fe-ok">yes</span>' if report.verified else '<span class="fe-bad">NO</span>'
    facts = table([], [
        ["method", _e(report.method) + (" (as a chat turn)" if report.chat else "")],
        ["layer", _e(", ".join(map(str, report.layers))) + f" ({_e(report.layer_rule)})"],
        ["took (verified on its own prompt)", took + (" (after a retry)" if report.retried else "")],
        ["collapse guard", _e(_guard_text(report.guard))],
        ["‖Δ‖", ('class="num" id="delta-norm"', f"{report.delta_norm:.4f}")],
        ["seconds", ('class="num" id="edit-seconds"', f"{report.seconds:.1f}")],
    ] + ([["of which key statistics (computed once, then cached)", ('class="num"', f"{report.timings['stats']:.1f}")]]
         if report.timings.get("stats", 0) >= 0.5 else []), "edit-facts")
    kept = "fe-ok" if report.kept and report.verified else "fe-bad"
    return out(f'<p class="{kept}" id="edit-decision">{_e(result_message(report))}</p>' + probs + cont + facts
               + render_wear(report.wear, report.warnings) + render_side_effects(report.side_effects, r.target_new))


def render_wear(wear: dict, warnings=()) -> str:
    """The wear meter: per edited layer the update so far against the matrix, this edit against the earlier
    ones, and (projection methods) the null space left; then the collapse guard's wear warnings."""
    if not wear:
        return ""
    warned = "".join(f'<p class="fe-bad wear-warning">{_e(text)}</p>' for text in warnings)
    rows = [[_e(layer), ('class="num wear-relative"', f"{100 * w['relative']:.2f}%"),
             ('class="num"', f"{w['edit_norm']:.4f}"),
             ('class="num"', "first" if w.get("ratio") is None else f"{w['ratio']:.2f}× of {w['edits'] - 1}"),
             ('class="num"', "–" if w.get("room") is None else f"{w['room']} of {w['null_dims']}")]
            for layer, w in sorted(wear.items(), key=lambda kv: int(kv[0]))]
    return ('<p>Wear of the edited matrices since the history began:</p>'
            + table(["layer", "moved so far (of ‖W‖)", "this edit ‖Δ‖", "against the median of earlier edits",
                     "null space left"], rows, "wear") + warned)


def render_side_effects(fx: Optional[dict], target: str) -> str:
    """The blast radius: each probe's answer before and after, other subjects' (collateral) apart from the edited
    subject's other relations (ripple), the changed ones marked, and the flag's warning."""
    if not fx:
        return ""
    c, r = fx.get("collateral"), fx.get("ripple")
    if c is None:  # a report written before ripple and collateral were told apart
        head = (f'<p id="side-effects-summary">Side effects ({_e(fx["source"])} probes): <b>{fx["changed"]}</b> of '
                f'{fx["probed"]} answers changed.</p>')
    else:
        head = (f'<p id="side-effects-summary">Side effects ({_e(fx["source"])} probes). Other subjects '
                f'(collateral): <b>{c["changed"]}</b> of {c["probed"]} answers changed, <b>{c["leaked"]}</b> now name '
                f'{_e(repr(target))}. The edited subject in other relations (ripple): {r["changed"]} of {r["probed"]} '
                f'changed, {r["carried"]} now name it.</p>')
        if fx.get("flagged"):
            head += (f'<p class="fe-bad" id="side-effects-flag">Flagged: the edit changed what the model says about '
                     f'other subjects ({c["changed"]} changed, {c["leaked"]} naming {_e(repr(target))}). Check the '
                     'probes below, or edit at another layer.</p>')

    def mark(p):
        if p["leaked"]:
            return '<span class="fe-bad">leaked the target</span>'
        if p.get("carried"):
            return "carries the edit"
        return '<span class="fe-bad">changed</span>' if p["changed"] else "same"

    rows = [[_e(p.get("role", p["kind"])), _e(p["prompt"]), _e(p["before"]), _e(p["after"]), mark(p)]
            for p in fx["probes"]]
    return head + table(["probe", "prompt", "before", "after", ""], rows, "side-effects")


def render_batch(report) -> str:
    """A :class:`~factedit.app.reports.BatchReport`: efficacy before → after and a row per request."""
    eff, n = report.efficacy, len(report.requests)
    head = (f"<p>{n} requests, {_e(report.method)} at layers {_e(', '.join(map(str, report.layers)))} in "
            f"{report.seconds:.1f} s; took: {report.n_verified} of {n}; efficacy (P(new) > P(true)): "
            + ("n/a" if eff is None else f"{report.efficacy_before:.3f} → {eff:.3f}")
            + f"; ‖Δ‖ {report.delta_norm:.3f}</p>" + render_wear(report.wear, report.warnings))
    rows = [[_e(o.prompt), _e(o.target_new), ('class="num"', _p(o.p_new_before)), ('class="num"', _p(o.p_new)),
             ('class="num"', _p(o.p_true_before)), ('class="num"', _p(o.p_true)),
             '<span class="fe-ok">yes</span>' if o.verified else '<span class="fe-bad">no</span>']
            for o in report.requests]
    fx, tail = report.side_effects, ""
    if fx:
        c, r, k = fx["collateral"], fx["ripple"], fx["sample"]
        tail = (f'<p id="batch-side-effects">Side effects ({_e(fx["source"])} probes; per request {k["subjects"]} '
                f'other subjects and {k["templates"]} other relations): other subjects <b>{c["changed"]}</b> of '
                f'{c["probed"]} answers changed, <b>{c["leaked"]}</b> name their request\'s new target; the edited '
                f'subjects in other relations {r["changed"]} of {r["probed"]} changed, {r["carried"]} carry the edit. '
                f'<b>{fx["n_flagged"]}</b> of {n} requests flagged.</p>')
        flagged = [x for x in fx["requests"] if x["flagged"]]
        if flagged:
            tail += table(["flagged request", "new target", "other subjects' answers changed", "naming its target"],
                          [[_e(x["request"]), _e(x["target_new"]), ('class="num"', str(x["collateral"]["changed"])),
                            ('class="num"', str(x["collateral"]["leaked"]))] for x in flagged], "batch-flagged")
    return out(head + table(["prompt", "new target", "P(new) before", "P(new) after", "P(true) before",
                             "P(true) after", "took"], rows, "batch-table") + tail)


def render_history(rows: List[dict]) -> str:
    if not rows:
        return out('<p id="history-empty">No edits applied: the model has its original weights.</p>')
    return out(table(["#", "method", "layers", "facts", "‖Δ‖", "took"],
                     [[str(r["edit"]), _e(r["method"]), _e(r["layers"]), _e(r["facts"]),
                       ('class="num"', f"{r['delta_norm']:.4f}"),
                       {True: "yes", False: "no", None: "–"}[r["verified"]]] for r in rows], "history-table"))


def render_trace(obj: dict) -> str:
    rec = obj.get("recommended_layer")
    return out(f'<p id="trace-summary">Traced answer {_e(repr(obj["answer"]))}: P clean {obj["p_clean"]:.4f}, P with '
               f'the subject corrupted {obj["p_corrupt"]:.4f} ({obj["samples"]} noise samples, {obj["seconds"]} s).</p>'
               f'<p>Recommended edit layer (strongest MLP effect at the last subject token): '
               f'<b id="trace-layer">{_e(rec)}</b></p>')


EVAL_KEYS = ("n", "ES", "PS", "NS", "S", "gen_ES", "gen_PS", "gen_NS", "gen_leak", "GE")
#: what the Evaluate tab shows of each data set's runs: (summary columns, per-case columns, the answer shown)
EVAL_VIEWS = {
    "counterfact": (EVAL_KEYS, ("ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS"), "rewrite"),
    "zsre": (("n", "efficacy", "paraphrase", "specificity", "gen_ES", "gen_PS", "gen_NS"),
             ("efficacy", "paraphrase", "specificity", "gen_ES", "gen_PS", "gen_NS"), "rewrite"),
    "mquake": (("n", "edit_tf", "edit_gen", "instance_gen", "multihop_tf", "portability", "multihop_gen",
                "multihop_old", "base_multihop_gen", "base_multihop_new"),
               ("edit_tf", "edit_gen", "multihop_tf", "multihop_gen", "multihop_old", "base_multihop_gen"),
               "multihop"),
    "knowedit": (("n", "rewrite_acc", "rephrase_acc", "portability", "locality", "rewrite_gen", "portability_gen",
                  "locality_gen"), ("rewrite_acc", "portability", "locality", "rewrite_gen", "portability_gen"),
                 "rewrite"),
    "qaedit": (("n", "rewrite_gen", "rewrite_em", "rephrase_gen", "locality_gen", "rewrite_acc", "rephrase_acc",
                "locality"), ("rewrite_gen", "rewrite_em", "rephrase_gen", "locality_gen", "rewrite_acc"), "rewrite")}


def render_eval(summary: dict, records: List[dict], done: bool) -> str:
    def f(v):
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else _e(v))

    kind = records[0].get("kind", "counterfact") if records else "counterfact"
    keys, per_case, answer = EVAL_VIEWS.get(kind, EVAL_VIEWS["counterfact"])
    top = table([k.replace("_", "-") for k in keys], [[('class="num"', f(summary.get(k))) for k in keys]],
                "eval-summary")
    rows = [[str(r.get("case_id")), _e(r["request"]["prompt"].replace("{}", r["request"]["subject"])),
             _e(r["request"]["target_new"]), *(('class="num"', f(r.get(k))) for k in per_case),
             _e(((r.get("gen_texts") or {}).get(answer) or [""])[0]), _e(r.get("error", ""))] for r in records]
    state = "complete" if done else "running"
    mode = f' <span id="eval-mode">Mode: {_e(summary["mode"])}.</span>' if summary.get("mode") else ""
    return out(f'<p id="eval-state">{len(records)} cases scored ({state}).{mode}</p>' + top
               + table(["case", "prompt", "new target", *(k.replace("_", "-") for k in per_case), "greedy answer",
                        "error"], rows, "eval-cases"))


def render_audit(report, patch_path=None) -> str:
    """An :class:`~factedit.audit.AuditReport`: the verdict, the tensors' classes, each edit with its subjects,
    new and old objects and evidence prompts, the other changes."""
    c = report.counts()
    bad = report.verdict != "not edited"
    html = (f'<p class="{"fe-bad" if bad else "fe-ok"}" id="audit-verdict"><b>{_e(report.verdict)}</b></p>'
            f'<p id="audit-counts">{len(report.findings)} tensors: {c["identical"]} identical, {c["rounding"]} within '
            f'a format\'s rounding, {c["low_rank"]} low-rank updates, {c["dense"]} dense changes.</p>')
    for i, e in enumerate(report.edits, 1):
        html += (f'<h4>Edit {i}: W_out of layer{"s" if len(e.layers) > 1 else ""} '
                 f'{_e(", ".join(map(str, e.layers)))}, rank {e.rank}, ‖Δ‖ {e.norm:.4g}</h4>')
        x = e.explanation
        if x is None:
            continue
        html += table(["subject", "score"], [[_e(d["text"]), ('class="num"', f"{d['score']:.3f}")]
                                            for d in x.subjects[:10]], f"audit-subjects-{i}")
        if x.new_objects:
            html += (f'<p>Now says {_e(", ".join(repr(d["text"]) for d in x.new_objects[:3]))} instead of '
                     f'{_e(", ".join(repr(d["text"]) for d in x.old_objects[:3]))} (keys matched as '
                     f'{_e(x.hypothesis)}).</p>')
        html += table(["prompt", "base answers", "suspect answers"],
                      [[_e(ev["prompt"]), _e(ev["base"]), _e(ev["suspect"])] for ev in x.evidence[:12]],
                      f"audit-evidence-{i}")
    if report.other:
        html += "<p>Changes that are not edits:</p>" + table(
            ["tensor", "kind", "rank", "‖Δ‖/‖W‖"],
            [[_e(f.name), _e(f.kind), ('class="num"', "–" if f.rank is None else str(f.rank)),
              ('class="num"', f"{f.relative:.3g}")] for f in report.other[:30]], "audit-other")
    html += "".join(f"<p>{_e(n)}</p>" for n in report.notes)
    if patch_path:
        html += "<p>The edits as a patch are ready to download below (factedit revert takes them out).</p>"
    return out(html)
