"""ROME in three variants (ALGORITHMS.md §2–3).

* ``r-rome`` (default): the paper's equation, k* in direction and residual.
* ``rome``: the original research code, ``Δ = (v* − W k_o)(C⁻¹k*)ᵀ / (k_oᵀ C⁻¹ k*)``.
* ``p-rome``: k_o everywhere (no prefix averaging of the key).

With ``v* = W k_res + δ`` (δ from the value optimisation) all three are the rank-one
``Δ = δ (C⁻¹k_dir)ᵀ / (k_resᵀ C⁻¹ k_dir)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from ...core.arch import ArchSpec
from ..deltas import LayerDelta
from ...core.errors import MethodError
from ..solver import equality
from ..values import ValueConfig

__all__ = ["ROMEConfig", "ROME_VARIANTS", "compute_rome", "default_layer", "default_stats_tokens", "rome_norm_ratio"]

ROME_VARIANTS = ("r-rome", "rome", "p-rome")


def default_layer(n_layers: int) -> int:
    """Edit layer from depth: ~17% of the way up (GPT-J 28 → 5 as in ROME, SmolLM2 30 → 5)."""
    return max(0, min(n_layers - 1, round(0.17 * n_layers)))


def default_stats_tokens(d_ff: int) -> int:
    """Tokens for C from width: at least 100k and 64 per key dimension (C must be well conditioned)."""
    return max(100_000, 64 * d_ff)


@dataclass(frozen=True)
class ROMEConfig:
    """Configuration of a ROME edit. ``None`` fields are derived from the model.

    Attributes:
        variant: ``"r-rome"`` (default), ``"rome"`` or ``"p-rome"``.
        layer: edited layer; default :func:`default_layer` of the depth.
        value: the value-optimisation knobs (steps, lr, KL weight, clamp, ...).
        context_lengths: ``(tokens, count)`` of model-generated context prefixes.
        essence_prompts: prompts for the essence-drift KL (``{}`` = subject).
        fact_token: ``"subject_last"`` (default), ``"subject_first"`` or ``"last"``.
        stats_corpus: corpus spec for C (see :mod:`factedit.corpus`); ``None`` = ``"auto"``.
        stats_tokens: tokens for C; default :func:`default_stats_tokens` of the width.
        seed: seed of the context templates.
        arch: explicit module layout for architectures factedit does not know.
    """

    variant: str = "r-rome"
    layer: Optional[int] = None
    value: ValueConfig = field(default_factory=ValueConfig)
    context_lengths: Tuple[Tuple[int, int], ...] = ((5, 10), (10, 10))
    essence_prompts: Tuple[str, ...] = ("{} is a",)
    fact_token: str = "subject_last"
    stats_corpus: Optional[str] = None
    stats_tokens: Optional[int] = None
    seed: int = 0
    arch: Optional[ArchSpec] = None

    def __post_init__(self):
        if self.variant not in ROME_VARIANTS:
            raise MethodError(f"unknown ROME variant {self.variant!r}; choose one of {', '.join(ROME_VARIANTS)}")
        for p in self.essence_prompts:
            if p.count("{}") != 1:
                raise MethodError(f"essence prompt must contain one '{{}}': {p!r}")

    def resolved(self, adapter) -> "ROMEConfig":
        """A copy with every ``None`` default filled in from the model."""
        layer = default_layer(adapter.n_layers) if self.layer is None else adapter.check_layer(self.layer)
        tokens = self.stats_tokens or default_stats_tokens(adapter.d_ff)
        return replace(self, layer=layer, stats_tokens=tokens)

    @property
    def layers(self) -> Tuple[int, ...]:
        return (self.layer,) if self.layer is not None else ()


def compute_rome(C, values, index: int, variant: str, layer: int) -> LayerDelta:
    """The rank-one delta of request ``index`` of a :class:`~factedit.values.ValueResult`."""
    k_star, k_o, delta = values.k_star[index], values.k_o[index], values.delta[index]
    if variant == "r-rome":
        k_dir, k_res = k_star, k_star
    elif variant == "rome":
        k_dir, k_res = k_star, k_o
    elif variant == "p-rome":
        k_dir, k_res = k_o, k_o
    else:
        raise MethodError(f"unknown ROME variant {variant!r}")
    sol = equality(delta[:, None], k_dir[:, None], C, k_res[:, None])  # ROME = the n = 1 equality case
    return LayerDelta(layer, sol.left.float(), sol.right.float())


def rome_norm_ratio(adapter, C, requests, templates, layer: int):
    """``|k*ᵀC⁻¹k* / k_oᵀC⁻¹k*|`` per request: ‖Δ_rome‖ / ‖Δ_r-rome‖ for the same δ (ALGORITHMS.md §3),
    from the keys alone (no optimisation). Large values flag the original code's disabling edits."""
    from ..keys import template_keys
    from ..solver import solve_spd

    k_star, _ = template_keys(adapter, requests, templates, layer)
    k_o, _ = template_keys(adapter, requests, ["{}"], layer)
    U = solve_spd(C, k_star.T.double())  # (d_ff, n) C⁻¹ k*
    return ((k_star.double().T * U).sum(0) / (k_o.double().T * U).sum(0)).abs()
