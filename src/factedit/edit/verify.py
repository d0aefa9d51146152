"""Did the edit take? A check on the request's own prompt after every edit.

    outcome = verify_request(adapter, request)      # {"verified": True, "p_new": 0.93, ...}

The rule (docs/ALGORITHMS.md §12): an edit of ``prompt -> target_new`` is *verified* when, on the
request's own prompt,

1. ``P(target_new) > P(target_true)`` (when the request names the true target), and
2. the new target has clearly taken the answer: its first token is the model's greedy next token,
   or ``P(target_new) ≥ VERIFY_MIN_P``.

P is the per-token geometric mean of the space-prefixed target under teacher forcing (as the
scores everywhere in factedit). Rule 2 is what P(new) > P(true) alone misses: an edit that leaves
P(new) where it was (0.2050 -> 0.2050 on "{} was founded by" / Microsoft / Elon Musk, where the
true target was already unlikely) passes rule 1 but not rule 2.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

from ..core.lm import target_token_scores

__all__ = ["VERIFY_MIN_P", "RETRY_STEPS_FACTOR", "RETRY_BARE_WEIGHT", "verify_request", "verify_requests",
           "verified_by_scores", "outcome", "retry_config"]

#: P(target_new) at or above which a new target that is not the greedy continuation still counts
VERIFY_MIN_P = 0.5
#: the retry of a single-request edit that did not take: this many times the optimisation steps ...
RETRY_STEPS_FACTOR = 2
#: ... with this share of the rewrite loss on the request's own (bare) prompt
RETRY_BARE_WEIGHT = 0.5


def retry_config(cfg):
    """The config of the one retry an unverified single-request edit gets (the budget): the value
    optimisation with :data:`RETRY_STEPS_FACTOR` × the steps and :data:`RETRY_BARE_WEIGHT` of the
    rewrite loss on the bare prompt. ``None`` for configs without a value optimisation."""
    from dataclasses import replace

    value = getattr(cfg, "value", None)
    if value is None:
        return None
    return replace(cfg, value=replace(value, steps=value.steps * RETRY_STEPS_FACTOR, bare_weight=RETRY_BARE_WEIGHT))


def verified_by_scores(lp_new: float, new_is_greedy: bool, lp_true=None) -> bool:
    """The rule from the mean log-probabilities and whether the new target's first token is greedy."""
    beats_true = lp_true is None or lp_new > lp_true
    return bool(beats_true and (new_is_greedy or math.exp(lp_new) >= VERIFY_MIN_P))


def outcome(lp_new: float, new_is_greedy: bool, lp_true=None) -> Dict:
    """The recorded outcome of one request: ``verified``, ``p_new``, ``p_true`` (or None), ``new_is_greedy``."""
    return {"verified": verified_by_scores(lp_new, new_is_greedy, lp_true), "p_new": math.exp(lp_new),
            "p_true": None if lp_true is None else math.exp(lp_true), "new_is_greedy": bool(new_is_greedy)}


def verify_requests(adapter, requests: Sequence) -> List[Dict]:
    """The outcome of each request on the model as it is now (one batched scoring pass)."""
    prompts, targets, where = [], [], []
    for i, r in enumerate(requests):
        prompts.append(r.text), targets.append(r.target_new), where.append((i, "new"))
        if r.target_true:
            prompts.append(r.text), targets.append(r.target_true), where.append((i, "true"))
    scores = target_token_scores(adapter, prompts, targets)
    got: Dict[tuple, tuple] = {w: s for w, s in zip(where, scores)}
    out = []
    for i, r in enumerate(requests):
        lp, hits = got[(i, "new")]
        lp_new, greedy = float(lp.mean()), bool(hits[0])
        lp_true = float(got[(i, "true")][0].mean()) if r.target_true else None
        out.append(outcome(lp_new, greedy, lp_true))
    return out


def verify_request(adapter, request) -> Dict:
    """:func:`verify_requests` of one request."""
    return verify_requests(adapter, [request])[0]
