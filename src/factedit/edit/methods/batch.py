"""MEMIT, EMMET, AlphaEdit and RLS: many requests, several layers, one solver (docs/ALGORITHMS.md §4–6, §14).

The three differ only in the solve of each layer (:data:`SOLVES`, over :mod:`factedit.edit.solver`); the
pipeline is shared, and a new member of the family is one more entry there and one registration:

1. target residuals z* = z₀ + δ at the last layer L of the span (δ optimised in batches; z₀ is the
   bare prompt's residual);
2. for each layer l of the span, ascending: keys K_l (averaged over the context templates) and the
   current residual Z_cur at L of the bare prompts (as MEMIT's code; ``current_residual="templates"``
   averages it over the templates instead), both on the model *as already updated at earlier span
   layers*; R_l = (Z* − Z_cur) / (layers left), Δ_l from the solver, applied. At the first layer
   R = δ / len(span) exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.errors import MethodError, RequestError
from ...core.requests import same_prompt_message
from ..anchor import ANCHOR_KEY, anchor_norm, anchored_targets, bare_outputs
from ..deltas import LayerDelta, apply_deltas
from ..keys import RESUME_BUDGET, TemplateKeys
from ..results import Computed
from ..solver import Solution, equality_constrained, least_squares, null_space, recursive_least_squares
from ..values import ValueConfig, ValueProblem, optimize_values
from .base import GIVEN, SPAN_RULE, StatsFields, check_layers, default_span, default_stats_tokens
from .registry import MethodSpec, register

__all__ = ["BatchConfig", "BATCH_METHODS", "SOLVES", "LayerSolve", "check_batch", "compute_batch", "add_keys",
           "alphaedit_room"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSolve:
    """The per-layer solve of one member of the family.

    Attributes:
        solve: ``(R (d_model, n), K (d_ff, n), C, layer, cfg, caches, memory) -> Solution``; ``memory`` is the
            method's state at ``layer`` (``None`` for stateless methods or before the first edit).
        keeps_keys: the method's state is a key memory: the keys of each batch are returned as its
            ``state_update`` and folded in with :func:`add_keys`.
    """

    solve: Callable[..., Solution]
    keeps_keys: bool = False


def _memit(R, K, C, layer, cfg, caches, memory) -> Solution:
    return least_squares(R, K, C, cfg.mom2_update_weight)


def _emmet(R, K, C, layer, cfg, caches, memory) -> Solution:
    d_ff, n = K.shape
    if n > d_ff:
        # M = Kᵀ C⁻¹ K (n × n) has rank ≤ d_ff: n exact equalities in d_ff dimensions cannot all hold, and any
        # ridge ε makes the solve MEMIT's with λ = ε (docs/ALGORITHMS.md §5). The automatic ridge (1e-6·tr M/n)
        # would be a vanishing λ, which broke the embedded model at 2,000 requests (0 of 1,996 took); so the
        # default here is MEMIT's own λ, solved in MEMIT's d_ff × d_ff form (no n × n system to hold or factor).
        lam = cfg.ridge if cfg.ridge is not None else cfg.mom2_update_weight
        log.warning("EMMET layer %d: %d requests in one batch but keys of %d dimensions: the equality constraints "
                    "cannot all hold; solved as MEMIT's least squares with λ = %g (%s; EMMET with a ridge ε is "
                    "MEMIT with λ = ε, docs/ALGORITHMS.md §5)", layer, n, d_ff, lam,
                    "the ridge set" if cfg.ridge is not None else "mom2_update_weight, MEMIT's default")
        return replace(least_squares(R, K, C, lam), ridge=float(lam))
    sol = equality_constrained(R, K, C, max_condition=cfg.max_condition, ridge=cfg.ridge)
    if sol.ridge:
        why = "key system ill-conditioned" if cfg.ridge is None else "ridge set"
        log.warning("EMMET layer %d: %s (cond %.2e); ridge %.3g added", layer, why, sol.condition, sol.ridge)
    return sol


def _alphaedit(R, K, C, layer, cfg, caches, memory) -> Solution:
    P = caches.projector(layer, C, cfg.nullspace_threshold)
    if float(P.diagonal().sum()) < 0.5:
        raise MethodError(f"AlphaEdit: no eigenvalue of the key statistics at layer {layer} is below "
                          f"nullspace_threshold={cfg.nullspace_threshold:g}, so every update would change "
                          "preserved keys; raise the threshold or use memit/emmet")
    return null_space(R, K, P, memory, _alpha(cfg, P, C))


#: AlphaEdit's α when neither ``alpha`` nor ``alpha_scale`` is given (the paper's; docs/ALGORITHMS.md §6)
DEFAULT_ALPHA = 10.0


def _alpha(cfg, P, C) -> float:
    """AlphaEdit's α: the given one, else ``alpha_scale · tr(P C)``, else :data:`DEFAULT_ALPHA`."""
    if cfg.alpha is not None:
        return cfg.alpha
    if cfg.alpha_scale is None:
        return DEFAULT_ALPHA
    return cfg.alpha_scale * float((P * C.to(P.dtype)).sum())  # tr(P C), P and C symmetric


