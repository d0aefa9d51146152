"""ROME in three variants (docs/ALGORITHMS.md §2–3), each a registered method.

* ``r-rome`` (default): the paper's equation, k* in direction and residual.
* ``rome``: the original research code, ``Δ = (v* − W k_o)(C⁻¹k*)ᵀ / (k_oᵀ C⁻¹ k*)``.
* ``p-rome``: k_o everywhere (no prefix averaging of the key).

With ``v* = W k_res + δ`` (δ from the value optimisation) all three are the rank-one
``Δ = δ (C⁻¹k_dir)ᵀ / (k_resᵀ C⁻¹ k_dir)`` (:func:`rome_delta`); :func:`compute_rome` is the pipeline
(statistics, templates, δ, then the closed form).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

import torch

from ...core.errors import MethodError
from ..deltas import LayerDelta
from ..results import Computed
from ..solver import equality_constrained
from ..values import ValueConfig, ValueProblem, optimize_values
from ..verify import retry_config
from .base import DEPTH_RULE, GIVEN, StatsFields, default_layer, default_stats_tokens
from .registry import MethodSpec, register

__all__ = ["ROMEConfig", "ROME_VARIANTS", "rome_delta", "compute_rome", "prefetch_targets", "rome_norm_ratio"]

ROME_VARIANTS = ("r-rome", "rome", "p-rome")


@dataclass(frozen=True)
class ROMEConfig(StatsFields):
    """Configuration of a ROME edit. ``None`` fields are derived from the model. Also has the fields of
    :class:`~factedit.edit.methods.base.StatsFields` (statistics corpus and tokens, template seed, layer rule).

    Attributes:
        method: ``"r-rome"`` (default), ``"rome"`` or ``"p-rome"``.
        layer: edited layer; default :func:`~factedit.edit.methods.base.default_layer` of the depth.
        value: the value-optimisation knobs (steps, lr, KL weight, clamp, ...).
        context_lengths: ``(tokens, count)`` of model-generated context prefixes.
        essence_prompts: prompts for the essence-drift KL (``{}`` = subject).
        fact_token: ``"subject_last"`` (default), ``"subject_first"`` or ``"last"``.
        mom2_adjustment: use the key statistics C (default). ``False`` writes the update with C = I, the
            "simple ROME" of the original code's ``mom2_adjustment: false`` (what some EasyEdit hparams files
            set): no statistics are computed, and locality suffers (docs/ALGORITHMS.md §3).
    """

    method: str = "r-rome"
    layer: Optional[int] = None
    value: ValueConfig = field(default_factory=ValueConfig)
    context_lengths: Tuple[Tuple[int, int], ...] = ((5, 10), (10, 10))
    essence_prompts: Tuple[str, ...] = ("{} is a",)
    fact_token: str = "subject_last"
    mom2_adjustment: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.method not in ROME_VARIANTS:
            raise MethodError(f"unknown ROME variant {self.method!r}; choose one of {', '.join(ROME_VARIANTS)}")
        for p in self.essence_prompts:
            if p.count("{}") != 1:
                raise MethodError(f"essence prompt must contain one '{{}}': {p!r}")

    def resolved(self, adapter) -> "ROMEConfig":
        """A copy with every ``None`` default filled in from the model."""
        layer = default_layer(adapter.n_layers) if self.layer is None else adapter.check_layer(self.layer)
        rule = self.layer_rule or (DEPTH_RULE if self.layer is None else GIVEN)
        tokens = self.stats_tokens or default_stats_tokens(adapter.d_ff)
        return replace(self, layer=layer, stats_tokens=tokens, layer_rule=rule)

    @property
    def layers(self) -> Tuple[int, ...]:
        return (self.layer,) if self.layer is not None else ()


def rome_delta(C, values, index: int, variant: str, layer: int) -> LayerDelta:
    """The closed form: the rank-one delta of request ``index`` of a :class:`~factedit.edit.values.ValueResult`
    for ROME variant ``variant``."""
    k_star, k_o, delta = values.k_star[index], values.k_o[index], values.delta[index]
    if variant == "r-rome":
        k_dir, k_res = k_star, k_star
    elif variant == "rome":
        k_dir, k_res = k_star, k_o
    elif variant == "p-rome":
        k_dir, k_res = k_o, k_o
    else:
        raise MethodError(f"unknown ROME variant {variant!r}")
    sol = equality_constrained(delta[:, None], k_dir[:, None], C, k_res[:, None])  # ROME = the n = 1 case
    return LayerDelta(layer, sol.left.float(), sol.right.float())
def _targets(adapter, caches, cfg: ROMEConfig) -> tuple:
    templates = caches.templates(cfg.seed, cfg.context_lengths)
    memo = caches.target_memo(cfg.layer, templates, cfg.value, cfg.essence_prompts, cfg.fact_token, site="w_out")
    return templates, memo


def compute_rome(adapter, caches, requests: Sequence, cfg: ROMEConfig, state=None) -> Computed:
    """A ROME edit of one request: statistics, templates, the target δ (memoised per weights, or
    prefetched by :func:`prefetch_targets`), then the closed form of ``cfg.method`` (:func:`rome_delta`)."""
    if len(requests) != 1:
        raise MethodError("ROME edits one request at a time; pass one Request (or use Editor.edit)")
    req = requests[0]
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    if cfg.mom2_adjustment:
        C = caches.mom2(cfg.layer, **cfg.stats_args)  # on W_out's device, like the keys
    else:  # C = I: the original code's mom2_adjustment: false
        dev = adapter.w_out_device(cfg.layer)
        C = torch.eye(adapter.d_ff, dtype=getattr(torch, cfg.stats_dtype), device=dev)
    timings["stats"] = time.perf_counter() - t
    t = time.perf_counter()
    templates, memo = _targets(adapter, caches, cfg)
    timings["templates"] = time.perf_counter() - t
    t = time.perf_counter()
    values = memo.get(req)  # prefetched, or computed before on the same weights
    if values is None:
        problem = ValueProblem(adapter, cfg.layer, [req], templates, cfg.essence_prompts, cfg.fact_token,
                               bare_weight=cfg.value.bare_weight)
        values = memo[req] = optimize_values(problem, cfg.value)
    timings["values"] = time.perf_counter() - t
    t = time.perf_counter()
    delta = rome_delta(C, values, 0, cfg.method, cfg.layer)
    timings["solve"] = time.perf_counter() - t
    info = [{"nll_before": values.nll_before[0], "nll_after": values.nll_after[0], "steps": values.steps_each[0],
             "delta_v_norm": float(values.delta[0].norm()), "v0_norm": float(values.v0[0].norm())}]
    return Computed([delta], values, info, timings, cfg, C, keys={cfg.layer: values.k_star[0][:, None]})


def prefetch_targets(adapter, caches, requests: Sequence, cfg: ROMEConfig, batch_size: int = 16) -> None:
    """Optimise the targets (δ) of single ROME edits of ``requests`` on the current weights,
    ``batch_size`` requests per optimisation, into the target memo that :func:`compute_rome`
    reads (any edit in between changes the weights' fingerprint and leaves them unused). The
    optimisations of a batch are independent (own δ, own loss, own early stop), so this only amortises
    the per-forward cost; the δ equal single-request ones up to float rounding."""
    templates, memo = _targets(adapter, caches, cfg)
    todo = list(dict.fromkeys(r for r in requests if r not in memo))
    step = max(1, batch_size)
    for i in range(0, len(todo), step):
        chunk = todo[i: i + step]
        problem = ValueProblem(adapter, cfg.layer, chunk, templates, cfg.essence_prompts, cfg.fact_token,
                               bare_weight=cfg.value.bare_weight)
        values = optimize_values(problem, cfg.value)
        for j, r in enumerate(chunk):
            memo[r] = values.select(j)


def rome_norm_ratio(adapter, C, requests, templates, layer: int):
    """``|k*ᵀC⁻¹k* / k_oᵀC⁻¹k*|`` per request: ‖Δ_rome‖ / ‖Δ_r-rome‖ for the same δ (docs/ALGORITHMS.md §3),
    from the keys alone (no optimisation). Large values flag the original code's disabling edits."""
    from ..keys import template_keys
    from ..solver import solve_spd

    k_star, _ = template_keys(adapter, requests, templates, layer)
    k_o, _ = template_keys(adapter, requests, ["{}"], layer)
    U = solve_spd(C, k_star.T.double())  # (d_ff, n) C⁻¹ k*
    return ((k_star.double().T * U).sum(0) / (k_o.double().T * U).sum(0)).abs()


for _name in ROME_VARIANTS:
    register(MethodSpec(_name, ROMEConfig, compute_rome, single_request=True, retry=retry_config,
                        prefetch=prefetch_targets, norm_limit=True), default=_name == "r-rome")
