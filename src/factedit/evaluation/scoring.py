"""Pure metric functions (docs/ALGORITHMS.md §9). No model here: inputs are log-probabilities,
top-1 hits, token lists, update matrices.

A target's score is its mean per-token log-likelihood under teacher forcing (target prefixed by
a space), so ``P = exp(mean log p)``, the per-token geometric mean, as in ROME's code.

**Ties count as failures in both directions**: a rewrite/paraphrase prompt succeeds only if
``P(o*) > P(o_c)`` strictly, a neighbourhood prompt only if ``P(o_c) > P(o*)`` strictly (ROME
compares NLLs with the same strict inequalities).
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..core.answers import first_sentence, mentions, normalize_answer
from ..core.metrics import generation_entropy

__all__ = ["Pair", "success_rate", "magnitude", "counterfact_case", "harmonic_mean", "token_accuracy",
           "word_tokens", "text_entropy", "normalized_delta_norm", "outliers", "mean_or_none", "summarize_records",
           "SUCCESS_KEYS", "COUNTERFACT_KEYS", "ZSRE_KEYS", "GEN_KEYS", "normalize_answer", "first_sentence",
           "mentions", "generation_case", "MQUAKE_KEYS", "answer_side", "mquake_case", "KNOWEDIT_KEYS",
           "knowedit_case"]

#: (log P(o*), log P(o_c)) of one prompt: mean per-token log-likelihoods
Pair = Tuple[float, float]

COUNTERFACT_KEYS = ("ES", "PS", "NS", "EM", "PM", "NM", "GE")
ZSRE_KEYS = ("efficacy", "paraphrase", "specificity")
#: MQuAKE's per-case scores (fractions; × 100 in summaries): teacher-forced, then generation-based, then the
#: unedited model's (``base_``), see :func:`mquake_case`
MQUAKE_KEYS = ("edit_tf", "multihop_tf", "multihop_tf_q", "portability",
               "edit_gen", "edit_gen_q", "instance_gen", "multihop_gen", "multihop_gen_q", "multihop_old",
               "base_multihop_tf", "base_multihop_gen", "base_multihop_new", "base_instance_gen")


def success_rate(pairs: Sequence[Pair], new_wins: bool = True) -> Optional[float]:
    """Fraction of prompts where o* beats o_c (``new_wins``) or o_c beats o* (neighbourhood);
    strict, so a tie is a failure either way. ``None`` for no prompts."""
    if not pairs:
        return None
    return sum((a > b) if new_wins else (b > a) for a, b in pairs) / len(pairs)


def magnitude(pairs: Sequence[Pair], new_minus_true: bool = True) -> Optional[float]:
    """Mean of ``P(o*) − P(o_c)`` (or ``P(o_c) − P(o*)``) with ``P = exp(mean log p)``."""
    if not pairs:
        return None
    diffs = [math.exp(a) - math.exp(b) for a, b in pairs]
    return sum(d if new_minus_true else -d for d in diffs) / len(diffs)


def counterfact_case(rewrite: Sequence[Pair], paraphrase: Sequence[Pair],
                     neighborhood: Sequence[Pair]) -> Dict[str, Optional[float]]:
    """ES/PS/NS (fractions) and EM/PM/NM (probability differences) of one case."""
    return {"ES": success_rate(rewrite), "PS": success_rate(paraphrase), "NS": success_rate(neighborhood, False),
            "EM": magnitude(rewrite), "PM": magnitude(paraphrase), "NM": magnitude(neighborhood, False)}


def harmonic_mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Harmonic mean (ROME's score S); 0 if any value is 0, ``None`` if any is missing."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1 / v for v in vals)


def token_accuracy(hits: Sequence[bool]) -> float:
    """zsRE: fraction of target tokens that are the top-1 prediction under teacher forcing."""
    if not len(hits):
        raise ValueError("no target tokens")
    return sum(bool(h) for h in hits) / len(hits)


_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokens(text: str) -> List[str]:
    """Words and punctuation marks (close to NLTK's ``word_tokenize``, which ROME's GE uses)."""
    return _WORD.findall(text)


def text_entropy(texts: Sequence[str]) -> Optional[float]:
    """ROME's GE of a case: mean over texts of the weighted bi/trigram entropy of its words (bits)."""
    if not texts:
        return None
    return sum(generation_entropy(word_tokens(t)) for t in texts) / len(texts)


