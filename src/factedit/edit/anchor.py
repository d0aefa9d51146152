"""Norm anchoring (NAS, SasyaTitech/NAS ``util/vstar_stats.py``, ``NAS/compute_z.py``) for the MEMIT family:
every target's MLP output is rescaled to the typical norm the original model's targets have, and a target far
above it is not written at all, because collapse in long runs tracks the growth of the edited weights' norms.

    m = anchor_norm(adapter, caches, cfg, templates)               # once, on the weights of the first edit
    Z, skipped, norms = anchored_targets(Z, z0, v0, m, skip=2.0)

With z₀ the bare prompt's residual and v₀ W_out's output at the last span layer L (the fact token), and
z* = z₀ + δ the optimised target: v* = v₀ + δ (the MLP output the target asks for);

    ‖v*‖ > skip · m   →  v* ← v₀       (the request's update is dropped: its target is where it already is)
    otherwise         →  v* ← m · v* / ‖v*‖
    z* ← z₀ − v₀ + v*

``m`` is the upper-trimmed mean (the top 5 % dropped) of ‖v*‖ over calibration requests optimised on the weights
of the first anchored edit, and travels in the method state from then on, so every later edit of the chain is
anchored to the original model, not to the worn one. Deviations: docs/ALGORITHMS.md §4.1.
"""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..core.answers import greedy_answers
from ..core.errors import MethodError
from ..core.known_facts import BUILTIN_SUBJECTS, BUILTIN_TEMPLATES
from ..core.requests import Request
from .keys import template_keys, w_out_outputs

__all__ = ["calibration_requests", "trimmed_mean", "bare_outputs", "anchored_targets", "anchor_norm", "ANCHOR_KEY"]

#: the key of the anchor norm in the batch methods' state (next to AlphaEdit's per-layer key memory)
ANCHOR_KEY = "anchor"


def trimmed_mean(values: Sequence[float], upper_quantile: float = 0.95) -> float:
    """The mean after dropping the largest ``floor((1 − q) · n)`` values (the reference's ``_upper_trimmed_mean``)."""
    arr = np.sort(np.asarray(list(values), dtype=np.float64))
    if arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError("norm anchoring needs finite target norms")
    drop = int(np.floor((1.0 - upper_quantile) * arr.size))
    return float(arr[: arr.size - drop].mean()) if drop > 0 else float(arr.mean())


def bare_outputs(adapter, requests, layer: int, fact_token: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """z₀ and v₀ of each request at ``layer``: the bare prompt's residual after the layer and W_out's output
    there, at the fact token (float64, on W_out's device)."""
    _, z0 = template_keys(adapter, requests, ["{}"], layer, layer, fact_token)
    v0 = w_out_outputs(adapter, requests, layer, fact_token)
    return z0.double().to(v0.device), v0


def anchored_targets(z_star: torch.Tensor, z0: torch.Tensor, v0: torch.Tensor, m: float, skip: float = 2.0
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anchored targets (n, d_model), which requests were skipped (bool, n) and ‖v*‖ before anchoring."""
    z_star, z0, v0 = (x.double() for x in (z_star, z0.to(z_star.device), v0.to(z_star.device)))
    v = v0 + (z_star - z0)
    norms = v.norm(dim=1)
    skipped = norms > skip * m
    scaled = v * (m / norms.clamp_min(1e-30))[:, None]
    v_new = torch.where(skipped[:, None], v0, scaled)
    return z0 - v0 + v_new, skipped, norms


def calibration_requests(adapter, n: int, seed: int = 0) -> List[Request]:
    """``n`` counterfactual requests made from the model itself, without a data set: the built-in relation
    templates and subjects, each subject's target the first word the model answers for *another* subject of
    the same template (a swap, as CounterFact swaps objects); shuffled with ``seed``."""
    pairs = [(t, s) for t in BUILTIN_TEMPLATES for s in BUILTIN_SUBJECTS]
    answers = greedy_answers(adapter, [t.replace("{}", s) for t, s in pairs], max_new_tokens=4)
    words = {}
    for (t, s), a in zip(pairs, answers):
        w = a.strip().split()
        words[(t, s)] = w[0].strip(".,;:!?\"'") if w else ""
    reqs = []
    for t in BUILTIN_TEMPLATES:
        subjects = [s for s in BUILTIN_SUBJECTS if words[(t, s)]]
        for i, s in enumerate(subjects):
            other = next((words[(t, o)] for o in subjects[i + 1:] + subjects[:i]
                          if words[(t, o)].casefold() != words[(t, s)].casefold()), None)
            if other:
                reqs.append(Request(t, s, other, words[(t, s)]))
    random.Random(seed).shuffle(reqs)
    return reqs[:n]


def anchor_norm(adapter, caches, cfg, templates, target_residuals) -> Tuple[float, List[float]]:
    """The anchor m at the last span layer on the current weights: the trimmed mean of ‖v*‖ over
    ``cfg.norm_anchor_samples`` calibration requests optimised as the edits are (``target_residuals``, the
    batch pipeline's), and the norms it came from."""
    reqs = calibration_requests(adapter, cfg.norm_anchor_samples, cfg.seed)
    if len(reqs) < 10:
        raise MethodError(f"norm anchoring: the model answered too few built-in prompts to calibrate on "
                          f"({len(reqs)} requests); set norm_anchor=false")
    z_star, _ = target_residuals(adapter, caches, reqs, cfg, templates)
    z0, v0 = bare_outputs(adapter, reqs, cfg.layers[-1], cfg.fact_token)
    v = v0 + (z_star.double().to(v0.device) - z0)
    norms = [float(x) for x in v.norm(dim=1)]
    return trimmed_mean(norms, cfg.norm_anchor_quantile), norms