def alphaedit_room(adapter, caches, cfg, state) -> Dict[int, Tuple[int, int]]:
    """Per layer, the null space's dimensions k and those the key memory leaves unused: k minus the number of
    eigenvalues of Uᵀ G_p U (the memory seen inside the null space) above α, the ridge below which a direction
    still constrains nothing."""
    out = {}
    for layer in cfg.layers:
        C = caches.mom2(layer, **cfg.stats_args)
        U = caches.null_basis(layer, C, cfg.nullspace_threshold)
        G = (state or {}).get(layer)
        used = 0
        if G is not None:  # α from the projector the solve used (cached), not a new U Uᵀ
            alpha = _alpha(cfg, caches.projector(layer, C, cfg.nullspace_threshold), C)
            Ud = U.to(torch.float64)
            used = int((torch.linalg.eigvalsh(Ud.T @ G.to(Ud) @ Ud) > alpha).sum())
        out[layer] = (int(U.shape[1]), int(U.shape[1]) - used)
    return out


def _rls(R, K, C, layer, cfg, caches, memory) -> Solution:
    return recursive_least_squares(R, K, C, cfg.mom2_update_weight, memory)


#: method name -> its per-layer solve (the registered names of the family, in this order)
SOLVES: Dict[str, LayerSolve] = {"memit": LayerSolve(_memit), "emmet": LayerSolve(_emmet),
                                 "alphaedit": LayerSolve(_alphaedit, keeps_keys=True), "rls": LayerSolve(_rls)}
BATCH_METHODS = tuple(SOLVES)


