import numpy as np
import pytest
import torch

from factedit.core.errors import StatsError
from factedit.edit.solver import equality_constrained, solve_spd
from reference import rome_update


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (3 * d)


def test_solve_spd_matches_numpy():
    C = spd(12)
    b = torch.randn(12, dtype=torch.float64)
    np.testing.assert_allclose(solve_spd(C, b).numpy(), np.linalg.solve(C.numpy(), b.numpy()), rtol=1e-10)


def test_solve_spd_rejects_singular():
    C = torch.zeros(4, 4)
    with pytest.raises(StatsError, match="positive definite"):
        solve_spd(C, torch.ones(4))


def test_rome_closed_form_properties():
    d_model, d_ff = 6, 10
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64)
    C = spd(d_ff, 2)
    k = torch.randn(d_ff, generator=g, dtype=torch.float64)
    v = torch.randn(d_model, generator=g, dtype=torch.float64)
    D = rome_update(W, C, v, k, k)
    assert torch.allclose((W + D) @ k, v, rtol=1e-10)
    # a key C^-1-orthogonal to k is untouched
    u = torch.linalg.solve(C, k)
    z = torch.randn(d_ff, generator=g, dtype=torch.float64)
    z = z - (z @ u) / (u @ u) * u
    assert abs(float(z @ u)) < 1e-10
    assert torch.allclose(D @ z, torch.zeros(d_model, dtype=torch.float64), atol=1e-10)
    # rank one, factors reproduce the dense matrix
    sol = equality_constrained((v - W @ k)[:, None], k[:, None], C)
    assert torch.allclose(sol.left @ sol.right.T, D)
    assert torch.linalg.matrix_rank(D) == 1


def test_original_code_asymmetry():
    d_model, d_ff = 5, 8
    g = torch.Generator().manual_seed(3)
    W = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64)
    C = spd(d_ff, 4)
    k_star, k_o = torch.randn(d_ff, generator=g, dtype=torch.float64), torch.randn(d_ff, generator=g, dtype=torch.float64)
    v = torch.randn(d_model, generator=g, dtype=torch.float64)
    Cinv = torch.linalg.inv(C)  # explicit inverse only in the test, as the reference
    ref = torch.outer(v - W @ k_o, Cinv @ k_star) / (k_o @ Cinv @ k_star)
    assert torch.allclose(rome_update(W, C, v, k_star, k_o), ref, rtol=1e-9)
    assert torch.allclose((W + ref) @ k_o, v)
