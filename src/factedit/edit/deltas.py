"""Edits as values: low-rank weight deltas that apply atomically and revert bit-exactly.

    d = LayerDelta(layer=5, left=δ[:, None], right=u[:, None])    # Δ = left @ rightᵀ
    applied = apply_deltas(adapter, [d])     # all layers or none
    applied.revert()                         # original bits restored
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..core.errors import FactEditError

__all__ = ["LayerDelta", "AppliedEdit", "apply_deltas", "rounding_error", "ROUNDING_WARN"]

#: a written update that loses more than this fraction of its effect on its own keys to the weights' dtype
#: is warned about (bf16 rounds each weight to 8 significant bits; an update much smaller than the weights
#: it is added to then loses a visible part of itself)
ROUNDING_WARN = 0.05

log = logging.getLogger(__name__)


@dataclass
class LayerDelta:
    """``Δ = left @ rightᵀ`` for W_out of one layer (stored low-rank, float32).

    Attributes:
        layer: layer index.
        left: (d_model, r) factor.
        right: (d_ff, r) factor.
    """

    layer: int
    left: torch.Tensor
    right: Optional[torch.Tensor]

    def __post_init__(self):
        if self.left.ndim == 1:
            self.left = self.left[:, None]
        if self.right is not None:
            if self.right.ndim == 1:
                self.right = self.right[:, None]
            if self.left.shape[1] != self.right.shape[1]:
                raise ValueError(f"factor ranks differ: {self.left.shape} vs {self.right.shape}")

    @classmethod
    def from_dense(cls, layer: int, matrix: torch.Tensor) -> "LayerDelta":
        """A full-rank delta (fine-tuning): ``left`` holds Δ itself and ``right`` is None."""
        return cls(layer, matrix.to(torch.float32), None)

    @property
    def rank(self) -> int:
        return int(self.left.shape[1]) if self.right is not None else int(min(self.left.shape))

    def dense(self) -> torch.Tensor:
        """The (d_model, d_ff) matrix Δ in float32."""
        if self.right is None:
            return self.left
        return (self.left.to(torch.float64) @ self.right.to(torch.float64).T).to(torch.float32)

    def negated(self) -> "LayerDelta":
        """``-Δ`` (undoes this delta when added)."""
        return LayerDelta(self.layer, -self.left, self.right)

    def is_finite(self) -> bool:
        """No NaN/Inf in the factors."""
        return bool(torch.isfinite(self.left).all()) and (self.right is None or bool(torch.isfinite(self.right).all()))

    def norm(self) -> float:
        """Frobenius norm ‖Δ‖."""
        return float(torch.linalg.matrix_norm(self.dense()))


@dataclass
class AppliedEdit:
    """Deltas written into a model, with the original matrices kept for an exact revert."""

    adapter: object
    deltas: List[LayerDelta]
    originals: Dict[int, torch.Tensor] = field(repr=False)
    reverted: bool = False

    def revert(self) -> None:
        """Restore every touched matrix to its original bits (idempotent)."""
        if self.reverted:
            return
        for layer, orig in self.originals.items():
            if torch.equal(self.adapter.w_out_stored(layer), orig):
                continue  # never written (a write that failed), or already back: nothing to restore
            self.adapter.set_w_out(layer, orig)
        self.reverted = True


def apply_deltas(adapter, deltas: Sequence[LayerDelta]) -> AppliedEdit:
    """Add each delta to its layer's W_out. On any failure (including a non-finite result)
    every touched matrix is restored and the error re-raised."""
    originals: Dict[int, torch.Tensor] = {}
    try:
        for d in deltas:
            adapter.check_layer(d.layer)
            if d.layer not in originals:
                originals[d.layer] = adapter.w_out_stored(d.layer).clone()
            dense = d.dense()
            if not torch.isfinite(dense).all():
                raise FactEditError(f"the update for layer {d.layer} contains NaN/Inf; nothing was changed")
            adapter.add_to_w_out(d.layer, dense)  # refuses a result that overflows the dtype
    except BaseException:
        AppliedEdit(adapter, list(deltas), originals).revert()
        raise
    return AppliedEdit(adapter, list(deltas), originals)


def rounding_error(applied: AppliedEdit, keys: Dict[int, torch.Tensor]) -> Dict[str, float]:
    """Per layer, how much of the update was lost when it was written in the weights' dtype, measured on
    the keys it was computed for: ``‖(Ŵ − W) K − Δ K‖ / ‖Δ K‖`` with ``Ŵ`` the stored edited matrix, ``W``
    the one before and ``Δ`` the exact (float32 factors, float64 product) update. For ROME, ``K = k*`` and
    this is ``‖Ŵ k* − v*‖ / ‖v* − W k*‖``. 0 in float32 up to float32 rounding; bf16 shows what it costs."""
    ad = applied.adapter
    by_layer: Dict[int, torch.Tensor] = {}
    for d in applied.deltas:
        by_layer[d.layer] = by_layer.get(d.layer, 0) + d.dense().double()
    out = {}
    for layer, K in keys.items():
        if layer not in applied.originals or layer not in by_layer:
            continue
        before, after = applied.originals[layer], ad.w_out_stored(layer)
        dev = after.device
        diff = after.to(torch.float64) - before.to(device=dev, dtype=torch.float64)
        if ad.spec.fan_in_fan_out:
            diff = diff.T
        K = K.to(device=dev, dtype=torch.float64)
        intended = by_layer[layer].to(dev) @ K
        out[str(layer)] = float((diff @ K - intended).norm() / intended.norm().clamp_min(1e-300))
    return out
