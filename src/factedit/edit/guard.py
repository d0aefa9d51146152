"""Collapse guard (docs/ALGORITHMS.md §11): refuse edits that look like the "disabling edits" of Gupta et al. 2024.

Two signals, checked after an edit is applied and before it is committed:

* **update norm**: ‖Δ‖ of a layer far above what a normal edit of that layer can be. The
  reference is calibrated once per (model, layer) without any optimisation: for a fixed set of
  subjects, the largest norm an r-ROME update can reach with the value clamp,
  ``clamp · ‖v₀‖ · ‖C⁻¹k*‖ / (k*ᵀC⁻¹k*)`` (cached under ``$FACTEDIT_HOME/guard``);
* **generation entropy**: ROME's n-gram entropy of greedy continuations of generic prompts
  falls sharply (the model starts repeating itself). The probe of a set of weights is kept in memory
  from one edit to the next and on disk by the weights' fingerprint, so every ``factedit edit`` of the
  same base model reads its "before" probe instead of decoding it.

If either fires the edit is rolled back and :class:`CollapseError` explains why.

It also *warns* (the edit is kept) when the wear meter passes the limits calibrated from our long runs
(:func:`~factedit.edit.wear.wear_warnings`): ``decision["warnings"]``, logged and shown with the edit.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..core.errors import FactEditError
from ..core.fingerprints import model_fingerprint
from ..core.lm import greedy_tokens
from ..core.metrics import generation_entropy
from ..core.paths import atomic_write_text, factedit_home
from ..core.requests import Request
from ..core.tokens import prefix_tag
from .keys import template_keys
from .solver import equality_constrained
from .wear import wear_warnings

__all__ = ["GuardConfig", "CollapseError", "norm_reference", "entropy_probe", "probe_tokens", "cached_probe_tokens",
           "store_probe_tokens", "entropy_of", "check", "combine", "Guard"]

log = logging.getLogger(__name__)

CALIBRATION_SUBJECTS = (
    "Paris", "Barack Obama", "the Eiffel Tower", "Microsoft", "Lionel Messi", "the Amazon River", "Tokyo",
    "Albert Einstein", "Toyota", "the Beatles", "Mount Everest", "Shakespeare", "Google", "the Nile",
    "Angela Merkel", "Nintendo",
)
GENERIC_PROMPTS = ("The most important thing about history is", "My favorite food is", "The city was quiet when")


class CollapseError(FactEditError):
    """An edit was rolled back because it looked like it would break the model."""


@dataclass(frozen=True)
class GuardConfig:
    """Collapse guard settings.

    Attributes:
        enabled: run the guard at all (``--no-guard`` / ``guard=GuardConfig(enabled=False)`` to force an edit).
        norm_factor: fire when a layer's ‖Δ‖ exceeds this many times the calibrated reference
            (times √n for a batch of n requests).
        entropy_drop: fire when generation entropy falls by more than this fraction.
        prompts: generic prompts whose continuations measure fluency.
        max_new_tokens: length of those continuations.
    """

    enabled: bool = True
    norm_factor: float = 10.0
    entropy_drop: float = 0.3
    prompts: Tuple[str, ...] = GENERIC_PROMPTS
    max_new_tokens: int = 24


def norm_reference(adapter, caches, layer: int, corpus: Optional[str], n_tokens: int, clamp: float = 4.0,
                   seq_len: int = 256, dtype: str = "float64") -> float:
    """The calibrated reference ‖Δ‖ of a normal edit at ``layer`` (cached per model and layer)."""
    fp = model_fingerprint(adapter.model, upto_layer=layer, spec=adapter.spec)
    path = factedit_home() / "guard" / f"{fp}{prefix_tag(adapter.tokenizer)}-layer{layer}-clamp{clamp}.json"
    try:
        return float(json.loads(path.read_text())["reference"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    C = caches.mom2(layer, corpus, n_tokens, seq_len=seq_len, dtype=dtype)
    reqs = [Request("{} is", s, "x") for s in CALIBRATION_SUBJECTS]
    K, _ = template_keys(adapter, reqs, caches.templates(0), layer, None)
    K = K.to(C.device)
    W = adapter.w_out_weight(layer).to(device=C.device, dtype=torch.float32)
    norms = []
    for k in K:
        v0 = W @ k
        sol = equality_constrained((clamp * v0)[:, None], k[:, None], C)
        norms.append(float(sol.left.norm() * sol.right.norm()))
    ref = max(norms)
    atomic_write_text(path, json.dumps({"reference": ref, "norms": norms, "layer": layer}))
    return ref


def probe_tokens(adapter, cfg: GuardConfig, draft=None) -> List[List[int]]:
    """The greedy continuations of the generic prompts (``model.generate``'s tokens). ``draft``: those of the
    weights before the edit, verified in one forward (:func:`~factedit.core.lm.greedy_tokens`): a normal edit
    leaves them unchanged, so the probe after an edit costs one forward instead of ``max_new_tokens``."""
    return greedy_tokens(adapter, cfg.prompts, cfg.max_new_tokens, draft=draft)


def _probe_path(adapter, cfg: GuardConfig):
    """Where the fluency probe of the current weights is cached: keyed by the whole model's fingerprint, the
    prompt prefix, the prompts and the length (``$FACTEDIT_HOME/guard``)."""
    import hashlib

    fp = model_fingerprint(adapter.model, spec=adapter.spec)
    what = hashlib.sha256(json.dumps([list(cfg.prompts), cfg.max_new_tokens]).encode()).hexdigest()[:12]
    return factedit_home() / "guard" / f"{fp}{prefix_tag(adapter.tokenizer)}-probe-{what}.json"


def cached_probe_tokens(adapter, cfg: GuardConfig) -> Optional[List[List[int]]]:
    """The fluency probe of the current weights when an earlier process read it (None otherwise)."""
    try:
        tokens = json.loads(_probe_path(adapter, cfg).read_text(encoding="utf-8"))["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(tokens, list) and len(tokens) == len(cfg.prompts) and all(
        isinstance(row, list) and all(isinstance(t, int) for t in row) for row in tokens)
    return tokens if ok else None


def store_probe_tokens(adapter, cfg: GuardConfig, tokens) -> None:
    """Keep the fluency probe of the current weights for later processes (an unedited base model is probed
    again by every ``factedit edit``; written atomically)."""
    atomic_write_text(_probe_path(adapter, cfg), json.dumps({"tokens": [list(map(int, r)) for r in tokens],
                                                            "prompts": list(cfg.prompts)}))


def entropy_of(tokens) -> float:
    """Mean generation entropy of the probe's continuations."""
    return sum(generation_entropy(g) for g in tokens) / len(tokens)


def entropy_probe(adapter, cfg: GuardConfig) -> float:
    """Mean generation entropy of greedy continuations of the generic prompts (one batch)."""
    return entropy_of(probe_tokens(adapter, cfg))


def check(result, references: dict, entropy_before: float, entropy_after: float, cfg: GuardConfig,
          n_requests: int = 1) -> dict:
    """The guard's decision for an applied edit; ``fired`` lists the reasons (empty = pass)."""
    by_layer = {}
    for d in result.deltas:
        by_layer[d.layer] = by_layer.get(d.layer, 0) + d.dense().double()
    norms = {l: float(torch.linalg.matrix_norm(m)) for l, m in by_layer.items()}
    fired = []
    limits = {}
    for l, nrm in norms.items():
        if l in references:
            limits[l] = cfg.norm_factor * references[l] * math.sqrt(max(1, n_requests))
            if not math.isfinite(nrm) or nrm > limits[l]:
                fired.append(f"‖Δ‖ of layer {l} is {nrm:.3g}, above the limit {limits[l]:.3g} "
                             f"({cfg.norm_factor:g} × the largest normal edit of this layer)")
    if entropy_before > 0 and entropy_after < (1 - cfg.entropy_drop) * entropy_before:
        fired.append(f"generation entropy fell from {entropy_before:.2f} to {entropy_after:.2f} bits "
                     f"(more than {cfg.entropy_drop:.0%}): the model is repeating itself")
    return {"norms": {str(k): v for k, v in norms.items()}, "limits": {str(k): v for k, v in limits.items()},
            "entropy_before": entropy_before, "entropy_after": entropy_after, "fired": fired,
            "passed": not fired, "warnings": []}


def combine(decisions) -> Optional[dict]:
    """One decision for edits made one after another in one call (a ROME edit of several requests):
    passed only if each passed; the per-edit decisions under ``"edits"``; ``None`` if the guard was off."""
    decisions = [d for d in decisions if d is not None]
    if not decisions:
        return None
    return {"passed": all(d["passed"] for d in decisions), "fired": [f for d in decisions for f in d["fired"]],
            "warnings": [w for d in decisions for w in d.get("warnings", [])],
            "entropy_before": decisions[0]["entropy_before"], "entropy_after": decisions[-1]["entropy_after"],
            "edits": list(decisions)}


class Guard:
    """The collapse guard of one model: references per edit, the decision after it is applied, and
    the fluency probe of the current weights (kept between edits: the probe after one edit is the
    probe before the next, and an exact revert restores the one before).

        refs = guard.prepare(cfg, guard_cfg)          # before applying
        decision = guard.judge(result, refs, guard_cfg, n_requests)   # raises CollapseError
    """

    def __init__(self, adapter, caches):
        self.adapter, self.caches = adapter, caches
        self._probe: Optional[Tuple[float, list]] = None  # (entropy, tokens) of the current weights
        self._before: dict = {}  # id(result) -> the probe before that edit (restored by an exact revert)

    def wanted(self, guard_cfg: GuardConfig) -> Optional[Tuple[Tuple[str, ...], int]]:
        """``(prompts, max_new_tokens)`` of the fluency probe when the next edit will need one of the current
        weights (the guard is on and has none, nor a cached one of the base model), so that a caller reading
        the model anyway can read it in the same batch and hand it over with :meth:`seed`; else None."""
        if not guard_cfg.enabled or self._probe is not None or self._from_cache(guard_cfg):
            return None
        return tuple(guard_cfg.prompts), guard_cfg.max_new_tokens

    def seed(self, guard_cfg: GuardConfig, tokens: List[List[int]]) -> None:
        """The fluency probe of the current weights, read by the caller (:meth:`wanted`): ``probe_tokens``'s
        tokens for ``guard_cfg``."""
        if len(tokens) != len(guard_cfg.prompts):
            raise ValueError("guard probe: one row of tokens per prompt")
        self._probe = (entropy_of(tokens), [list(t) for t in tokens])
        self._keep(guard_cfg)

    def _from_cache(self, guard_cfg: GuardConfig) -> bool:
        """Take the probe of the current weights from the disk cache (by their fingerprint), if it is there."""
        tokens = cached_probe_tokens(self.adapter, guard_cfg)
        if tokens is not None:
            self._probe = (entropy_of(tokens), tokens)
        return tokens is not None

    def _keep(self, guard_cfg: GuardConfig) -> None:
        store_probe_tokens(self.adapter, guard_cfg, self._probe[1])

    def prepare(self, cfg, guard_cfg: GuardConfig, norm_limit: bool = True) -> dict:
        """Before an edit is applied: the calibrated norm references (``norm_limit``: the method's updates are
        ROME's rank-one form at one layer with key statistics and a value clamp, as its registration says) and
        the fluency probe of the current weights. ``{}`` when the guard is off."""
        if not guard_cfg.enabled:
            return {}
        if self._probe is None and not self._from_cache(guard_cfg):
            tokens = probe_tokens(self.adapter, guard_cfg)
            self._probe = (entropy_of(tokens), tokens)
            self._keep(guard_cfg)
        layer = getattr(cfg, "layer", None)
        if not norm_limit or layer is None:
            return {}
        return {layer: norm_reference(self.adapter, self.caches, layer, cfg.stats_corpus, cfg.stats_tokens,
                                      cfg.value.clamp_norm_factor, cfg.stats_seq_len, cfg.stats_dtype)}

    def judge(self, result, references: dict, guard_cfg: GuardConfig, n_requests: int) -> dict:
        """The decision on an applied edit (stored in ``result.guard``); raises :class:`CollapseError`
        when it fires (the caller rolls the edit back)."""
        before = self._probe
        tokens = probe_tokens(self.adapter, guard_cfg, draft=before[1])
        result.guard = check(result, references, before[0], entropy_of(tokens), guard_cfg, n_requests)
        if not result.guard["passed"]:
            raise CollapseError(
                "edit rolled back: it looks like a disabling edit that would break the model: "
                + "; ".join(result.guard["fired"])
                + ". Try another layer or method (r-rome is the stable ROME), or force it with "
                "guard=GuardConfig(enabled=False) (CLI: --no-guard)."
            )
        result.guard["warnings"] = wear_warnings(result.wear, result.method, result.config)
        for text in result.guard["warnings"]:
            log.warning("%s", text)
        self._before[id(result)] = before
        self._probe = (result.guard["entropy_after"], tokens)
        return result.guard

    def reverted(self, result) -> None:
        """``result`` was reverted bit-exactly: the weights' probe is the one before it."""
        self._probe = self._before.pop(id(result), None) if result.guard else None

    def forget(self) -> None:
        """The weights changed without the guard (guard off, patches loaded): probe again next time."""
        self._probe = None
        self._before.clear()