@dataclass(frozen=True)
class BatchConfig(StatsFields):
    """Configuration of a MEMIT / EMMET / AlphaEdit edit. ``None`` fields come from the model. Also has the
    fields of :class:`~factedit.edit.methods.base.StatsFields` (statistics, template seed, layer rule).

    Attributes:
        method: ``"memit"``, ``"emmet"``, ``"alphaedit"`` or ``"rls"``.
        layers: the span of edited layers (ascending); default :func:`~factedit.edit.methods.base.default_span`.
        value: target optimisation knobs (MEMIT's clamp, 0.75 of ‖z₀‖; Adam lr 1.0 where MEMIT's code uses 0.5:
            on a batch of 100 CounterFact requests the same ES/PS (100/93) with 11.4 instead of 16.7 steps per
            target on average, docs/ALGORITHMS.md §4).
        context_lengths: ``(tokens, count)`` of generated prefixes (MEMIT: 5 of 10 tokens).
        essence_prompts: prompts of the essence-drift KL.
        fact_token: fact-token strategy.
        mom2_update_weight: λ of MEMIT's least squares. MEMIT used 15000 for GPT-J; its keys are on
            another scale than SmolLM2's (E[kkᵀ] eigenvalues 0.003–4.1 at layer 8), where 15000 leaves a
            50-request batch at 0.62 efficacy and 1000 reaches 0.94 (100 gives the same).
        max_condition: EMMET adds a ridge when the key system's condition number exceeds this.
        ridge: EMMET's ridge ε added to ``Kᵀ C⁻¹ K`` always (``None``: only when ill-conditioned, automatic);
            EasyEdit's ``emmet_lambda`` with its C scaled by ``mom2_update_weight`` is ε = λ · weight. Any ε
            makes the update MEMIT's with λ = ε (docs/ALGORITHMS.md §5). A batch with more requests than the
            keys have dimensions is solved as MEMIT with λ = ``ridge``, or ``mom2_update_weight`` when unset.
        nullspace_threshold: AlphaEdit keeps eigenvectors of C with eigenvalue below this (the paper's 1e-2).
        alpha: AlphaEdit's ridge α (absolute). ``None`` with ``alpha_scale`` ``None`` (default): the paper's
            :data:`DEFAULT_ALPHA` = 10, filled in by :meth:`resolved`. Decided on 2026-12-06 from 1,000 sequential
            edits in batches of 100 (docs/RESULTS.md, "Lifelong editing"): α = 10 kept perplexity at +28 % and
            known recall at 46.5 % where the earlier default (``alpha_scale`` 0.02, α ≈ 0.1 on SmolLM2)
            collapsed between 500 and 700 edits; on 50 sequential single-request edits the two retain alike.
        alpha_scale: α relative to the mean energy of a key inside the preserved null space,
            ``alpha_scale · tr(P C)`` (used when ``alpha`` is ``None``; 0.02 was the default before
            2026-12-06).
        current_residual: where Z_cur is measured: ``"bare"`` (default; the prompts the targets start
            from, as MEMIT's code) or ``"templates"`` (averaged over the context templates, as factedit
            before 2026-12-01: every update then also carried z0_bare − mean_j z_j).
        batch_size: requests per target-optimisation batch (memory is linear in it).
        norm_anchor: NAS norm anchoring (:mod:`factedit.edit.anchor`): each target's MLP output rescaled to the
            original model's typical norm, targets above ``norm_anchor_skip`` times it dropped. Off by default
            (2026-12-07, docs/RESULTS.md "Norm anchoring"): over 1,000 sequential AlphaEdit edits it kept 4.8
            points more known recall for 4.7 points fewer edits that took; worth it from the first edit of a long
            chain, not for a single edit.
        norm_anchor_samples: calibration requests of the anchor (the reference: 1,000 CounterFact rewrites).
        norm_anchor_skip: a target whose ‖v*‖ exceeds this many times the anchor is not written (the reference: 2).
        norm_anchor_quantile: the calibration norms above this quantile are left out of the anchor (0.95).
    """

    method: str = "memit"
    layers: Optional[Tuple[int, ...]] = None
    value: ValueConfig = field(default_factory=lambda: ValueConfig(clamp_norm_factor=0.75, lr=1.0))
    context_lengths: Tuple[Tuple[int, int], ...] = ((10, 5),)
    essence_prompts: Tuple[str, ...] = ("{} is a",)
    fact_token: str = "subject_last"
    mom2_update_weight: float = 1000.0
    max_condition: float = 1e8
    ridge: Optional[float] = None
    nullspace_threshold: float = 1e-2
    alpha: Optional[float] = None
    alpha_scale: Optional[float] = None
    current_residual: str = "bare"
    batch_size: int = 16
    norm_anchor: bool = False
    norm_anchor_samples: int = 100
    norm_anchor_skip: float = 2.0
    norm_anchor_quantile: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        if self.method not in SOLVES:
            raise MethodError(f"unknown batch method {self.method!r}; choose one of {', '.join(SOLVES)}")
        if self.batch_size < 1:
            raise MethodError("batch_size must be at least 1")
        if self.current_residual not in ("bare", "templates"):
            raise MethodError(f"current_residual must be 'bare' or 'templates', got {self.current_residual!r}")
        if self.norm_anchor_samples < 10 or not self.norm_anchor_skip > 1 or not 0 < self.norm_anchor_quantile <= 1:
            raise MethodError("norm anchoring needs norm_anchor_samples ≥ 10, norm_anchor_skip > 1 and "
                              "0 < norm_anchor_quantile ≤ 1")

    def resolved(self, adapter) -> "BatchConfig":
        layers = default_span(adapter.n_layers) if self.layers is None else check_layers(adapter, self.layers)
        rule = self.layer_rule or (SPAN_RULE if self.layers is None else GIVEN)
        alpha = self.alpha
        if self.method == "alphaedit" and alpha is None and self.alpha_scale is None:
            alpha = DEFAULT_ALPHA
        return replace(self, layers=layers, stats_tokens=self.stats_tokens or default_stats_tokens(adapter.d_ff),
                       layer_rule=rule, alpha=alpha)


