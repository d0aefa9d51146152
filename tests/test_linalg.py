import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from factedit.core.errors import StatsError
from factedit.edit.solver import equality_constrained, solve_spd
from reference import rank_one_update, rel, rome_update


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
    """The n = 1 equality solve is ROME's formula (explicit C⁻¹, reference.py), and has its properties."""
    d_model, d_ff = 6, 10
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64)
    C = spd(d_ff, 2)
    k = torch.randn(d_ff, generator=g, dtype=torch.float64)
    v = torch.randn(d_model, generator=g, dtype=torch.float64)
    sol = equality_constrained((v - W @ k)[:, None], k[:, None], C)  # the code under test
    D = sol.dense()
    assert sol.left.shape == (d_model, 1) and sol.right.shape == (d_ff, 1)
    assert torch.allclose(D, rome_update(W, C, v, k, k), rtol=1e-10, atol=1e-12)
    assert torch.allclose((W + D) @ k, v, rtol=1e-10)
    # a key C^-1-orthogonal to k is untouched
    u = torch.linalg.solve(C, k)
    z = torch.randn(d_ff, generator=g, dtype=torch.float64)
    z = z - (z @ u) / (u @ u) * u
    assert abs(float(z @ u)) < 1e-10
    assert torch.allclose(D @ z, torch.zeros(d_model, dtype=torch.float64), atol=1e-10)
    assert torch.linalg.matrix_rank(D) == 1


def test_original_code_asymmetry():
    d_model, d_ff = 5, 8
    g = torch.Generator().manual_seed(3)
    W = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64)
    C = spd(d_ff, 4)
    k_star, k_o = (torch.randn(d_ff, generator=g, dtype=torch.float64),
                   torch.randn(d_ff, generator=g, dtype=torch.float64))
    v = torch.randn(d_model, generator=g, dtype=torch.float64)
    ref = rome_update(W, C, v, k_star, k_o)  # (v − W k_o)(C⁻¹k*)ᵀ / (k_oᵀC⁻¹k*), explicit inverse
    D = equality_constrained((v - W @ k_o)[:, None], k_star[:, None], C, k_o[:, None]).dense()
    assert torch.allclose(D, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose((W + D) @ k_o, v)
    assert not torch.allclose(D, rome_update(W, C, v, k_star, k_star))  # the asymmetry changes the update


@pytest.mark.parametrize("variant", ["r-rome", "rome", "p-rome"])
def test_rome_delta_variants_are_the_formula(variant):
    """rome_delta (the closed form of the ROME methods) picks the variant's keys: r-rome k*, k*; rome k*, k_o;
    p-rome k_o, k_o, as ``Δ = δ (C⁻¹k_dir)ᵀ / (k_resᵀC⁻¹k_dir)`` computed with an explicit inverse."""
    from factedit.edit.methods.rome import rome_delta

    d_model, d_ff = 5, 9
    g = torch.Generator().manual_seed(7)
    C = spd(d_ff, 5)
    k_star, k_o = (torch.randn(1, d_ff, generator=g, dtype=torch.float64) for _ in range(2))
    delta = torch.randn(1, d_model, generator=g, dtype=torch.float64)
    keys = {"r-rome": (k_star, k_star), "rome": (k_star, k_o), "p-rome": (k_o, k_o)}[variant]
    ref = rank_one_update(C, delta[0], keys[0][0], keys[1][0])
    d = rome_delta(C, SimpleNamespace(k_star=k_star, k_o=k_o, delta=delta), 0, variant, 3)
    assert d.layer == 3
    # the factors are returned in float32 (what is written into the model): float32 rounding, not 1e-9
    assert rel(d.dense(), ref) < 1e-6


#: what the reference closed forms must never come from: the code they are the reference for
_CODE_UNDER_TEST = ("factedit",)


def test_reference_module_imports_nothing_from_the_code_under_test():
    """tests/reference.py computes every closed form by its formula; it imports nothing from factedit
    (in particular not factedit.edit.solver or factedit.edit.methods), not even indirectly through
    importlib or __import__."""
    path = Path(__file__).with_name("reference.py")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] in _CODE_UNDER_TEST or a.name == "importlib"]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level or mod.split(".")[0] in _CODE_UNDER_TEST or mod == "importlib":
                bad.append("." * node.level + mod)
        elif isinstance(node, ast.Name) and node.id in ("__import__", "factedit"):
            bad.append(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("factedit."):
            bad.append(node.value)  # a module name handed to some import function
    assert not bad, f"tests/reference.py must not use the code under test: {bad}"
    # and what it does import is the independent numerical libraries (add another such library here if needed)
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"__future__", "typing", "math", "numpy", "torch"}, mods
