import pytest
import torch

from factedit.arch import ModelAdapter
from factedit.requests import Request
from factedit.values import ValueConfig, ValueProblem, optimize_values
from tiny import ARCHS, tiny_model

TEMPLATES = ["{}", "The a b. {}", "I know what. {}", "x. {}"]
REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome"),
        Request("{} is in", "Space Needle", "Paris Tokyo")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_fast_path_equals_full_forward(arch, layer):
    """Prefix cache + skipped lower layers + selected logits == the plain full forward."""
    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    p = ValueProblem(ad, layer, REQS, TEMPLATES).prepare()
    g = torch.Generator().manual_seed(layer)
    d = torch.randn(2, ad.d_model, generator=g)
    fast, full = p.logits(d, fast=True), p.logits(d, fast=False)
    assert torch.allclose(fast, full, atol=1e-4), (fast - full).abs().max()
    assert not torch.allclose(p.logits(d * 0), fast, atol=1e-3)  # δ matters


def test_subject_at_start_single_token():
    """A fact token at position 0 of the bare prompt (fully padded prefix row) stays exact."""
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    p = ValueProblem(ad, 2, [Request("{} is in", "a", "Rome")], TEMPLATES).prepare()
    d = torch.randn(1, ad.d_model)
    assert torch.allclose(p.logits(d), p.logits(d, fast=False), atol=1e-4)
    assert torch.isfinite(p.logits(d)).all()


def test_optimisation_lowers_nll_and_respects_clamp():
    model, tok = tiny_model("gpt2")
    ad = ModelAdapter(model, tok)
    cfg = ValueConfig(steps=15, clamp_norm_factor=0.5)
    r = optimize_values(ValueProblem(ad, 1, REQS[:1], TEMPLATES), cfg)
    assert r.nll_after[0] < r.nll_before[0]
    assert float(r.delta[0].norm()) <= 0.5 * float(r.v0[0].norm()) * (1 + 1e-5)
    assert r.k_star.shape == (1, ad.d_ff) and r.k_o.shape == (1, ad.d_ff)
    assert not torch.allclose(r.k_star, r.k_o)  # prefix averaging changes the key


def test_optimisation_is_deterministic():
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    a = optimize_values(ValueProblem(ad, 1, REQS[:1], TEMPLATES), ValueConfig(steps=5))
    b = optimize_values(ValueProblem(ad, 1, REQS[:1], TEMPLATES), ValueConfig(steps=5))
    assert torch.equal(a.delta, b.delta)