def normalized_delta_norm(deltas) -> Tuple[float, float]:
    """``(‖Δ‖_F / numel(Δ), ‖Δ‖_F)`` of an edit, r-ROME's normalised norm. Deltas of the same layer are
    summed first; over several layers the squared norms add up and so do the element counts."""
    import torch

    by_layer: Dict[int, "torch.Tensor"] = {}
    for d in deltas:
        m = d.dense().double()
        by_layer[d.layer] = by_layer[d.layer] + m if d.layer in by_layer else m
    if not by_layer:
        return 0.0, 0.0
    fro = math.sqrt(sum(float((m ** 2).sum()) for m in by_layer.values()))
    return fro / sum(m.numel() for m in by_layer.values()), fro


def outliers(values: Sequence[float], factor: float = 10.0) -> List[int]:
    """Indices of values above ``factor`` × the median (disabling edits have ‖Δ‖ orders of magnitude off)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return []
    med = statistics.median(finite)
    return [i for i, v in enumerate(values) if v is not None and (not math.isfinite(v) or v > factor * med)]


# ---------------------------------------------------------------------- rates of flags
def _rate(flags) -> Optional[float]:
    """The share of true flags, ``None`` for no flags."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def _any_of(flags) -> Optional[float]:
    """1.0 when some flag holds, 0.0 when none does, ``None`` for no flags (MQuAKE's any-of-the-questions rule)."""
    flags = list(flags)
    return float(any(flags)) if flags else None


def _all_of(flags) -> Optional[float]:
    """1.0 when every flag holds, 0.0 when one does not, ``None`` for no flags."""
    flags = list(flags)
    return float(all(flags)) if flags else None


# ---------------------------------------------------------------------- generation-based scores
#: per-case generation-based scores (fractions; × 100 in summaries)
GEN_KEYS = ("gen_ES", "gen_PS", "gen_NS", "gen_leak")

def generation_case(rewrite: Sequence[str], paraphrase: Sequence[str], neighborhood: Sequence[str],
                    neighborhood_unedited: Sequence[str], new: Sequence[str], true: Sequence[str] = ()
                    ) -> Dict[str, Optional[float]]:
    """Generation-based scores of one case from greedy texts (each already cut by :func:`first_sentence`):

    * ``gen_ES`` / ``gen_PS``: the fraction of rewrite / paraphrase generations that mention the new
      target (or one of its aliases, ``new``) and not the true one (``true``; none for zsRE);
    * ``gen_NS``: the fraction of neighbourhood generations equal, after :func:`normalize_answer`, to
      the unedited model's generation of the same prompt;
    * ``gen_leak``: the fraction of neighbourhood generations that mention the new target where the
      unedited model's did not.
    """
    def hit(t: str) -> bool:
        return mentions(t, new) and not (true and mentions(t, true))

    if len(neighborhood) != len(neighborhood_unedited):
        raise ValueError("neighbourhood generations and their unedited counterparts differ in number")
    pairs = list(zip(neighborhood, neighborhood_unedited))
    return {"gen_ES": _rate(hit(t) for t in rewrite), "gen_PS": _rate(hit(t) for t in paraphrase),
            "gen_NS": _rate(normalize_answer(a) == normalize_answer(b) for a, b in pairs),
            "gen_leak": _rate(mentions(a, new) and not mentions(b, new) for a, b in pairs)}


def _kind_has(records: Sequence[dict], key: str) -> bool:
    """Whether the records' dataset kind scores ``key`` (used when no case was scored at all)."""
    kinds = {r.get("kind", "counterfact") for r in records}
    return key in {"zsre": ZSRE_KEYS, "mquake": MQUAKE_KEYS, "knowedit": KNOWEDIT_KEYS, "qaedit": KNOWEDIT_KEYS}.get(
        next(iter(kinds)), COUNTERFACT_KEYS) \
        if len(kinds) == 1 else key in COUNTERFACT_KEYS


def mean_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


#: the KnowEdit benchmark's per-case scores (EasyEdit's Edit Succ. / Portability / Locality and their parts;
#: generation-based ones beside them), see :func:`knowedit_case`
KNOWEDIT_KEYS = ("rewrite_acc", "rephrase_acc", "portability", "locality", "rewrite_gen", "rephrase_gen",
                 "rewrite_em", "rephrase_em", "portability_gen", "locality_gen", "portability_subject_aliasing",
                 "portability_reasoning", "portability_logical_generalization", "locality_relation_specificity",
                 "locality_forgetfulness")

