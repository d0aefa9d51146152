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
from ..core.lm import greedy_continuation, probability, target_logprobs, target_probabilities
from ..core.models import model_name
from ..core.requests import Request
from ..edit.guard import GuardConfig
from ..edit.methods.options import MethodOptions
from .reports import BatchReport, EditReport, RequestOutcome, Snapshot
from .settings import EditSettings

__all__ = ["DEMO", "DEFAULT_PARAPHRASES", "CHAT_ANSWER_TOKENS", "request_of", "edit_prompts", "snapshot",
           "edit_fact", "edit_batch", "efficacy", "probabilities", "refuse_unverified", "save_outputs"]

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


def _chat_answer(adapter, text: str, max_new_tokens: int) -> str:
    """The chat model's answer to ``text`` as a user message, rendered and read without any prompt prefix."""
    from ..core.tokens import source_tokenizer

    tok = source_tokenizer(adapter.tokenizer)
    return greedy_continuation(adapter, chat_prompt(tok, text), max_new_tokens, tokenizer=tok)


def snapshot(adapter, req: Request, prompts: Sequence[str], max_new_tokens: int = 12,
             chat_answer_of: Optional[str] = None) -> Snapshot:
    """P(new) (and P(true)) on ``req`` and the greedy continuations of ``prompts`` (the first is the
    request's own); with ``chat_answer_of``, also the chat model's answer to that text."""
    p_new = target_probabilities(adapter, [req.text], [req.target_new])[0]
    p_true = target_probabilities(adapter, [req.text], [req.target_true])[0] if req.target_true else None
    gens = [greedy_continuation(adapter, p, max_new_tokens) for p in prompts]
    chat = _chat_answer(adapter, chat_answer_of, CHAT_ANSWER_TOKENS) if chat_answer_of is not None else None
    return Snapshot(p_new, p_true, gens[0], gens[1:], chat)


def edit_fact(editor, options: MethodOptions, settings: EditSettings, config=None, bank=None) -> tuple:
    """Edit the fact of ``settings`` (:func:`request_of`) with ``options`` and return ``(result, report)``
    (:class:`~factedit.app.reports.EditReport`): the model before and after plus what the edit did and,
    with ``settings.side_effects``, its blast radius (probes of the same relation with other subjects of
    ``bank`` and of the same subject with other relations, answered before and after; also kept on
    ``result.side_effects`` and so in its patch). With ``settings.chat`` the fact is edited as a chat turn
    (``editor`` should read prompts without a prefix: the chat markup starts them). ``config``: the method's
    config when already made from ``options``. The edit stays applied (and in ``editor.history``) whether
    or not it took."""
    from .side_effects import answers, compare, load_bank, probe_prompts

    shown = request_of(settings)
    config = config or editor.make_config(options)
    chat = settings.chat
    if chat and not has_chat_template(editor.tokenizer):
        raise RequestError("this model's tokenizer has no chat template; edit without 'as a chat turn' (--chat)")
    req, names, prompts = edit_prompts(editor, shown, chat=chat, paraphrases=settings.paraphrases)
    chat_of = shown.text if not chat and has_chat_template(editor.tokenizer) else None
    before = snapshot(editor.adapter, req, prompts, settings.max_new_tokens, chat_of)
    probes, probe_before, render = [], [], None
    if settings.side_effects:
        bank = bank or load_bank(settings.bank_path)
        probes = probe_prompts(editor.adapter, shown, config.layers[0], bank)
        render = (lambda p: chat_prompt(editor.tokenizer, p)) if chat else None
        probe_before = answers(editor.adapter, probes, render=render)
    result = editor.edit(req, config=config, guard=GuardConfig(enabled=settings.guard))
    after = snapshot(editor.adapter, req, prompts, settings.max_new_tokens, chat_of)
    if settings.side_effects:
        result.side_effects = compare(probes, probe_before, answers(editor.adapter, probes, render=render), shown,
                                      bank.source)
    report = EditReport(
        result.method, model_name(editor.model), list(result.layers), shown, before, after, bool(chat),
        req if chat else None, result.config.layer_rule, result.verified, result.verification[0], result.retried,
        result.delta_norm, result.seconds, result.guard, result.rounding, result.statistics, result.prompt_prefix,
        dict(result.timings), result.side_effects, settings.side_effects, names,
        str(editor.adapter.w_out_parameter(result.layers[0]).dtype))
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
    p_before = probabilities(editor.adapter, reqs)  # one read of the targets serves both
    eff_before = efficacy(editor.adapter, reqs, p_before)
    result = editor.edit(reqs, config=config, guard=GuardConfig(enabled=settings.guard))
    eff_after = efficacy(editor.adapter, reqs)
    outcomes = [RequestOutcome(r.text, r.target_new, r.target_true, b["p_new"], b["p_true"], v)
                for r, b, v in zip(result.requests, p_before, result.verification)]
    report = BatchReport(result.method, model_name(editor.model), list(result.layers), result.config.layer_rule,
                         result.seconds, eff_after, eff_before, result.verified, outcomes, result.delta_norm,
                         dict(result.timings), result.rounding, result.statistics, result.prompt_prefix)
    return result, report


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


def save_outputs(editor, result, settings: EditSettings) -> dict:
    """Write ``settings.save_patch`` / ``save_model`` (a saved model with its provenance and undo records, so
    that ``factedit revert`` gives the base back bit for bit), signed with ``sign_key`` when given; nothing
    for an edit that did not take (unless ``allow_unverified``). Returns ``{"patch": path, "saved_model":
    path, "signatures": [...]}`` of what was written."""
    out = {}
    if result.verified is False and not settings.allow_unverified:
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