def check_batch(requests: Sequence) -> None:
    """Refuse duplicate or contradictory requests (same prompt and subject) in one batch."""
    seen: Dict[Tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        j = seen.setdefault((r.prompt, r.subject), i)
        if j != i:
            raise RequestError(f"{same_prompt_message(requests[j], r, f'#{j} and #{i} ')}; "
                               "remove one or edit them in separate batches")


def _suffix_length(tok, req, fact_token: str) -> int:
    from ...core.tokens import encode_request

    ids, fact, _ = encode_request(tok, req.prompt, req.subject, req.target_new, fact_token)
    return len(ids) - fact


def target_residuals(adapter, caches, requests, cfg: BatchConfig, templates):
    """z* = z₀ + δ at the last span layer for every request, optimised ``batch_size`` at a time.

    Results are memoised in ``caches`` per (weights, request, layer, templates, value config), so
    trying several methods on the same requests optimises each target once.
    """
    from tqdm.auto import tqdm

    L = cfg.layers[-1]
    memo = caches.target_memo(L, templates, cfg.value, cfg.essence_prompts, cfg.fact_token)
    todo = [i for i, r in enumerate(requests) if r not in memo]
    tok = adapter.tokenizer
    # requests whose δ-dependent part (fact token onwards) has the same length share a chunk
    todo.sort(key=lambda i: _suffix_length(tok, requests[i], cfg.fact_token))
    chunks = [todo[i: i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    keep = caches.target_keeper(L, templates, cfg.value, cfg.essence_prompts, cfg.fact_token) if chunks else None
    for chunk in tqdm(chunks, desc="targets", unit="batch", disable=not caches.progress or len(chunks) < 2):
        problem = ValueProblem(adapter, L, [requests[i] for i in chunk], templates, cfg.essence_prompts,
                               cfg.fact_token, inject="residual", bare_weight=cfg.value.bare_weight)
        res = optimize_values(problem, cfg.value)
        found = {requests[i]: (res.v0[j] + res.delta[j], {"nll_before": res.nll_before[j],
                                                          "nll_after": res.nll_after[j], "steps": res.steps_each[j]})
                 for j, i in enumerate(chunk)}
        memo.update(found)
        if keep is not None:
            keep(found)
    dev = adapter.w_out_device(L)  # targets read back from disk (EditCaches.disk_targets) are on the CPU
    zs = torch.stack([memo[r][0].to(dev) for r in requests]).float()
    return zs, [dict(memo[r][1]) for r in requests]


def add_keys(state: Optional[dict], keys: Dict[int, torch.Tensor]) -> dict:
    """The batch methods' state after a batch (a new dict; ``state`` is not modified): AlphaEdit's key memory
    ``{layer: K_p K_pᵀ + K Kᵀ}``, RLS's ``{layer: {"A": Σ K Kᵀ, "B": Σ U Kᵀ}}`` (from its ``"K:l"``/``"U:l"``
    updates), and the norm anchor (:data:`~factedit.edit.anchor.ANCHOR_KEY`) kept from the
    first anchored batch on. Replaying the same updates in the same order reproduces it bit for bit, which is
    how the Editor reverts it without keeping every earlier (d_ff × d_ff) matrix."""
    state = dict(state or {})
    for l, K in keys.items():
        if l == ANCHOR_KEY:
            state.setdefault(ANCHOR_KEY, K)
        elif isinstance(l, str) and l.startswith("K:"):  # rls: A = Σ K Kᵀ, B = Σ U Kᵀ (the solve's expressions)
            layer, U = int(l[2:]), keys["U:" + l[2:]]
            old = state.get(layer)
            state[layer] = ({"A": K @ K.T, "B": U @ K.T} if old is None else
                            {"A": old["A"] + K @ K.T, "B": old["B"] + U @ K.T})
        elif isinstance(l, int):
            state[l] = (state[l] if l in state else 0) + K @ K.T
    return state


def compute_batch(adapter, caches, requests: Sequence, cfg: BatchConfig, state: Optional[dict] = None) -> Computed:
    """Deltas of a batch edit over the span. The model is updated layer by layer while
    computing (later keys depend on earlier layers) and restored before returning.

    ``state`` holds the method's state (AlphaEdit's key memory ``{layer: K_p K_pᵀ}``) and is not modified;
    for a method that keeps keys (:attr:`LayerSolve.keeps_keys`) the result's ``state_update`` is this
    batch's keys ``{layer: K (d_ff, n) float64}``, folded in by the caller (the registration's ``fold_state``).
    """
    ad = adapter
    check_batch(requests)
    solver = SOLVES[cfg.method]
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    C = {l: caches.mom2(l, **cfg.stats_args) for l in cfg.layers}  # on each W_out's device
    timings["stats"] = time.perf_counter() - t
    t = time.perf_counter()
    templates = caches.templates(cfg.seed, cfg.context_lengths)
    timings["templates"] = time.perf_counter() - t
    t = time.perf_counter()
    Z_target, info = target_residuals(ad, caches, list(requests), cfg, templates)
    timings["values"] = time.perf_counter() - t
    state = dict(state or {})
    new_keys: Dict[object, torch.Tensor] = {}
    if cfg.norm_anchor:
        t = time.perf_counter()
        Z_target, new_keys = _anchor(ad, caches, list(requests), cfg, templates, state, Z_target, info)
        timings["anchor"] = time.perf_counter() - t
    t = time.perf_counter()
    keys_of: Dict[int, torch.Tensor] = {}  # per layer the keys K (d_ff, n) its update is for
    deltas: List[LayerDelta] = []
    applied = []
    L = cfg.layers[-1]
    # the keys of each layer on the weights the layers below it were updated to; each pass starts where the last
    # one's updated layer begins (the rows' residual stream below it kept, within RESUME_BUDGET)
    keys = TemplateKeys(ad, requests, templates, cfg.fact_token, budget=RESUME_BUDGET)
    bare = None if cfg.current_residual == "templates" else TemplateKeys(ad, requests, ["{}"], cfg.fact_token,
                                                                          budget=RESUME_BUDGET // 4)
    try:
        for i, l in enumerate(cfg.layers):
            if cfg.current_residual == "templates":
                K, Z_cur = keys(l, L)
            else:
                K, _ = keys(l)
                _, Z_cur = bare(l, L)
            dev = C[l].device  # the solve runs where the statistics and W_out are
            R = ((Z_target.to(dev) - Z_cur.to(dev)) / (len(cfg.layers) - i)).T  # (d_model, n)
            Kt = K.T.to(dev)  # (d_ff, n)
            sol = solver.solve(R, Kt, C[l], l, cfg, caches, state.get(l))
            if solver.keeps_keys:
                new_keys[l] = Kt.double()
            elif sol.memory is not None:  # rls: "K:l" and "U:l" (flat, as patches store state updates)
                new_keys.update({f"{k}:{l}": v for k, v in sol.memory.items()})
            d = LayerDelta(l, sol.left.float(), None if sol.right is None else sol.right.float())
            keys_of[l] = Kt
            applied.append(apply_deltas(ad, [d]))
            deltas.append(d)
            for x in info:
                x.setdefault("ridge", {})[str(l)] = sol.ridge
    finally:
        for a in reversed(applied):
            a.revert()
    timings["solve"] = time.perf_counter() - t
    return Computed(deltas, None, info, timings, cfg, state_update=new_keys or None, keys=keys_of)


def _anchor(adapter, caches, requests, cfg: BatchConfig, templates, state, Z_target, info):
    """NAS on the batch's targets (:func:`~factedit.edit.anchor.anchored_targets`); the anchor from the state, or
    calibrated on the current weights (then returned as the batch's state update, to be kept from now on)."""
    update: Dict[object, torch.Tensor] = {}
    if ANCHOR_KEY in state:
        m = float(state[ANCHOR_KEY][0])
    else:
        key = (cfg.layers[-1], tuple(templates), cfg.value, cfg.norm_anchor_samples, cfg.norm_anchor_quantile,
               cfg.seed, cfg.fact_token)
        m = caches.anchor_norm(key, lambda: anchor_norm(adapter, caches, cfg, templates, target_residuals)[0])
        update[ANCHOR_KEY] = torch.tensor([m], dtype=torch.float64)
    z0, v0 = bare_outputs(adapter, requests, cfg.layers[-1], cfg.fact_token)
    Z, skipped, norms = anchored_targets(Z_target, z0, v0, m, cfg.norm_anchor_skip)
    for x, s, n in zip(info, skipped.tolist(), norms.tolist()):
        x["anchor"] = {"v_norm": n, "anchor": m, "skipped": bool(s)}
    if bool(skipped.any()):
        log.warning("norm anchoring: %d of %d targets above %g × the anchor norm %.3g were not written",
                    int(skipped.sum()), len(requests), cfg.norm_anchor_skip, m)
    return Z.to(Z_target.dtype), update


for _name, _solve in SOLVES.items():
    register(MethodSpec(_name, BatchConfig, compute_batch, fold_state=add_keys, distinct_prompts=True,
                        room=alphaedit_room if _solve.keeps_keys else None))