#: scores that are rates of success: a case whose edit failed with an error counts 0 in each
SUCCESS_KEYS = ("ES", "PS", "NS", "efficacy", "paraphrase", "specificity", "gen_ES", "gen_PS", "gen_NS",
                "edit_tf", "multihop_tf", "multihop_tf_q", "portability", "edit_gen", "edit_gen_q", "instance_gen",
                "multihop_gen", "multihop_gen_q", "rewrite_acc", "rephrase_acc", "rewrite_gen", "rephrase_gen",
                "rewrite_em", "rephrase_em", "portability_gen", "portability_subject_aliasing", "portability_reasoning",
                "portability_logical_generalization")


def summarize_records(records: Sequence[dict]) -> Dict[str, Optional[float]]:
    """Run-level scores from per-case records: means over cases, scores and magnitudes × 100
    (percent / percentage points), GE × 100 as in ROME's tables, S the harmonic mean of ES, PS, NS.

    A case whose edit raised (``"error"`` in its record) is a failure: it counts in ``n`` and in
    ``errors`` and scores 0 in every success rate (:data:`SUCCESS_KEYS`, hence in S). The magnitudes
    (EM/PM/NM), GE and the update norms describe edits that were made, so they average over those.
    """
    ok = [r for r in records if "error" not in r]
    errors = len(records) - len(ok)
    out: Dict[str, Optional[float]] = {"n": len(records), "errors": errors}
    for k in COUNTERFACT_KEYS + ZSRE_KEYS + GEN_KEYS + tuple(dict.fromkeys(MQUAKE_KEYS + KNOWEDIT_KEYS)):
        vals = [r.get(k) for r in ok]
        has = any(v is not None for v in vals) or (k not in GEN_KEYS and _kind_has(records, k))
        if k in SUCCESS_KEYS and errors and has:
            vals += [0.0] * errors
        m = mean_or_none(vals)
        out[k] = None if m is None else 100 * m
    out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    out["gen_S"] = harmonic_mean([out["gen_ES"], out["gen_PS"], out["gen_NS"]])
    for k in ("ES", "PS", "NS"):  # how much the teacher-forced score flatters the generated one (points)
        out[f"gap_{k}"] = None if out[k] is None or out[f"gen_{k}"] is None else out[k] - out[f"gen_{k}"]
    checked = [r["verified"] for r in ok if r.get("verified") is not None]
    # edits that took on their own prompt (docs/ALGORITHMS.md §12), percent of all cases (errors fail)
    out["verified"] = 100 * sum(checked) / (len(checked) + errors) if checked else None
    norms = [r["delta_norm"] for r in ok if r.get("delta_norm") is not None]
    out["delta_norm_median"] = statistics.median(norms) if norms else None
    out["delta_norm_max"] = max(norms) if norms else None
    out["disabling"] = len(outliers(norms)) if norms else 0
    return out


# ---------------------------------------------------------------------- multi-hop (MQuAKE)
def _spans(hay: str, names: Sequence[str]) -> List[Tuple[int, int]]:
    """Where the normalised ``names`` occur as whole words in ``hay`` (normalised, space-padded)."""
    out = []
    for a in {normalize_answer(x) for x in names}:
        if not a:
            continue
        needle, start = f" {a} ", 0
        while (i := hay.find(needle, start)) >= 0:
            out.append((i + 1, i + 1 + len(a)))
            start = i + 1
    return out


def answer_side(text: str, new: Sequence[str], old: Sequence[str]) -> Optional[str]:
    """Which answer a generated ``text`` gives: ``"new"``, ``"old"``, ``"both"`` or ``None`` (neither).

    Names are matched after :func:`normalize_answer`, as whole words. A mention that lies inside a longer
    mention of the other side's names does not count for its own side ("Donald Trump" inside "Donald Trump
    Jr."; "US" inside "US of America"), so an alias that is part of the other answer cannot make a text
    say both. ``"both"`` is a text naming the two answers apart (neither right nor the old answer kept)."""
    hay = f" {normalize_answer(text)} "
    a, b = _spans(hay, new), _spans(hay, old)

    def alone(mine, other) -> bool:
        return any(not any(s >= t0 and e <= t1 and (e - s) < (t1 - t0) for t0, t1 in other) for s, e in mine)

    got_new, got_old = alone(a, b), alone(b, a)
    return "both" if got_new and got_old else "new" if got_new else "old" if got_old else None


