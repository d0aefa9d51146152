"""The batched preservation–memorization solver shared by ROME, MEMIT, EMMET and AlphaEdit.

Every update is returned as low-rank factors ``Δ = left @ rightᵀ`` (rank ≤ n, the number of
requests), never as an n × n × d tensor. Shapes: R (d_model, n) residuals; K (d_ff, n) keys;
C (d_ff, d_ff) key second moment; P (d_ff, d_ff) projector. Solves in float64, no explicit
inverses.

* :func:`least_squares` (MEMIT): ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹``.
* :func:`equality_constrained` (EMMET; ROME is n = 1): ``Δ = R (K_resᵀ C⁻¹ K_dir)⁻¹ (C⁻¹ K_dir)ᵀ``, so
  ``(W + Δ) K_res = W K_res + R`` exactly; a ridge is added when the n × n system is
  ill-conditioned and reported.
* :func:`null_space` (AlphaEdit): ``Δ = R K1ᵀ P (K_p K_pᵀ P + K1 K1ᵀ P + αI)⁻¹``, applied as ΔP.

The math, with the deviations from the papers: docs/ALGORITHMS.md §3–6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.errors import StatsError
from ..core.offload import precise_dtype

__all__ = ["solve_spd", "Solution", "least_squares", "equality_constrained", "null_space", "null_space_basis",
           "null_space_projector", "recursive_least_squares"]


def solve_spd(C: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ b`` for symmetric positive-definite ``C`` via Cholesky (float64; on C's device)."""
    C64, b64 = _f64(C, b)
    vec = b64.ndim == 1
    if vec:
        b64 = b64[:, None]
    L, info = torch.linalg.cholesky_ex(C64)
    if int(info) != 0:
        raise StatsError(
            "the key statistics C are not positive definite (too few tokens for this layer's "
            f"width {C.shape[0]}, or degenerate text); use more tokens (--stats-tokens) or a larger corpus"
        )
    x = torch.cholesky_solve(b64, L)
    return x[:, 0] if vec else x


@dataclass
class Solution:
    """``Δ = left @ rightᵀ`` plus what the solve had to do to get there."""

    left: torch.Tensor  # (d_model, n) float64; the whole (d_model, d_ff) Δ when ``right`` is None
    right: Optional[torch.Tensor]  # (d_ff, n) float64
    ridge: float = 0.0
    condition: float = float("nan")
    memory: Optional[dict] = None  # what the solve adds to the method's per-layer state (rls: its K and U)

    def dense(self) -> torch.Tensor:
        return self.left if self.right is None else self.left @ self.right.T


def _f64(*xs):
    """The operands in float64 (float32 where the device has none) on the first one's device."""
    dev = xs[0].device
    dt = precise_dtype(dev)
    return [x.to(device=dev, dtype=dt) for x in xs]


def least_squares(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float) -> Solution:
    """MEMIT: minimise ``λ‖ΔK0‖² + ‖(W+Δ)K - V‖²`` → ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹``."""
    C, R, K = _f64(C, R, K)  # on the statistics' device
    A = lam * C + K @ K.T
    right = solve_spd(A, K)  # (d_ff, n) = A⁻¹ K  (A symmetric, so Δ = R (A⁻¹K)ᵀ)
    return Solution(R, right)


