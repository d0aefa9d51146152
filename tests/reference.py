"""Reference closed forms, used only by the tests.

Each function is the formula itself, written out in float64 NumPy with explicit inverses
(``numpy.linalg.inv``) or ``numpy.linalg.eigh``: no Cholesky solves, no low-rank factors, and nothing
imported from factedit (``tests/test_linalg.py`` checks this module's imports), so a test that compares
factedit's result with one of these compares it with something computed independently of the code under
test. Inputs may be torch tensors or arrays of any float dtype (they are converted to float64 on the CPU);
results are float64 CPU torch tensors.

Shapes: ``W`` (d_model, d_ff) the edited W_out; ``C`` (d_ff, d_ff) the keys' second moment; keys ``k``
(d_ff,) or ``K`` (d_ff, n), one column per request; values ``v`` (d_model,); residuals ``R`` (d_model, n);
``P`` (d_ff, d_ff) a projector. The formulas are those of docs/ALGORITHMS.md §3–6 (shared/docs).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["f64", "second_moment", "rome_update", "rank_one_update", "memit_update", "emmet_update",
           "null_space_projector", "alphaedit_update", "rel"]


def f64(x) -> np.ndarray:
    """``x`` as a float64 NumPy array (a torch tensor is detached and copied to the CPU first)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def second_moment(X) -> torch.Tensor:
    """Key statistics ``C = (1/N) Σᵢ xᵢ xᵢᵀ = Xᵀ X / N`` of the rows of ``X`` (N, d) → (d, d)."""
    X = f64(X)
    return _t(X.T @ X / X.shape[0])


def rank_one_update(C, r, k_dir, k_res) -> torch.Tensor:
    """ROME's rank-one update for a residual ``r`` (d_model,):
    ``Δ = r (C⁻¹ k_dir)ᵀ / (k_resᵀ C⁻¹ k_dir)`` → (d_model, d_ff), so ``Δ k_res = r``."""
    Cinv = np.linalg.inv(f64(C))
    u = Cinv @ f64(k_dir)  # (d_ff,) C⁻¹ k_dir
    return _t(np.outer(f64(r), u) / (f64(k_res) @ u))


def rome_update(W, C, v_star, k_dir, k_res) -> torch.Tensor:
    """ROME: ``Δ = (v* − W k_res)(C⁻¹ k_dir)ᵀ / (k_resᵀ C⁻¹ k_dir)`` → (d_model, d_ff); ``(W + Δ) k_res = v*``.

    ``k_dir = k_res = k*`` is the paper (r-ROME); ``k_dir = k*, k_res = k_o`` the original code (rome);
    ``k_dir = k_res = k_o`` p-ROME. With ``v* = W k_res + δ`` the residual is δ.
    """
    return rank_one_update(C, f64(v_star) - f64(W) @ f64(k_res), k_dir, k_res)


def memit_update(R, K, C, lam: float) -> torch.Tensor:
    """MEMIT: ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹`` → (d_model, d_ff), the minimiser of ``λ‖Δ K0‖² + ‖Δ K − R‖²``
    for ``K0 K0ᵀ = C``. R (d_model, n), K (d_ff, n)."""
    R, K, C = f64(R), f64(K), f64(C)
    return _t(R @ K.T @ np.linalg.inv(lam * C + K @ K.T))


def emmet_update(R, K_dir, C, K_res=None, ridge: float = 0.0) -> torch.Tensor:
    """EMMET (ROME is n = 1): ``Δ = R (K_resᵀ C⁻¹ K_dir + εI)⁻¹ (C⁻¹ K_dir)ᵀ`` → (d_model, d_ff).

    ``K_res`` defaults to ``K_dir`` (``Δ = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹``, C symmetric); with ``ε = 0`` (no ridge)
    ``Δ K_res = R`` exactly. R (d_model, n), K_dir and K_res (d_ff, n).
    """
    R, K_dir, C = f64(R), f64(K_dir), f64(C)
    K_res = K_dir if K_res is None else f64(K_res)
    U = np.linalg.inv(C) @ K_dir  # (d_ff, n) C⁻¹ K_dir
    M = K_res.T @ U  # (n, n)
    return _t(R @ np.linalg.inv(M + ridge * np.eye(M.shape[0])) @ U.T)


def null_space_projector(C, threshold: float) -> torch.Tensor:
    """AlphaEdit's ``P = U Uᵀ`` (d_ff, d_ff), U the eigenvectors of C (``numpy.linalg.eigh``) whose
    eigenvalue is below ``threshold``."""
    evals, evecs = np.linalg.eigh(f64(C))
    U = evecs[:, evals < threshold]
    return _t(U @ U.T)


def alphaedit_update(R, K, P, G_prev=None, alpha: float = 1.0) -> torch.Tensor:
    """AlphaEdit's *applied* update ``Δ P`` (d_model, d_ff), with
    ``Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹``; ``G_prev = K_p K_pᵀ`` (d_ff, d_ff) the earlier edits' keys
    (``None``: no earlier edit). R (d_model, n), K (d_ff, n)."""
    R, K, P = f64(R), f64(K), f64(P)
    G = K @ K.T + (0.0 if G_prev is None else f64(G_prev))
    D = R @ K.T @ P @ np.linalg.inv(G @ P + alpha * np.eye(P.shape[0]))
    return _t(D @ P)


def rel(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius) in float64."""
    a, b = f64(a), f64(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