def mquake_case(edit_pairs: Sequence[Pair], question_pairs: Sequence[Pair], question_hits: Sequence[Sequence[bool]],
                texts: Optional[Dict[str, Sequence[str]]] = None, names: Optional[Dict[str, Sequence]] = None,
                unedited: Optional[dict] = None) -> Dict[str, Optional[float]]:
    """MQuAKE scores of one case (fractions; docs/ALGORITHMS.md §9).

    Teacher-forced, from ``(log P(new), log P(old))`` pairs: ``edit_tf`` the share of the case's edits whose
    new object beats the old on the edit's own prompt; ``multihop_tf`` 1 when at least one of the multi-hop
    questions gives the new answer a higher likelihood than the old one (MQuAKE's any-of-the-questions rule),
    ``multihop_tf_q`` the share of questions that do; ``portability`` the mean teacher-forced token accuracy
    of the new answer after each question (EasyEdit's portability; ``question_hits``: top-1 hits per token).

    Generation-based, from greedy answers ``texts`` (``"edits"``: each edit's cloze, ``"edits_q"``: its
    question, ``"hops"``: the cloze of every hop of the new chain, ``"multihop"``: the questions), judged with
    :func:`answer_side` against ``names`` (``"edits"``/``"hops"``: ``(new names, old names)`` per text,
    ``"multihop"``: one ``(new names, old names)``): ``edit_gen`` / ``edit_gen_q`` the share of edits
    answered with the new object (MQuAKE's edit-wise success), ``instance_gen`` 1 when every hop of the new
    chain is answered (instance-wise accuracy), ``multihop_gen`` 1 when a question is answered with the new
    answer (multi-hop accuracy), ``multihop_gen_q`` the share of questions that are, ``multihop_old`` the
    share still answered with the old answer.

    ``unedited``: the same case on the unedited model (``"tf"``: its question pairs; ``"multihop"`` and
    ``"hops"`` texts with ``"hop_names"``): ``base_multihop_tf`` / ``base_multihop_gen`` the old chain answered
    (any question), ``base_multihop_new`` the new answer given before any edit, ``base_instance_gen`` every
    hop of the old chain answered.
    """
    out: Dict[str, Optional[float]] = {
        "edit_tf": success_rate(edit_pairs), "multihop_tf": _any_of(a > b for a, b in question_pairs),
        "multihop_tf_q": success_rate(question_pairs),
        "portability": mean_or_none(token_accuracy(h) for h in question_hits if len(h))}
    if texts is not None and names is not None:
        new, old = names["multihop"]
        sides = [answer_side(t, new, old) for t in texts["multihop"]]
        out.update({
            "edit_gen": _rate(answer_side(t, *n) == "new" for t, n in zip(texts["edits"], names["edits"])),
            "edit_gen_q": _rate(answer_side(t, *n) == "new" for t, n in zip(texts["edits_q"], names["edits"])),
            "instance_gen": _all_of(answer_side(t, *n) == "new" for t, n in zip(texts["hops"], names["hops"])),
            "multihop_gen": _any_of(s == "new" for s in sides), "multihop_gen_q": _rate(s == "new" for s in sides),
            "multihop_old": _rate(s == "old" for s in sides)})
    if unedited is not None:
        if "tf" in unedited:
            out["base_multihop_tf"] = _any_of(b > a for a, b in unedited["tf"])
        if names is not None and "multihop" in unedited:
            new, old = names["multihop"]
            sides = [answer_side(t, new, old) for t in unedited["multihop"]]
            out["base_multihop_gen"] = _any_of(s == "old" for s in sides)
            out["base_multihop_new"] = _any_of(s == "new" for s in sides)
            out["base_instance_gen"] = _all_of(answer_side(t, n, ()) == "new"
                                              for t, n in zip(unedited["hops"], unedited["hop_names"]))
    return out


# ---------------------------------------------------------------------- KnowEdit (portability, locality)
def _by_category(items: Sequence[Tuple[str, Optional[float]]]) -> Dict[str, float]:
    """category -> the mean of its scores (``None`` scores left out)."""
    groups: Dict[str, List[float]] = {}
    for cat, v in items:
        if v is not None:
            groups.setdefault(cat, []).append(v)
    return {cat: sum(vs) / len(vs) for cat, vs in groups.items()}