def equality_constrained(R: torch.Tensor, K_dir: torch.Tensor, C: torch.Tensor, K_res: Optional[torch.Tensor] = None,
             max_condition: float = 1e10, ridge: Optional[float] = None) -> Solution:
    """EMMET / ROME: ``W_hat K_res = W K_res + R`` exactly, least change in the C⁻¹ metric.

    ``K_res`` defaults to ``K_dir`` (EMMET, r-ROME). When ``M = K_resᵀ C⁻¹ K_dir`` has a
    condition number above ``max_condition`` (near-duplicate keys, e.g. one subject in several
    requests) a ridge ``ε·tr(M)/n`` is added and reported in :attr:`Solution.ridge`.
    """
    C, R, K_dir = _f64(C, R, K_dir)
    K_res = K_dir if K_res is None else _f64(C, K_res)[1]
    U = solve_spd(C, K_dir)  # (d_ff, n) C⁻¹ K_dir
    M = K_res.T @ U  # (n, n)
    n = M.shape[0]
    svals = torch.linalg.svdvals(M)
    cond = float(svals[0] / svals[-1]) if float(svals[-1]) > 0 else float("inf")
    eps = 0.0
    if ridge is not None:
        eps = ridge
    elif cond > max_condition:
        eps = 1e-6 * float(torch.trace(M).abs()) / n
    if eps:
        M = M + eps * torch.eye(n, dtype=M.dtype, device=M.device)
    if not torch.isfinite(M).all():
        raise StatsError("non-finite key system in the equality-constrained solve")
    # Δ = R M⁻¹ Uᵀ  →  left = R M⁻¹ = (M⁻ᵀ Rᵀ)ᵀ
    left = torch.linalg.solve(M.T, R.T).T
    return Solution(left, U, eps, cond)


def null_space_basis(C: torch.Tensor, threshold: float = 1e-2) -> torch.Tensor:
    """The eigenvectors of C with eigenvalue < threshold, (d_ff, k) (float64 on C's device)."""
    evals, evecs = torch.linalg.eigh(_f64(C)[0])
    return evecs[:, evals < threshold]


def null_space_projector(C: torch.Tensor, threshold: float = 1e-2) -> torch.Tensor:
    """AlphaEdit's projector ``P = U Uᵀ`` onto the eigenvectors of C with eigenvalue < threshold."""
    U = null_space_basis(C, threshold)
    return U @ U.T


def null_space(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, G_prev: Optional[torch.Tensor] = None,
               alpha: float = 1.0) -> Solution:
    """AlphaEdit: ``Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹``; the applied update is ``ΔP``.

    ``G_prev = K_p K_pᵀ`` (d_ff, d_ff) is the running key memory of earlier edits (kept as a
    sum so memory does not grow with the number of edits). Returns the factors of the
    *applied* update ``ΔP = R · (P A⁻ᵀ P K)ᵀ`` with ``A = G_prev P + K Kᵀ P + αI``.
    """
    P, R, K = _f64(P, R, K)
    G = K @ K.T
    if G_prev is not None:
        G = G + G_prev.to(device=G.device, dtype=G.dtype)
    A = G @ P + alpha * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    X = torch.linalg.solve(A.T, P @ K)  # (d_ff, n) = A⁻ᵀ P K
    return Solution(R, P @ X)


def recursive_least_squares(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float,
                            memory: Optional[dict] = None) -> Solution:
    """Refit every edit so far against the weights before the first: with the memory ``A = Σ K_i K_iᵀ``,
    ``B = Σ U_i K_iᵀ`` of the earlier edits (``U_i`` the change each asked of its keys' outputs, measured from
    those weights), ``D_prev = B (λC + A)⁻¹`` is the cumulative update so far and this edit asks
    ``U = D_prev K + R`` (its keys' outputs as they are now, plus R). Then ``A' = A + K Kᵀ``, ``B' = B + U Kᵀ``,
    ``D = B' (λC + A')⁻¹`` minimises ``λ‖D K0‖² + Σ_i ‖D K_i − U_i‖²`` over all edits, and the applied update
    is ``D − D_prev`` (dense). The first edit is MEMIT's :func:`least_squares` exactly. ``Solution.memory`` is
    ``{"K", "U"}``, what :func:`~factedit.edit.methods.batch.add_keys` folds into the state."""
    C, R, K = _f64(C, R, K)
    A = K @ K.T
    if memory is not None:
        A_prev, B_prev = (memory[k].to(device=C.device, dtype=C.dtype) for k in ("A", "B"))
        D_prev = solve_spd(lam * C + A_prev, B_prev.T).T
        U = D_prev @ K + R
        A, B = A_prev + A, B_prev + U @ K.T
        D = solve_spd(lam * C + A, B.T).T - D_prev
    else:
        U = R
        D = solve_spd(lam * C + A, (U @ K.T).T).T
    return Solution(D, None, memory={"K": K, "U": U})
