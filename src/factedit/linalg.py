"""Pure tensor algebra of the editing methods (no model access).

Shapes: W (d_model, d_ff); C (d_ff, d_ff) symmetric positive definite; keys k (d_ff,);
values v, residuals δ (d_model,). Solves run in float64; nothing forms an explicit inverse.
"""

from __future__ import annotations

import torch

from .errors import StatsError

__all__ = ["solve_spd", "rome_update"]


def solve_spd(C: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ b`` for symmetric positive-definite ``C`` via Cholesky (float64)."""
    C64 = C.to(torch.float64)
    b64 = b.to(device=C.device, dtype=torch.float64)
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


def rome_update(W: torch.Tensor, C: torch.Tensor, v_star: torch.Tensor, k_dir: torch.Tensor,
                k_res: torch.Tensor) -> torch.Tensor:
    """Dense ROME update ``Δ = (v* - W k_res)(C⁻¹k_dir)ᵀ / (k_resᵀC⁻¹k_dir)`` (float64).

    ``k_dir = k_res = k*`` is the paper (r-ROME); ``k_dir = k*, k_res = k_o`` the original code;
    ``k_dir = k_res = k_o`` p-ROME. The n = 1 case of :func:`factedit.solver.equality`.
    """
    from .solver import equality

    resid = v_star.to(torch.float64) - W.to(torch.float64) @ k_res.to(torch.float64)
    return equality(resid[:, None], k_dir[:, None], C, k_res[:, None]).dense()