def _key(prefix: str, category: str) -> str:
    return f"{prefix}_{re.sub(r'[^a-z0-9]+', '_', category.lower()).strip('_')}"


def knowedit_case(rewrite_hits: Sequence[bool], rephrase_hits: Sequence[Sequence[bool]],
                  portability: Sequence[Tuple[str, Sequence[bool]]],
                  locality: Sequence[Tuple[str, Sequence[int], Sequence[int]]],
                  texts: Optional[Dict[str, Sequence[str]]] = None, names: Optional[Dict[str, Sequence]] = None,
                  unedited_texts: Optional[Sequence[str]] = None) -> Dict[str, Optional[float]]:
    """The KnowEdit benchmark's scores of one case (fractions), as EasyEdit computes them, teacher-forced:

    * ``rewrite_acc`` (Edit Succ.): token accuracy of the new target after the edit's prompt; ``rephrase_acc``
      the mean over the rephrased prompts;
    * ``portability``: the mean over categories (Subject_Aliasing, Reasoning, ...) of the mean token accuracy
      of each probe's answer (``portability``: ``(category, top-1 hits)`` per probe); per category
      ``portability_<category>``;
    * ``locality``: the mean over categories of the share of a probe's answer positions whose top-1 token is
      the one the unedited model predicted there (``locality``: ``(category, top-1 ids now, top-1 ids
      unedited)``); per category ``locality_<category>``.

    Generation-based, from greedy answers ``texts`` (``"rewrite"``, ``"rephrase"``, ``"portability"``,
    ``"locality"``) and ``names`` (``"rewrite"``: ``(new names, old names)``; ``"portability"``: each probe's
    names): ``rewrite_gen`` the answer names the new target and not the old one (the WILD evaluation's "the answer
    appears in the model's free answer"), ``rephrase_gen`` the same on the rephrased prompts; ``rewrite_em`` /
    ``rephrase_em`` the answer equals the new target after :func:`normalize_answer` (WILD's exact-match
    fallback); ``portability_gen`` the mean over
    categories of the share of probes whose answer names their answer; ``locality_gen`` the share of
    locality answers equal (after :func:`normalize_answer`) to the unedited model's (``unedited_texts``).
    """
    port = _by_category([(cat, token_accuracy(h) if len(h) else None) for cat, h in portability])
    loc = _by_category([(cat, sum(a == b for a, b in zip(now, before)) / len(now) if len(now) else None)
                        for cat, now, before in locality])
    out: Dict[str, Optional[float]] = {
        "rewrite_acc": token_accuracy(rewrite_hits) if len(rewrite_hits) else None,
        "rephrase_acc": mean_or_none(token_accuracy(h) for h in rephrase_hits if len(h)),
        "portability": mean_or_none(port.values()), "locality": mean_or_none(loc.values())}
    out.update({_key("portability", c): v for c, v in port.items()})
    out.update({_key("locality", c): v for c, v in loc.items()})
    if texts is not None and names is not None:
        new, old = names["rewrite"]

        def exact(t: str) -> bool:
            return any(normalize_answer(t) == normalize_answer(n) for n in new if normalize_answer(n))

        said = {k: list(texts.get(k) or ()) for k in ("rewrite", "rephrase")}
        out["rewrite_gen"] = _rate(answer_side(t, new, old) == "new" for t in said["rewrite"])
        out["rephrase_gen"] = _rate(answer_side(t, new, old) == "new" for t in said["rephrase"])
        out["rewrite_em"] = _rate(exact(t) for t in said["rewrite"])
        out["rephrase_em"] = _rate(exact(t) for t in said["rephrase"])
        cats = [cat for cat, _ in portability]
        out["portability_gen"] = mean_or_none(_by_category(
            [(cat, float(mentions(t, n))) for cat, t, n in zip(cats, texts["portability"], names["portability"])]
        ).values())
        if unedited_texts is not None and len(unedited_texts) == len(texts["locality"]):
            pairs = list(zip(texts["locality"], unedited_texts))
            out["locality_gen"] = _rate(normalize_answer(a) == normalize_answer(b) for a, b in pairs)
    return out
