"""What an edit shows its user: the model before and after, as ``factedit edit`` prints it and
``factedit ui`` displays it (one implementation for both).

    req, shown, prompts = edit_prompts(editor, Request(...), chat=False)
    result, report = edit_report(editor, req, cfg, shown=shown, prompts=prompts)
    report["before"]["p_new"], report["after"]["generation"], report["verified"], report["delta_norm"]

    result, report = batch_report(editor, requests, cfg)   # per-request P(new)/P(true) before -> after

A single edit's report holds P(new) and P(true) on the request's prompt, the greedy continuations of
the prompt and its paraphrases, and, for a model with a chat template edited on the raw prompt, the
chat model's answer to the prompt as a user message (read without the prompt prefix, as a served chat
model sees it).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .core.chat import chat_prompt, chat_request, has_chat_template
from .core.lm import greedy_continuation, probability, target_logprobs, target_probabilities
from .core.models import model_name
from .core.requests import Request

__all__ = ["DEFAULT_PARAPHRASES", "CHAT_ANSWER_TOKENS", "edit_prompts", "snapshot", "edit_report", "batch_report",
           "efficacy"]

#: rephrasings shown before/after when the user gives none
DEFAULT_PARAPHRASES = ("Fact: {prompt}", "Q: Where is {subject}? A: {prompt}")
#: new tokens of the chat answer shown beside a raw-prompt edit
CHAT_ANSWER_TOKENS = 24


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
    from .core.tokens import source_tokenizer

    tok = source_tokenizer(adapter.tokenizer)
    return greedy_continuation(adapter, chat_prompt(tok, text), max_new_tokens, tokenizer=tok)


def snapshot(adapter, req: Request, prompts: Sequence[str], max_new_tokens: int = 12,
             chat_answer_of: Optional[str] = None) -> dict:
    """P(new) (and P(true)) on ``req`` and the greedy continuations of ``prompts`` (the first is the
    request's own); with ``chat_answer_of``, also the chat model's answer to that text."""
    snap = {"p_new": target_probabilities(adapter, [req.text], [req.target_new])[0]}
    if req.target_true:
        snap["p_true"] = target_probabilities(adapter, [req.text], [req.target_true])[0]
    gens = [greedy_continuation(adapter, p, max_new_tokens) for p in prompts]
    snap["generation"] = gens[0]
    snap["paraphrase_generations"] = gens[1:]
    if chat_answer_of is not None:
        snap["chat_answer"] = _chat_answer(adapter, chat_answer_of, CHAT_ANSWER_TOKENS)
    return snap


def edit_report(editor, req: Request, config, *, shown: Optional[Request] = None, prompts: Sequence[str] = (),
                chat: bool = False, guard=None, max_new_tokens: int = 12, side_effects: bool = True,
                bank=None) -> tuple:
    """Edit ``req`` with ``config`` and return ``(result, report)``: the model before and after plus what
    the edit did (layers, verification, guard, ‖Δ‖, seconds) and, with ``side_effects``, its blast radius
    (:mod:`factedit.side_effects`: probes of the same relation with other subjects of ``bank`` and of the
    same subject with other relations, answered before and after; also kept on ``result.side_effects``
    and so in its patch). ``shown`` is the request as the user wrote it (``req`` may be its chat
    rendering); ``prompts`` the texts whose continuations are shown (the first is ``req``'s own). The edit
    stays applied (and in ``editor.history``) whether or not it took."""
    from .side_effects import answers, compare, load_bank, probe_prompts

    shown = shown or req
    prompts = list(prompts) or [req.text]
    chat_of = shown.text if not chat and has_chat_template(editor.tokenizer) else None
    before = snapshot(editor.adapter, req, prompts, max_new_tokens, chat_of)
    probes, probe_before = [], []
    if side_effects:
        bank = bank or load_bank()
        probes = probe_prompts(editor.adapter, shown, config.resolved(editor.adapter).layers[0], bank)
        render = (lambda p: chat_prompt(editor.tokenizer, p)) if chat else None
        probe_before = answers(editor.adapter, probes, render=render)
    result = editor.edit(req, config=config, guard=guard)
    after = snapshot(editor.adapter, req, prompts, max_new_tokens, chat_of)
    if side_effects:
        result.side_effects = compare(probes, probe_before, answers(editor.adapter, probes, render=render),
                                         shown, bank.source)
    report = {
        "method": result.method, "model": model_name(editor.model), "layers": result.layers,
        "request": shown.to_dict(), "before": before, "after": after, "chat": bool(chat),
        **({"chat_request": req.to_dict()} if chat else {}),
        "layer_rule": result.config.layer_rule,
        "verified": result.verified, "verification": result.verification[0], "retried": result.retried,
        "delta_norm": result.delta_norm, "seconds": round(result.seconds, 3), "guard": result.guard,
        "rounding": result.rounding, "statistics": result.statistics, "prompt_prefix": result.prompt_prefix,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        **({"side_effects": result.side_effects} if side_effects else {}),
    }
    return result, report


def _probabilities(adapter, reqs: Sequence[Request]) -> List[dict]:
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


def efficacy(adapter, reqs: Sequence[Request], probabilities: Optional[List[dict]] = None) -> Optional[float]:
    """The share of the requests with a true target whose P(new) > P(true) (``None`` if none has one);
    from :func:`_probabilities` of the same requests when given (their log-likelihoods are compared)."""
    probs = probabilities if probabilities is not None else _probabilities(adapter, reqs)
    known = [p for p in probs if p["lp_true"] is not None]
    if not known:
        return None
    return sum(p["lp_new"] > p["lp_true"] for p in known) / len(known)


def batch_report(editor, reqs: Sequence[Request], config, guard=None) -> tuple:
    """Edit ``reqs`` as one call of ``config``'s method and return ``(result, report)``: efficacy before
    and after, and per request P(new)/P(true) before and after with its verification."""
    reqs = list(reqs)
    p_before = _probabilities(editor.adapter, reqs)  # one read of the targets serves both
    eff_before = efficacy(editor.adapter, reqs, p_before)
    result = editor.edit(reqs, config=config, guard=guard)
    eff_after = efficacy(editor.adapter, reqs)
    outcomes = [{"prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
                 "p_new_before": b["p_new"], "p_true_before": b["p_true"], **v}
                for r, b, v in zip(result.requests, p_before, result.verification)]
    report = {"method": result.method, "model": model_name(editor.model), "layers": result.layers,
              "layer_rule": result.config.layer_rule, "n_requests": len(reqs),
              "seconds": round(result.seconds, 3), "efficacy": eff_after, "efficacy_before": eff_before,
              "verified": result.verified, "n_verified": sum(o["verified"] for o in outcomes), "requests": outcomes,
              "delta_norm": result.delta_norm, "timings": {k: round(v, 3) for k, v in result.timings.items()},
              "rounding": result.rounding, "statistics": result.statistics, "prompt_prefix": result.prompt_prefix}
    return result, report
