"""Reference implementations used only by the tests."""

import torch

from factedit.edit.solver import equality_constrained


def rome_update(W: torch.Tensor, C: torch.Tensor, v_star: torch.Tensor, k_dir: torch.Tensor,
                k_res: torch.Tensor) -> torch.Tensor:
    """Dense ROME update ``Δ = (v* - W k_res)(C⁻¹k_dir)ᵀ / (k_resᵀC⁻¹k_dir)`` (float64), as the n = 1
    case of :func:`factedit.edit.solver.equality`.

    ``k_dir = k_res = k*`` is the paper (r-ROME); ``k_dir = k*, k_res = k_o`` the original code;
    ``k_dir = k_res = k_o`` p-ROME.
    """
    resid = v_star.to(torch.float64) - W.to(torch.float64) @ k_res.to(torch.float64)
    return equality_constrained(resid[:, None], k_dir[:, None], C, k_res[:, None]).dense()
