"""Exact ROME algebra on tiny random models of every supported architecture."""

import pytest
import torch

from factedit import Editor, Request, ValueConfig
from factedit.core.errors import MethodError
from factedit.edit.deltas import apply_deltas
from reference import rank_one_update, rome_update
from tiny import ARCHS, tiny_model

REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")


def _opts(tiny_corpus, **kw):
    return dict(layer=2, stats_corpus=str(tiny_corpus), stats_tokens=800, value=ValueConfig(steps=4),
                context_lengths=((3, 2), (5, 2)), **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _computed(arch, method, tiny_corpus):
    """(W0, Computed, k*, k_o, δ) of one edit at layer 2, in float64 (the inputs of the reference formulas)."""
    model, tok = tiny_model(arch)
    ed = Editor(model, tok, progress=False)
    W0 = ed.adapter.w_out_weight(2).detach().clone().double()
    c = ed.compute(REQ, method, **_opts(tiny_corpus))
    v = c.values
    return W0, c, v.k_star[0].double(), v.k_o[0].double(), v.delta[0].double()


@pytest.mark.parametrize("arch", ARCHS)
def test_r_rome_exact_algebra(arch, home, tiny_corpus):
    model, tok = tiny_model(arch)
    ed = Editor(model, tok, progress=False)
    W0 = ed.adapter.w_out_weight(2).detach().clone().double()
    param_before = ed.adapter.w_out_parameter(2).detach().clone()
    c = ed.compute(REQ, "r-rome", **_opts(tiny_corpus))
    v = c.values
    k_star, delta = v.k_star[0].double(), v.delta[0].double()
    v_star = W0 @ k_star + delta
    # the update is the paper's formula (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*), explicit inverse (reference.py)
    assert _rel(c.deltas[0].dense().double(), rome_update(W0, c.C, v_star, k_star, k_star)) < 1e-4
    applied = apply_deltas(ed.adapter, c.deltas)
    W1 = ed.adapter.w_out_weight(2).detach().double()
    assert _rel(W1 @ k_star, v_star) < 1e-4
    # a key with kᵀ C⁻¹ k* = 0 maps exactly as before
    C = c.C.double()
    u = torch.linalg.solve(C, k_star)
    z = torch.randn(ed.adapter.d_ff, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = z - (z @ u) / (u @ u) * u
    assert _rel(W1 @ z, W0 @ z) < 1e-5
    # other layers untouched, rank one
    assert torch.linalg.matrix_rank(c.deltas[0].dense().double(), rtol=1e-6) == 1
    applied.revert()
    assert torch.equal(ed.adapter.w_out_parameter(2), param_before)  # bit for bit


@pytest.mark.parametrize("method", ["rome", "r-rome"])
def test_without_mom2_adjustment_the_update_is_the_plain_rank_one_write(method, home, tiny_corpus):
    """``mom2_adjustment=False`` (C = I, the original code's switch): Δ = (v* − W k*) k*ᵀ / (k*ᵀk*) for r-rome, and
    the original code's k_o in the residual and denominator for rome, with no statistics computed."""
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    W0 = ed.adapter.w_out_weight(2).detach().clone().double()
    c = ed.compute(REQ, method, mom2_adjustment=False, **_opts(tiny_corpus))
    v = c.values
    k_star, k_o, delta = v.k_star[0].double(), v.k_o[0].double(), v.delta[0].double()
    k_res = k_star if method == "r-rome" else k_o
    v_star = W0 @ k_res + delta if method == "rome" else W0 @ k_star + delta
    want = torch.outer(v_star - W0 @ k_res, k_star) / float(k_res @ k_star)
    assert _rel(c.deltas[0].dense().double(), want) < 1e-4
    assert torch.equal(c.C.cpu().double(), torch.eye(ed.adapter.d_ff, dtype=torch.float64))
    assert not ed.caches._stats  # no statistics were computed


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_rome_reproduces_original_code_update(arch, home, tiny_corpus):
    W0, c, k_star, k_o, delta = _computed(arch, "rome", tiny_corpus)
    v_star = W0 @ k_o + delta  # the original code's target: bare-prompt value plus δ
    ref = rome_update(W0, c.C, v_star, k_star, k_o)  # (v* − W k_o)(C⁻¹k*)ᵀ / (k_oᵀC⁻¹k*), explicit inverse
    assert _rel(c.deltas[0].dense().double(), ref) < 1e-4
    assert not torch.allclose(k_star, k_o)


@pytest.mark.parametrize("arch", ["gptj", "qwen2"])
def test_p_rome_uses_k_o_throughout(arch, home, tiny_corpus):
    W0, c, k_star, k_o, delta = _computed(arch, "p-rome", tiny_corpus)
    ref = rome_update(W0, c.C, W0 @ k_o + delta, k_o, k_o)  # δ (C⁻¹k_o)ᵀ / (k_oᵀC⁻¹k_o), explicit inverse
    assert _rel(c.deltas[0].dense().double(), ref) < 1e-4
    assert _rel((W0 + ref) @ k_o, W0 @ k_o + delta) < 1e-6


def test_editor_history_and_revert(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed.edit(REQ, **_opts(tiny_corpus))
    ed.edit(Request("{} is in", "Space Needle", "Tokyo"), **_opts(tiny_corpus, seed=1))
    assert len(ed.history) == 2
    assert not torch.equal(model.state_dict()["model.layers.2.mlp.down_proj.weight"],
                           before["model.layers.2.mlp.down_proj.weight"])
    ed.revert(2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(MethodError):
        ed.revert(1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype, home, tiny_corpus):
    model, tok = tiny_model("llama", dtype=dtype)
    ed = Editor(model, tok, progress=False)
    W0 = ed.adapter.w_out_weight(2).detach().clone()
    c = ed.compute(REQ, "r-rome", **_opts(tiny_corpus))
    assert c.C.dtype == torch.float32 and c.deltas[0].left.dtype == torch.float32
    applied = apply_deltas(ed.adapter, c.deltas)
    W1 = ed.adapter.w_out_weight(2).detach()
    assert W1.dtype == dtype
    k_star, delta = c.values.k_star[0].double(), c.values.delta[0].double()
    target = W0.double() @ k_star + delta
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # storage rounding of the half-precision weights
    assert _rel(W1.double() @ k_star, target) < tol
    applied.revert()
    assert torch.equal(ed.adapter.w_out_weight(2), W0)


def test_unknown_method():
    model, tok = tiny_model("gpt2")
    with pytest.raises(MethodError, match="unknown method"):
        Editor(model, tok).make_config("romeo")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_norm_ratio_from_keys_equals_rome_over_r_rome(arch, home, tiny_corpus):
    """rome_norm_ratio (keys only, no optimisation) is ‖Δ_rome‖ / ‖Δ_r-rome‖ for the same δ, the two updates
    computed by their formulas (explicit inverse, reference.py) from the edit's keys and δ."""
    from factedit.edit.methods.rome import rome_norm_ratio

    model, tok = tiny_model(arch)
    ed = Editor(model, tok, progress=False)
    c = ed.compute(REQ, "r-rome", **_opts(tiny_corpus))
    k_star, k_o, delta = c.values.k_star[0], c.values.k_o[0], c.values.delta[0]
    norms = {"rome": float(rank_one_update(c.C, delta, k_star, k_o).norm()),  # δ (C⁻¹k*)ᵀ / (k_oᵀC⁻¹k*)
             "r-rome": float(rank_one_update(c.C, delta, k_star, k_star).norm())}  # δ (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*)
    ratio = rome_norm_ratio(ed.adapter, c.C, [REQ], ed.templates(0, c.config.context_lengths), 2)
    assert ratio.shape == (1,)
    assert abs(float(ratio[0]) - norms["rome"] / norms["r-rome"]) < 1e-4 * norms["rome"] / norms["r-rome"]
