"""The batched solver against closed forms on small random matrices."""

import numpy as np
import pytest
import torch

from factedit.edit.solver import equality_constrained, least_squares, null_space, null_space_projector
from reference import alphaedit_update, emmet_update, memit_update, rank_one_update, rel
from reference import null_space_projector as projector_ref

D_MODEL, D_FF, N0 = 6, 12, 200


def _setup(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    K0 = torch.randn(D_FF, N0, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / N0
    K1 = torch.randn(D_FF, n, generator=g, dtype=torch.float64)
    R = torch.randn(D_MODEL, n, generator=g, dtype=torch.float64)
    return K0, C, K1, R


@pytest.mark.parametrize("n,lam", [(1, 10.0), (4, 100.0), (9, 15000.0)])
def test_memit_equals_stacked_least_squares(n, lam):
    K0, C, K1, R = _setup(n)
    sol = least_squares(R, K1, C, lam)
    # the closed form Δ = R Kᵀ (λC + K Kᵀ)⁻¹ with an explicit inverse
    assert rel(sol.dense(), memit_update(R, K1, C, lam)) < 1e-9
    # minimise λ‖Δ K0'‖² + ‖Δ K1 − R‖² with K0' K0'ᵀ = C, as one stacked least-squares problem
    A = np.concatenate([np.sqrt(lam) * (K0 / np.sqrt(N0)).numpy().T, K1.numpy().T])  # (N0 + n, d_ff)
    B = np.concatenate([np.zeros((N0, D_MODEL)), R.numpy().T])
    ref = np.linalg.lstsq(A, B, rcond=None)[0].T  # Δ (d_model, d_ff)
    np.testing.assert_allclose(sol.dense().numpy(), ref, rtol=1e-6, atol=1e-9)
    assert sol.left.shape == (D_MODEL, n) and sol.right.shape == (D_FF, n)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_emmet_satisfies_every_constraint(n):
    K0, C, K1, R = _setup(n, 1)
    sol = equality_constrained(R, K1, C)
    D = sol.dense()
    assert rel(D @ K1, R) < 1e-4 and sol.ridge == 0.0
    # and it is the minimum-change solution in the C metric: closed form with explicit inverses
    assert torch.allclose(D, emmet_update(R, K1, C), rtol=1e-6, atol=1e-9)


def test_emmet_reports_ridge_for_duplicate_keys():
    K0, C, K1, R = _setup(3, 2)
    K = torch.cat([K1[:, :1], K1[:, :1] * (1 + 1e-9), K1[:, 2:]], dim=1)  # two near-identical keys
    sol = equality_constrained(R, K, C, max_condition=1e8)
    assert sol.ridge > 0 and sol.condition > 1e8
    assert torch.isfinite(sol.dense()).all()
    # the ridge reported is the one applied: Δ = R (KᵀC⁻¹K + εI)⁻¹ (C⁻¹K)ᵀ, explicit inverses. The ridged
    # n × n system still has condition ~1e6 (ε = 1e-6 tr/n): 1e-8 rather than 1e-9 (measured 2e-10)
    assert rel(sol.dense(), emmet_update(R, K, C, ridge=sol.ridge)) < 1e-8


def test_emmet_with_more_requests_than_key_dimensions_warns_and_fits(caplog):
    """n > d_ff: M = KᵀC⁻¹K has rank ≤ d_ff, so the n equalities cannot all hold; the method says so by name and
    solves MEMIT's least squares with λ = its ridge, or MEMIT's default weight when no ridge is set (the automatic
    vanishing ridge broke the embedded model at 2,000 requests); below d_ff the exact solve is untouched."""
    import logging
    from types import SimpleNamespace

    from factedit.edit.methods.batch import SOLVES

    n = D_FF + 4
    K0, C, K1, R = _setup(n, 5)
    assert int(torch.linalg.matrix_rank(K1.T @ torch.linalg.solve(C, K1))) == D_FF  # singular n × n system
    for ridge, lam in ((None, 1000.0), (0.5, 0.5)):
        cfg = SimpleNamespace(max_condition=1e8, ridge=ridge, mom2_update_weight=1000.0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="factedit.edit.methods.batch"):
            sol = SOLVES["emmet"].solve(R, K1, C, 3, cfg, None, None)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"EMMET layer 3: {n} requests in one batch but keys of {D_FF} dimensions" in said
        assert "cannot all hold" in said and f"λ = {lam:g}" in said and sol.ridge == lam
        # the closed forms with explicit inverses: MEMIT's with λ, and EMMET's with the ridge λ (push-through)
        assert rel(sol.dense(), memit_update(R, K1, C, lam)) < 1e-8
        assert rel(sol.dense(), emmet_update(R, K1, C, ridge=lam)) < 1e-6
    caplog.clear()
    cfg = SimpleNamespace(max_condition=1e8, ridge=None, mom2_update_weight=1000.0)
    with caplog.at_level(logging.WARNING, logger="factedit.edit.methods.batch"):
        sol = SOLVES["emmet"].solve(R[:, :D_FF - 2], K1[:, :D_FF - 2], C, 3, cfg, None, None)
    assert "cannot all hold" not in " ".join(r.getMessage() for r in caplog.records)
    assert rel(sol.dense() @ K1[:, :D_FF - 2], R[:, :D_FF - 2]) < 1e-4  # exact below d_ff


@pytest.mark.parametrize("n,eps", [(5, 0.1), (D_FF + 4, 0.1), (D_FF + 4, 100.0)])
def test_emmet_with_a_ridge_is_memit_with_that_lambda(n, eps):
    """EMMET's ridge is MEMIT's λ: ``R (KᵀC⁻¹K + εI)⁻¹ KᵀC⁻¹ = R Kᵀ (εC + KKᵀ)⁻¹`` (push-through identity), so the
    authors' always-on ``emmet_lambda`` (docs/ALGORITHMS.md §5) is MEMIT with λ = ε, below and above n = d_ff."""
    K0, C, K1, R = _setup(n, 6)
    sol = equality_constrained(R, K1, C, ridge=eps)
    assert sol.ridge == eps
    assert rel(sol.dense(), memit_update(R, K1, C, eps)) < 1e-8


def test_emmet_default_past_the_key_dimensions_is_least_squares_without_preservation():
    """n > d_ff with the automatic ridge (1e-6·tr M/n): MEMIT with that vanishing λ, i.e. (to 1e-3) the plain
    least-squares fit ``Δ = R Kᵀ (KKᵀ)⁻¹`` of the n targets, which ignores the preserved keys (C drops out)."""
    n = D_FF + 4
    K0, C, K1, R = _setup(n, 7)
    sol = equality_constrained(R, K1, C, max_condition=1e8)
    assert 0 < sol.ridge < 1e-4
    plain = torch.from_numpy(np.linalg.lstsq(K1.numpy().T, R.numpy().T, rcond=None)[0].T)
    assert rel(sol.dense(), plain) < 1e-3
    assert rel(sol.dense(), memit_update(R, K1, C, sol.ridge)) < 1e-8


def test_rome_through_batched_solver_equals_single_edit_rome():
    K0, C, K1, R = _setup(1, 3)
    k, r = K1[:, 0], R[:, 0]
    rome = rank_one_update(C, r, k, k)  # the rank-one ROME update r (C⁻¹k)ᵀ / (kᵀC⁻¹k), explicit inverse
    assert torch.allclose(equality_constrained(R, K1, C).dense(), rome, rtol=1e-9)
    ko = torch.randn(D_FF, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    orig = rank_one_update(C, r, k, ko)  # the original code's asymmetric denominator kₒᵀC⁻¹k
    assert torch.allclose(equality_constrained(R, K1, C, ko[:, None]).dense(), orig, rtol=1e-9)


def test_alphaedit_update_preserves_protected_keys():
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(D_FF, D_FF, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.linspace(1.0, 5.0, 8), torch.full((4,), 1e-4)]).double()
    C = Q @ torch.diag(evals) @ Q.T
    K0 = Q[:, :8] @ torch.randn(8, 50, generator=g, dtype=torch.float64)  # keys in the preserved subspace
    P = null_space_projector(C, threshold=1e-2)
    assert torch.allclose(P @ P, P, atol=1e-10) and round(float(torch.trace(P))) == 4
    assert torch.allclose(P, projector_ref(C, 1e-2), atol=1e-10)  # U Uᵀ from numpy.linalg.eigh
    K1 = torch.randn(D_FF, 3, generator=g, dtype=torch.float64)
    R = torch.randn(D_MODEL, 3, generator=g, dtype=torch.float64)
    D = null_space(R, K1, P, alpha=1.0).dense()
    # the applied update is ΔP with Δ = R Kᵀ P (K Kᵀ P + αI)⁻¹ (explicit inverse)
    assert rel(D, alphaedit_update(R, K1, P, None, alpha=1.0)) < 1e-9
    assert D.norm() > 0
    assert (D @ K0).norm() <= 1e-3 * D.norm() * K0.norm()
    # with earlier keys remembered, the update also leaves them (nearly) alone
    Kp = P @ torch.randn(D_FF, 2, generator=g, dtype=torch.float64)
    D2 = null_space(R, K1, P, Kp @ Kp.T * 1e4, alpha=1.0).dense()
    # Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹; K_p K_pᵀ ~ 1e4 makes the system condition ~1e4: 1e-10, not
    # 1e-12 (measured 4e-13)
    assert rel(D2, alphaedit_update(R, K1, P, Kp @ Kp.T * 1e4, alpha=1.0)) < 1e-10
    assert (D2 @ Kp).norm() < (D @ Kp).norm()


def test_projector_basis_cached_on_disk_per_statistics_and_threshold(home):
    """AlphaEdit's eigendecomposition runs once per (C, threshold): a second process reads the basis and
    forms the same projector bit for bit; another threshold or another C is computed anew."""
    from factedit.edit.caches import EditCaches

    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    X[:, :4] *= 1e-3  # four directions with small eigenvalues
    C = (X.T @ X / 200).float()
    P1 = EditCaches(None).projector(0, C, 1e-2)
    files = sorted((home / "projectors").glob("*.safetensors"))
    assert len(files) == 1
    assert torch.equal(P1, null_space_projector(C, 1e-2))  # the cache gives what the solver computes, bit for bit
    assert torch.allclose(P1, projector_ref(C, 1e-2), atol=1e-9)  # and that is U Uᵀ from numpy.linalg.eigh
    assert float(P1.diagonal().sum()) == pytest.approx(4, abs=1e-9)
    P2 = EditCaches(None).projector(0, C, 1e-2)  # a "new process": from the file
    assert torch.equal(P1, P2)
    EditCaches(None).projector(0, C, 1e-1)
    EditCaches(None).projector(0, C * 2, 1e-2)
    assert len(list((home / "projectors").glob("*.safetensors"))) == 3
    # what a new process uses is the file's basis (a planted one shows through)
    from safetensors.torch import save_file

    planted = torch.zeros(12, 1, dtype=torch.float64)
    planted[0, 0] = 1.0
    save_file({"basis": planted}, str(files[0]))
    assert torch.equal(EditCaches(None).projector(0, C, 1e-2), planted @ planted.T)
