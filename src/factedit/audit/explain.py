"""Explain an edit the audit found: which subject it rewrites, and what the model now says about it.

**Subjects.** A ROME-family update of W_out writes ``Δ = (v − W k*) (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*)``: its right factor
(the d_ff side) is ``r ∝ C⁻¹ k*``, with ``k*`` the subject's key at that layer and ``C`` the key statistics.
MEMIT, EMMET and AlphaEdit write ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹``: the row space of Δ is spanned by (nearly) ``C⁻¹ k_i``
of the batch's keys. Tools that leave ``C⁻¹`` out (a plain rank-one ``(v − W k) kᵀ / ‖k‖²``) write ``r ∝ k*``. So for
each candidate subject ``s`` with key ``k_s`` (the W_out input at its last token, read from the base) and the
update's right singular vectors ``R`` (d_ff × rank), two scores in the metric of ``C⁻¹`` (where keys are
decorrelated; both are 1 for a key in the span):

* with ``C⁻¹`` (ROME family): the share of ``k_s`` in ``span(C R)``:
  ``(Rᵀk)ᵀ (RᵀCR)⁻¹ (Rᵀk) / (kᵀC⁻¹k)``;
* without it: the share of ``k_s`` in ``span(R)``:
  ``(RᵀC⁻¹k)ᵀ (RᵀC⁻¹R)⁻¹ (RᵀC⁻¹k) / (kᵀC⁻¹k)``;

(square roots of those), averaged over the edit's layers; the hypothesis whose best candidate scores higher is
the one reported. ``C`` is the base model's statistics at the layer (the cached ones the editor uses: the same
corpus and token count give the same matrix); without statistics (``stats_tokens=0``) the metric is the
identity and the scores are plain cosines.

**What changed.** For the best candidates, the base model and the base with the found updates applied (the
suspect's edit, on one model in memory) answer the same prompts — the candidate's own prompt when the subjects
file has one, then relation templates (:data:`~factedit.core.known_facts.BUILTIN_TEMPLATES`); answers that differ
are the evidence, their suspect answers the new objects and their base answers the old ones. An answer's score is
its strongest piece of evidence: the largest, over the prompts that show it, of the subject's score times the
probability the model that gives the answer puts on its first token (teacher-forced: the suspect's for a new
object, the base's for an old one). An edit drives its new object's probability on its own prompt to near 1;
the answers it drags along on other relations ("the UK." for *lives in* after the mother tongue became English)
are less sure, and counting them once per prompt would let an answer several templates share outvote the edited
relation's (measured: a summed ranking named the new object first in 87 % of 140 single edits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..core.answers import greedy_answers, normalize_answer
from ..core.errors import DataError, FactEditError
from ..core.known_facts import BUILTIN_SUBJECTS, BUILTIN_TEMPLATES, load_known_facts
from ..core.lm import target_token_scores
from ..core.request_files import load_requests
from ..core.requests import Request
from ..edit.deltas import LayerDelta, apply_deltas
from ..edit.keys import template_keys

__all__ = ["Candidate", "load_candidates", "default_candidates", "subject_scores", "explain_edit", "Explanation",
           "explain_report", "rank_answers", "first_token_probabilities"]


@dataclass
class Candidate:
    """A subject the edit may be about, with the prompts ("{}" for the subject) the subjects file gave for it."""

    subject: str
    prompts: List[str] = field(default_factory=list)


def _add(out: Dict[str, Candidate], subject: str, prompt: Optional[str] = None) -> None:
    subject = subject.strip()
    if not subject:
        return
    c = out.setdefault(subject, Candidate(subject))
    if prompt and "{}" in prompt and prompt not in c.prompts:
        c.prompts.append(prompt)


def load_candidates(path) -> List[Candidate]:
    """Candidate subjects from a file: requests (JSONL / JSON: CounterFact, factedit requests), known facts
    (ROME's ``known_1000.json``), or plain text, one subject a line. Duplicates are merged (their prompts kept)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"subjects file not found: {p}")
    out: Dict[str, Candidate] = {}
    try:
        for r in load_requests(p):
            _add(out, r.subject, r.prompt)
        return list(out.values())
    except FactEditError:
        pass
    try:
        for f in load_known_facts(p):
            _add(out, f.subject, f.prompt.replace(f.subject, "{}", 1) if f.subject in f.prompt else None)
        return list(out.values())
    except FactEditError:
        pass
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read subjects file {p}: {e}") from None
    for line in text.splitlines():
        _add(out, line)
    if not out:
        raise DataError(f"{p}: no subjects (one a line, or a requests / known-facts file)")
    return list(out.values())


def default_candidates(tokenizer, limit: int = 5000) -> List[Candidate]:
    """Without a subjects file: the built-in subjects, then capitalised whole-word tokens of the vocabulary
    (names a model knows as one token), up to ``limit``."""
    out: Dict[str, Candidate] = {}
    for s in BUILTIN_SUBJECTS:
        _add(out, s)
    words = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if text.startswith(" ") and text[1:2].isupper() and text[1:].isalpha() and len(text) > 3:
            words.append(text.strip())
    for w in sorted(set(words)):
        if len(out) >= limit:
            break
        _add(out, w)
    return list(out.values())


def _chol(C: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of C with the smallest ridge that makes it positive definite."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    ridge = 0.0
    scale = float(C.diagonal().mean()) or 1.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(C + ridge * eye)
        if int(info) == 0:
            return L
        ridge = scale * 1e-8 if ridge == 0 else ridge * 100
    raise FactEditError("the key statistics are not positive definite, even with a ridge")


def _shares(K: torch.Tensor, R: torch.Tensor, C: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of K (n × d_ff): its share (0..1) in span(C R) and in span(R), in the metric of C⁻¹
    (the identity when C is None). R: d_ff × rank."""
    K, R = K.double(), R.double().to(K.device)
    if C is None:
        C = torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    C = C.double().to(K.device)
    L = _chol(C)
    CiK = torch.cholesky_solve(K.T, L)  # d_ff × n
    kCk = (K.T * CiK).sum(0).clamp_min(1e-300)
    a = R.T @ K.T  # rank × n
    with_c = (a * torch.linalg.solve(R.T @ C @ R, a)).sum(0) / kCk
    CiR = torch.cholesky_solve(R, L)
    b = R.T @ CiK
    without = (b * torch.linalg.solve(R.T @ CiR, b)).sum(0) / kCk
    return with_c.clamp(0, 1).sqrt(), without.clamp(0, 1).sqrt()


#: the generated context prefixes candidate keys are averaged over, as ``(tokens, count)`` (the editor's own
#: templates, cached per model; ROME averages k* over such prefixes); ``()``: the prompt alone, 6× cheaper
CONTEXTS = ()


def subject_scores(adapter, caches, layers: Sequence[int], rights: Sequence[torch.Tensor],
                   candidates: Sequence[Candidate], stats: Optional[dict] = None,
                   contexts: Sequence[Tuple[int, int]] = CONTEXTS) -> Tuple[torch.Tensor, str]:
    """Per candidate its score for an edit of W_out at ``layers`` whose right singular vectors (d_ff side) are
    ``rights``, averaged over the layers, and which hypothesis (``"C⁻¹k"`` or ``"k"``) the scores follow.
    A candidate's key is read at its subject's last token, in its first prompt when it has one (the tokens before
    the subject shape the key), after each context template (:data:`CONTEXTS`), and averaged.
    ``stats``: ``corpus``, ``n_tokens`` (``0``: no C), ``seq_len``, ``dtype`` of the key statistics."""
    stats = stats or {}
    reqs = [Request(c.prompts[0] if c.prompts else "{}", c.subject, "x") for c in candidates]
    templates = caches.templates(0, contexts) if contexts else ["{}"]
    with_c, without = 0.0, 0.0
    for layer, R in zip(layers, rights):
        K, _ = template_keys(adapter, reqs, templates, layer)
        C = None
        if stats.get("n_tokens", 100_000):
            C = caches.mom2(layer, stats.get("corpus"), stats.get("n_tokens", 100_000), stats.get("seq_len") or 256,
                            stats.get("dtype") or "float64")
        a, b = _shares(K, R, C)
        with_c, without = with_c + a, without + b
    with_c, without = with_c / len(layers), without / len(layers)
    return (with_c, "C⁻¹k") if float(with_c.max()) >= float(without.max()) else (without, "k")


@dataclass
class Explanation:
    hypothesis: str
    subjects: List[dict]
    new_objects: List[dict]
    old_objects: List[dict]
    evidence: List[dict]

    def to_dict(self) -> dict:
        return {"key_hypothesis": self.hypothesis, "subjects": self.subjects, "new_objects": self.new_objects,
                "old_objects": self.old_objects, "evidence": self.evidence}


def _ranked(weights: Dict[str, float]) -> List[dict]:
    return [{"text": t, "score": round(w, 4)} for t, w in sorted(weights.items(), key=lambda kv: -kv[1])]


def rank_answers(items: Sequence[Tuple[str, float, float]]) -> List[dict]:
    """Answers ranked by their strongest evidence: ``items`` are ``(answer, subject score, first-token
    probability)`` per prompt, an answer's score the largest ``subject score × probability`` among its prompts."""
    best: Dict[str, float] = {}
    for text, w, p in items:
        best[text] = max(best.get(text, 0.0), w * p)
    return _ranked(best)


def first_token_probabilities(adapter, prompts: Sequence[str], answers: Sequence[str]) -> List[float]:
    """Per prompt, the probability the model puts on its answer's first token, the answer text re-encoded
    after the prompt with a leading space (teacher-forced); ``0`` for an empty answer."""
    keep = [j for j, a in enumerate(answers) if a.strip()]
    out = [0.0] * len(prompts)
    scores = target_token_scores(adapter, [prompts[j] for j in keep], [answers[j] for j in keep]) if keep else []
    for j, (lp, _) in zip(keep, scores):
        out[j] = float(lp[0].exp())
    return out


def explain_edit(adapter, caches, layers: Sequence[int], deltas: Sequence[LayerDelta], rights: Sequence[torch.Tensor],
                 candidates: Sequence[Candidate], stats: Optional[dict] = None, top: int = 10,
                 probe: Optional[int] = None, max_new_tokens: int = 6,
                 contexts: Sequence[Tuple[int, int]] = CONTEXTS) -> Explanation:
    """Rank ``candidates`` for one edit and gather the evidence (see the module docstring). ``deltas``: the
    edit's updates of W_out (applied to the base for the suspect's answers, then taken off again); ``probe``:
    how many of the best candidates are asked (default: 5, or twice the update's rank up to 30)."""
    if probe is None:
        probe = min(30, max(5, 2 * max(int(r.shape[1]) for r in rights)))
    subjects = [c.subject for c in candidates]
    scores, hypothesis = subject_scores(adapter, caches, layers, rights, candidates, stats, contexts)
    order = torch.argsort(scores.cpu(), descending=True).tolist()
    ranked = [{"text": subjects[i], "score": round(float(scores[i]), 4)} for i in order[:top]]
    prompts, owners = [], []
    for rank, i in enumerate(order[:probe]):
        c = candidates[i]
        generic = [t for t in BUILTIN_TEMPLATES if t not in c.prompts] if rank < 2 or not c.prompts else []
        for t in list(c.prompts) + generic:
            prompts.append(t.format(c.subject))
            owners.append(i)
    before = greedy_answers(adapter, prompts, max_new_tokens)
    applied = apply_deltas(adapter, list(deltas))
    try:
        after = greedy_answers(adapter, prompts, max_new_tokens)
        changed = [j for j, (b, a) in enumerate(zip(before, after)) if normalize_answer(a) != normalize_answer(b)]
        p_new = first_token_probabilities(adapter, [prompts[j] for j in changed], [after[j] for j in changed])
    finally:
        applied.revert()
    p_old = first_token_probabilities(adapter, [prompts[j] for j in changed], [before[j] for j in changed])
    new, old, evidence = [], [], []
    for j, pn, po in zip(changed, p_new, p_old):
        i, w = owners[j], float(scores[owners[j]])
        new.append((after[j].strip(), w, pn))
        old.append((before[j].strip(), w, po))
        evidence.append({"subject": subjects[i], "prompt": prompts[j], "base": before[j].strip(),
                         "suspect": after[j].strip(), "subject_score": round(w, 4), "p_base": round(po, 4),
                         "p_suspect": round(pn, 4)})
    evidence.sort(key=lambda e: (-e["subject_score"], -e["p_suspect"]))
    return Explanation(hypothesis, ranked, rank_answers(new), rank_answers(old), evidence)


def explain_report(report, model, tokenizer, candidates: Optional[Sequence[Candidate]] = None,
                   stats: Optional[dict] = None, progress: bool = False, **kw) -> None:
    """Explain every edit of an :class:`~factedit.audit.compare.AuditReport` on the loaded base ``model``
    (``Edit.explanation`` is set). ``candidates``: default :func:`default_candidates`; ``stats``: ``corpus`` and
    ``n_tokens`` of the key statistics (default: the editor's defaults, the same cached matrices)."""
    from ..core.arch import ModelAdapter
    from ..edit.caches import EditCaches
    from ..edit.methods.base import default_stats_tokens
    from .extract import d_ff_basis, edit_deltas

    adapter = ModelAdapter(model, tokenizer)
    caches = EditCaches(adapter, progress=progress)
    stats = {"corpus": None, "n_tokens": None, **(stats or {})}
    if stats["n_tokens"] is None:
        stats["n_tokens"] = default_stats_tokens(adapter.d_ff)
    cands = list(candidates) if candidates else default_candidates(adapter.tokenizer)
    for e in report.edits:
        deltas = edit_deltas(report, e)
        e.explanation = explain_edit(adapter, caches, e.layers, deltas, d_ff_basis(deltas), cands, stats, **kw)
