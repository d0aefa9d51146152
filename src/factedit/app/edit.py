"""Editing as users do it, the same for ``factedit edit`` and the web page: one fact with the model
before and after (:func:`edit_fact`), a file of requests (:func:`edit_batch`), then what is kept and
written (:func:`refuse_unverified`, :func:`save_outputs`).

    result, report = edit_fact(editor, MethodOptions("r-rome"), EditSettings())    # the demo edit
    print(report.to_text())
    result, report = edit_batch(editor, MethodOptions("memit"), EditSettings(requests="reqs.jsonl"))

A single edit's report holds P(new) and P(true) on the request's prompt, the greedy continuations of
the prompt and its paraphrases, and, for a model with a chat template edited on the raw prompt, the
chat model's answer to the prompt as a user message (read without the prompt prefix, as a served chat
model sees it), and the blast radius (:mod:`factedit.app.side_effects`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..core.chat import chat_prompt, chat_request, has_chat_template
from ..core.errors import RequestError
from ..core.lm import probability, target_logprobs
from ..core.models import model_name
from ..core.requests import Request
from ..core.timing import phase
from ..edit.guard import GuardConfig
from ..edit.methods.options import MethodOptions
from .reads import Asks, Reads, read
from .reports import BatchReport, EditReport, RequestOutcome, Snapshot
from .settings import EditSettings
from .side_effects import answers, compare, load_bank, probe_prompts, role_counts

__all__ = ["DEMO", "DEFAULT_PARAPHRASES", "CHAT_ANSWER_TOKENS", "request_of", "edit_prompts", "report_asks",
           "snapshot_of", "edit_fact", "edit_batch", "efficacy", "probabilities", "refuse_unverified", "refuse_flagged",
           "flagged", "save_outputs"]

#: the demo edit (``factedit edit`` without a fact)
DEMO = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
#: rephrasings shown before/after when the user gives none
DEFAULT_PARAPHRASES = ("Fact: {prompt}", "Q: Where is {subject}? A: {prompt}")
#: new tokens of the chat answer shown beside a raw-prompt edit
CHAT_ANSWER_TOKENS = 24


def request_of(settings: EditSettings) -> Request:
    """The fact of ``settings``: its prompt (a template with ``{}`` or filled in), subject, target and true
    target; the demo edit when none is given."""
    given = [settings.prompt, settings.subject, settings.target]
    if all(x is None for x in given):
        return Request(DEMO.prompt, DEMO.subject, DEMO.target_new, settings.true or DEMO.target_true)
    missing = [n for n, x in zip(("prompt", "subject", "target"), given) if x is None]
    if missing:
        raise RequestError(f"the {missing[0]} is empty: give the prompt, subject and target together (or none of "
                           "them for the demo edit)")
    true = (settings.true or "").strip() or None
    if "{}" in settings.prompt:
        return Request(settings.prompt, settings.subject, settings.target, true)
    return Request.from_filled(settings.prompt, settings.subject, settings.target, true)


def edit_prompts(editor, request: Request, chat: bool = False, paraphrases: Optional[Sequence[str]] = None
                 ) -> Tuple[Request, List[str], List[str]]:
    """``(edited request, names, prompts)``: the request as edited (rendered as a chat turn with
    ``chat``), the prompt and paraphrases as the user wrote them, and the texts generated from (the
    chat renderings of those with ``chat``). Paraphrases default to :data:`DEFAULT_PARAPHRASES`."""
    paraphrases = list(paraphrases) if paraphrases else [
        p.format(prompt=request.text, subject=request.subject) for p in DEFAULT_PARAPHRASES]
    names = [request.text] + paraphrases
    if not chat:
        return request, names, list(names)
    return chat_request(editor.tokenizer, request), names, [chat_prompt(editor.tokenizer, p) for p in names]


def report_asks(editor, req: Request, prompts: Sequence[str], max_new_tokens: int, chat_of: Optional[str] = None,
                probes=(), render=None, guard: Optional[GuardConfig] = None) -> Asks:
    """What a single edit's report reads (:mod:`factedit.app.reads`): P(new) and P(true) on ``req``, the
    greedy continuations of ``prompts`` (the first is the request's own), with ``chat_of`` the chat model's
    answer to that text (rendered as a user turn, read without the prompt prefix), the answers to the
    blast-radius ``probes`` (``render``: how a probe's prompt is asked), and with ``guard`` the collapse
    guard's fluency probe when the editor's guard has none of the current weights yet."""
    from ..core.tokens import source_tokenizer
    from .side_effects import SIDE_EFFECT_TOKENS

    asks = Asks(pairs=[(req.text, req.target_new)] + ([(req.text, req.target_true)] if req.target_true else []))
    asks.continuations = [(f"prompt{i}", p, max_new_tokens, None) for i, p in enumerate(prompts)]
    if chat_of is not None:
        tok = source_tokenizer(editor.tokenizer)
        asks.continuations.append(("chat", chat_prompt(tok, chat_of), CHAT_ANSWER_TOKENS, tok))
    asks.answers = [(f"probe{i}", render(p.prompt) if render else p.prompt, SIDE_EFFECT_TOKENS)
                    for i, p in enumerate(probes)]
    wanted = editor.guard.wanted(guard) if guard is not None else None
    if wanted is not None:
        asks.tokens.append(("guard", *wanted))
    return asks


def snapshot_of(reads: Reads, n_prompts: int) -> Snapshot:
    """The :class:`~factedit.app.reports.Snapshot` in a read of :func:`report_asks`."""
    texts, probs = reads.texts, reads.probabilities
    return Snapshot(probs[0], probs[1] if len(probs) > 1 else None, texts["prompt0"],
                    [texts[f"prompt{i}"] for i in range(1, n_prompts)], texts.get("chat"))


def edit_fact(editor, options: MethodOptions, settings: EditSettings, config=None, bank=None) -> tuple:
    """Edit the fact of ``settings`` (:func:`request_of`) with ``options`` and return ``(result, report)``
    (:class:`~factedit.app.reports.EditReport`): the model before and after plus what the edit did and,
    with ``settings.side_effects``, its blast radius (probes of the same relation with other subjects of
    ``bank`` and of the same subject with other relations, answered before and after; also kept on
    ``result.side_effects`` and so in its patch). With ``settings.chat`` the fact is edited as a chat turn
    (``editor`` should read prompts without a prefix: the chat markup starts them). ``config``: the method's
    config when already made from ``options``. The edit stays applied (and in ``editor.history``) whether
    or not it took."""
    shown = request_of(settings)
    config = config or editor.make_config(options)
    chat = settings.chat
    if chat and not has_chat_template(editor.tokenizer):
        raise RequestError("this model's tokenizer has no chat template; edit without 'as a chat turn' (--chat)")
    req, names, prompts = edit_prompts(editor, shown, chat=chat, paraphrases=settings.paraphrases)
    chat_of = shown.text if not chat and has_chat_template(editor.tokenizer) else None
    probes, render = [], None
    if settings.side_effects:
        with phase("blast radius: choose probes"):
            bank = bank or load_bank(settings.bank_path)
            probes = probe_prompts(editor.adapter, shown, config.layers[0], bank)
        render = (lambda p: chat_prompt(editor.tokenizer, p)) if chat else None
    guard = GuardConfig(enabled=settings.guard)
    asks = report_asks(editor, req, prompts, settings.max_new_tokens, chat_of, probes, render,
                       guard if guard.enabled else None)
    with phase("read before (continuations, probes, guard probe)"):
        before = read(editor.adapter, asks)  # one batch: the report's rows and the guard's probe
    if "guard" in before.tokens:
        editor.guard.seed(guard, before.tokens["guard"])
    with phase("edit (Editor.edit)"):
        result = editor.edit(req, config=config, guard=guard)
    asks.tokens = []
    seen = result.verification[0] if result.verification else None
    # the probes' answers mostly hold: their before tokens are drafts, verified in one forward; the edited
    # fact's own continuations are meant to change, so drafting them would only widen that forward
    drafts = before.only("answers")
    with phase("read after (the probes' before answers as drafts)"):
        after = read(editor.adapter, asks, drafts=drafts, probabilities=None if seen is None else
                     [seen["p_new"]] + ([seen["p_true"]] if req.target_true else []))
    if settings.side_effects:
        n = len(probes)
        result.side_effects = compare(probes, [before.texts[f"probe{i}"] for i in range(n)],
                                      [after.texts[f"probe{i}"] for i in range(n)], shown, bank.source)
    before, after = snapshot_of(before, len(prompts)), snapshot_of(after, len(prompts))
    report = EditReport(
        result.method, model_name(editor.model), list(result.layers), shown, before, after, bool(chat),
        req if chat else None, result.config.layer_rule, result.verified, result.verification[0], result.retried,
        result.delta_norm, result.seconds, result.guard, result.rounding, result.statistics, result.prompt_prefix,
        dict(result.timings), result.side_effects, settings.side_effects, names,
        str(editor.adapter.w_out_parameter(result.layers[0]).dtype), wear=dict(result.wear),
        warnings=guard_warnings(result))
    return result, report


def probabilities(adapter, reqs: Sequence[Request]) -> List[dict]:
    """Per request P(new) and P(true) (``target_probabilities``: exp of the mean per-token log-likelihood),
    with the log-likelihoods themselves under ``lp_new`` / ``lp_true`` (what :func:`efficacy` compares)."""
    new = target_logprobs(adapter, [r.text for r in reqs], [r.target_new for r in reqs])
    known = [i for i, r in enumerate(reqs) if r.target_true]
    true = target_logprobs(adapter, [reqs[i].text for i in known], [reqs[i].target_true for i in known]) \
        if known else []
    out = [{"p_new": probability(lp), "p_true": None, "lp_new": lp, "lp_true": None} for lp in new]
    for i, lp in zip(known, true):
        out[i].update(p_true=probability(lp), lp_true=lp)
    return out


def efficacy(adapter, reqs: Sequence[Request], probs: Optional[List[dict]] = None) -> Optional[float]:
    """The share of the requests with a true target whose P(new) > P(true) (``None`` if none has one);
    from :func:`probabilities` of the same requests when given (their log-likelihoods are compared)."""
    probs = probs if probs is not None else probabilities(adapter, reqs)
    known = [p for p in probs if p["lp_true"] is not None]
    if not known:
        return None
    return sum(p["lp_new"] > p["lp_true"] for p in known) / len(known)


def edit_batch(editor, options: MethodOptions, settings: EditSettings, config=None, requests=None) -> tuple:
    """Edit the requests of ``settings.requests`` (its first ``limit``; ``requests``: that file already read)
    as one call of the method and return ``(result, report)`` (:class:`~factedit.app.reports.BatchReport`):
    efficacy before and after, and per request P(new)/P(true) before and after with its verification."""
    from ..core.request_files import load_requests

    if requests is None and not settings.requests:
        raise RequestError("choose a requests file first (--requests FILE)")
    reqs = list(requests) if requests is not None else load_requests(settings.requests, limit=settings.limit)
    config = config or editor.make_config(options)
    bank = load_bank(settings.bank_path) if settings.side_effects else None
    probes = batch_probes(editor, reqs, config.layers[0], bank) if bank is not None else None
    flat = [p for ps in probes or () for p in ps]
    before = answers(editor.adapter, flat)
    p_before = probabilities(editor.adapter, reqs)  # one read of the targets serves both
    eff_before = efficacy(editor.adapter, reqs, p_before)
    result = editor.edit(reqs, config=config, guard=GuardConfig(enabled=settings.guard))
    eff_after = efficacy(editor.adapter, reqs)
    if probes is not None:
        result.side_effects = batch_side_effects(reqs, probes, before, answers(editor.adapter, flat), bank.source)
    outcomes = [RequestOutcome(r.text, r.target_new, r.target_true, b["p_new"], b["p_true"], v)
                for r, b, v in zip(result.requests, p_before, result.verification)]
    report = BatchReport(result.method, model_name(editor.model), list(result.layers), result.config.layer_rule,
                         result.seconds, eff_after, eff_before, result.verified, outcomes, result.delta_norm,
                         dict(result.timings), result.rounding, result.statistics, result.prompt_prefix,
                         wear=dict(result.wear), warnings=guard_warnings(result), side_effects=result.side_effects)
    return result, report


#: a batch edit's blast radius probes each request with this many other subjects and other relations
BATCH_PROBES = {"subjects": 2, "templates": 2, "candidates": 100}


def batch_probes(editor, reqs: Sequence[Request], layer: int, bank) -> List[list]:
    """A sample of side-effect probes per request of a batch (:data:`BATCH_PROBES`: the 2 bank subjects nearest
    in key space among its first 100, and 2 other relations of the subject)."""
    return [probe_prompts(editor.adapter, r, layer, bank, BATCH_PROBES["subjects"], BATCH_PROBES["templates"],
                          BATCH_PROBES["candidates"]) for r in reqs]


def batch_side_effects(reqs: Sequence[Request], probes: Sequence[list], before: Sequence[str],
                       after: Sequence[str], source: str) -> dict:
    """The blast radius of a batch edit: each request's :func:`~factedit.app.side_effects.compare` over its sample
    of probes (``requests``), their collateral and ripple counts summed, ``flagged`` when one request is."""
    per, i = [], 0
    for r, ps in zip(reqs, probes):
        per.append({"request": r.text, "target_new": r.target_new,
                    **compare(ps, before[i: i + len(ps)], after[i: i + len(ps)], r, source)})
        i += len(ps)
    return {**role_counts([p for x in per for p in x["probes"]]), "flagged": any(x["flagged"] for x in per),
            "n_flagged": sum(x["flagged"] for x in per),
            "sample": dict(BATCH_PROBES), "source": source, "requests": per}


def guard_warnings(result) -> List[str]:
    """The collapse guard's wear warnings on ``result`` (none when the guard was off)."""
    return list((result.guard or {}).get("warnings", []))


def refuse_unverified(result, settings: EditSettings) -> None:
    """Raise :class:`~factedit.core.errors.UnverifiedEditError` (nothing was saved) when an edit did not
    take, unless ``settings.allow_unverified``."""
    from ..core.errors import UnverifiedEditError
    from ..edit.verify import VERIFY_MIN_P

    if result.verified is not False or settings.allow_unverified:
        return
    failed = [r for r, v in zip(result.requests, result.verification) if not v["verified"]]
    hint = ""
    if not result.prompt_prefix and any(r.prompt.startswith("{}") for r in failed):
        hint = (" A subject at the very start of a prompt read without a prompt prefix sits on the "
                "attention-sink position 0, where edits do not take: use --prompt-prefix auto.")
    raise UnverifiedEditError(
        f"{len(failed)} of {len(result.verification)} edits did not take on their own prompt (the new target is "
        f"neither the greedy continuation nor at P >= {VERIFY_MIN_P}, or the true target still wins"
        + (", even after the retry" if result.retried else "") + "); nothing was saved. Try another layer "
        "or more steps, or pass --allow-unverified to keep it." + hint)


def flagged(result, settings: EditSettings) -> bool:
    """Whether ``--strict`` refuses the edit: its blast radius was measured and flagged."""
    return bool(settings.strict and (result.side_effects or {}).get("flagged"))


def refuse_flagged(result, settings: EditSettings) -> None:
    """Raise :class:`~factedit.core.errors.FlaggedEditError` (nothing was saved) when ``settings.strict`` and the
    edit's blast radius was flagged."""
    from ..core.errors import FlaggedEditError

    if not flagged(result, settings):
        return
    c = result.side_effects["collateral"]
    raise FlaggedEditError(
        f"the edit changed what the model says about other subjects ({c['changed']} of {c['probed']} answers "
        f"changed, {c['leaked']} now naming the new target) and --strict refuses such edits; nothing was saved. "
        "Try another layer, or edit without --strict to keep it with a warning.")


def save_outputs(editor, result, settings: EditSettings) -> dict:
    """Write ``settings.save_patch`` / ``save_model`` (a saved model with its provenance and undo records, so
    that ``factedit revert`` gives the base back bit for bit), signed with ``sign_key`` when given; nothing
    for an edit that did not take (unless ``allow_unverified``). Returns ``{"patch": path, "saved_model":
    path, "signatures": [...]}`` of what was written."""
    out = {}
    if result.verified is False and not settings.allow_unverified or flagged(result, settings):
        return out
    from ..core.signing import sign
    from ..patch.files import Patch

    patch = Patch.from_result(result)
    signed = []
    if settings.save_patch:
        out["patch"] = str(patch.save(settings.save_patch))
        if settings.sign_key:
            signed.append(str(sign(out["patch"], settings.sign_key)))
    if settings.save_model:
        from ..core.models import save_model
        from ..patch.saved import undo_of_applied, with_applied, write_records

        undo = undo_of_applied(editor.adapter, patch, result.applied)
        records = with_applied({}, [], [patch], [out.get("patch") or "(the edit itself)"], undo)
        target = save_model(editor.model, editor.tokenizer, settings.save_model,
                            also=lambda folder: write_records(folder, *records))
        out["saved_model"] = str(target)
        if settings.sign_key:
            signed.append(str(sign(target, settings.sign_key)))
    if signed:
        out["signatures"] = signed
    return out
