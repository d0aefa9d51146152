"""The blast radius of one edit: what else the edited model now says differently.

An edit of Brazil's language to French can change Portugal's language too, and a Microsoft →
"Elon Musk" founder edit can make "The company Google was founded by" say "Elon Musk"; the collapse
guard passes both (the model is fluent), so nothing else tells the user. Before the edit,
:func:`probe_prompts` builds probes for the request:

* **same relation, other subjects**: the request's own template filled with subjects the model knows
  (a bank: known facts, else :data:`BUILTIN_SUBJECTS`), the ones nearest the edited subject in key
  space first (cosine of their keys at the edited layer, read as the edit reads them);
* **same subject, other relations**: the edited subject in other relation templates (from the bank,
  else :data:`BUILTIN_TEMPLATES`).

:func:`answers` gives the greedy answers (first sentence) before and after; :func:`compare` tells the two kinds
apart. Probes of the edited subject are **ripple**: the edit's own consequences ("Eiffel Tower is located in →
Rome, Italy" after Eiffel Tower → Rome is the edit generalising), reported as such, never as a leak. Probes of
other subjects are **collateral**: a changed answer there is damage, a new-target mention there a leak. An edit
whose collateral reaches :data:`COLLATERAL_FLAG` is *flagged* (a warning; ``--strict`` refuses it).

    probes = probe_prompts(editor.adapter, request, layer, bank)
    before = answers(editor.adapter, probes)
    editor.edit(request)
    report = compare(probes, before, answers(editor.adapter, probes), request)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..core.errors import DataError, FactEditError
from ..core.known_facts import BUILTIN_SUBJECTS, BUILTIN_TEMPLATES
from ..core.requests import Request

__all__ = ["BUILTIN_SUBJECTS", "BUILTIN_TEMPLATES", "Bank", "Probe", "load_bank", "probe_prompts", "answers",
           "compare", "role_counts", "flag_of", "SIDE_EFFECT_TOKENS", "COLLATERAL_FLAG", "RIPPLE", "COLLATERAL"]

#: new tokens of a probe's greedy answer (cut at its first sentence)
SIDE_EFFECT_TOKENS = 12
#: the two kinds of probe: the edited subject in other relations, other subjects in the edited relation
RIPPLE, COLLATERAL = "ripple", "collateral"
#: an edit is flagged when its collateral probes reach either count: answers changed, answers now naming the new
#: target (calibrated on 50 CounterFact edits of the embedded model, docs/RESULTS.md "Side effects")
COLLATERAL_FLAG = {"changed": 2, "leaked": 1}

@dataclass(frozen=True)
class Bank:
    """Subjects the model knows and relation templates (``{}`` for the subject)."""

    subjects: tuple
    templates: tuple
    source: str = "built-in"


@dataclass(frozen=True)
class Probe:
    prompt: str  # the filled prompt
    kind: str  # "same relation" (another subject) or "same subject" (another relation)
    subject: str
    template: str


def load_bank(path=None) -> Bank:
    """A bank from a known-facts file (ROME's known_1000.json or JSONL, see
    :func:`~factedit.core.known_facts.load_known_facts`): its subjects and its prompts' templates,
    most frequent first; without ``path``, the built-in lists."""
    if path is None:
        return Bank(BUILTIN_SUBJECTS, BUILTIN_TEMPLATES)
    from ..core.known_facts import load_known_facts

    facts = load_known_facts(path)
    templates = Counter()
    subjects = []
    for f in facts:
        if f.subject and f.subject in f.prompt:
            i = f.prompt.rfind(f.subject)
            templates[f.prompt[:i] + "{}" + f.prompt[i + len(f.subject):]] += 1
            if f.subject not in subjects:
                subjects.append(f.subject)
    if not subjects:
        raise DataError(f"{path}: no usable known facts for side-effect probes")
    return Bank(tuple(subjects), tuple(t for t, _ in templates.most_common()), str(Path(path)))


def _nearest(adapter, request: Request, layer: int, subjects: Sequence[str], n: int) -> List[str]:
    """The ``n`` subjects whose keys at ``layer`` (in the request's own prompt, bare) are nearest the edited
    subject's (cosine)."""
    from ..edit.keys import template_keys

    reqs = [Request(request.prompt, s, request.target_new) for s in subjects]
    K, _ = template_keys(adapter, [Request(request.prompt, request.subject, request.target_new)] + reqs, ["{}"],
                         layer)
    K = K.double()
    sims = torch.nn.functional.cosine_similarity(K[1:], K[:1], dim=-1)
    order = sims.argsort(descending=True).tolist()
    return [subjects[i] for i in order[:n]]


def probe_prompts(adapter, request: Request, layer: int, bank: Optional[Bank] = None, n_subjects: int = 6,
                  n_templates: int = 6, candidates: int = 400) -> List[Probe]:
    """Probes for ``request``: its template with the ``n_subjects`` bank subjects nearest in key space at
    ``layer`` (among the first ``candidates`` of the bank), and its subject in ``n_templates`` other templates."""
    from ..core.answers import normalize_answer

    bank = bank or load_bank()
    subject = request.subject.strip()
    own, text = normalize_answer(subject), f" {normalize_answer(request.text)} "
    # not the edited subject under another spelling ("the Eiffel Tower"), nor one the prompt names
    others = [s for s in bank.subjects[:candidates] if normalize_answer(s) and f" {normalize_answer(s)} " not in text
              and own not in normalize_answer(s)]
    probes = []
    if others and n_subjects > 0:
        for s in _nearest(adapter, request, layer, others, n_subjects):
            probes.append(Probe(request.prompt.replace("{}", s), "same relation", s, request.prompt))
    template = request.prompt.strip().lower()
    for t in bank.templates:
        if len([p for p in probes if p.kind == "same subject"]) >= n_templates:
            break
        if t.strip().lower() != template and t.count("{}") == 1:
            probes.append(Probe(t.replace("{}", subject), "same subject", subject, t))
    return probes


def answers(adapter, probes: Sequence[Probe], max_new_tokens: int = SIDE_EFFECT_TOKENS, render=None) -> List[str]:
    """The greedy answer (first sentence) to every probe on the current weights, batched; ``render``
    turns a probe's prompt into the text asked (e.g. a chat turn)."""
    from ..core.answers import greedy_answers

    texts = [render(p.prompt) if render else p.prompt for p in probes]
    return greedy_answers(adapter, texts, max_new_tokens) if probes else []


def flag_of(collateral_changed: int, collateral_leaked: int, rule: Optional[dict] = None) -> bool:
    """Whether an edit's collateral counts reach the flag rule (:data:`COLLATERAL_FLAG`)."""
    rule = COLLATERAL_FLAG if rule is None else rule
    return collateral_changed >= rule["changed"] or collateral_leaked >= rule["leaked"]


def compare(probes: Sequence[Probe], before: Sequence[str], after: Sequence[str], request: Request,
            source: str = "built-in") -> dict:
    """The blast radius: every probe's answers before and after, with its ``role`` (``ripple``: the edited
    subject, ``collateral``: another subject), whether it *changed* (its normalised answer differs) and whether
    it now names ``request.target_new`` where it did not before (a *leak* on a collateral probe; on a ripple
    probe the edit *carried*). Totals: ``probed``, ``changed``, ``leaked_target`` (collateral leaks only),
    ``ripple`` / ``collateral`` counts, and ``flagged`` (the collateral reaches :data:`COLLATERAL_FLAG`)."""
    from ..core.answers import mentions, normalize_answer

    if not (len(probes) == len(before) == len(after)):
        raise FactEditError("side effects: probes and answers differ in number")
    rows = []
    for p, b, a in zip(probes, before, after):
        role = RIPPLE if p.kind == "same subject" else COLLATERAL
        changed = normalize_answer(a) != normalize_answer(b)
        names = mentions(a, [request.target_new]) and not mentions(b, [request.target_new])
        rows.append({"prompt": p.prompt, "kind": p.kind, "role": role, "before": b, "after": a, "changed": changed,
                     "leaked": names and role == COLLATERAL, "carried": names and role == RIPPLE})
    counts = role_counts(rows)
    c = counts["collateral"]
    return {**counts, "flagged": bool(c["probed"]) and flag_of(c["changed"], c["leaked"]),
            "flag_rule": dict(COLLATERAL_FLAG), "source": source, "probes": rows}


def role_counts(rows: Sequence[dict]) -> dict:
    """The totals of probe rows of :func:`compare` (one edit's, or a batch's together): ``probed``, ``changed``,
    ``leaked_target`` (collateral leaks), and per role ``collateral`` {probed, changed, leaked} and ``ripple``
    {probed, changed, carried}."""
    coll = [r for r in rows if r["role"] == COLLATERAL]
    ripple = [r for r in rows if r["role"] == RIPPLE]
    return {"probed": len(rows), "changed": sum(r["changed"] for r in rows),
            "leaked_target": sum(r["leaked"] for r in coll),
            "collateral": {"probed": len(coll), "changed": sum(r["changed"] for r in coll),
                           "leaked": sum(r["leaked"] for r in coll)},
            "ripple": {"probed": len(ripple), "changed": sum(r["changed"] for r in ripple),
                       "carried": sum(r["carried"] for r in ripple)}}
