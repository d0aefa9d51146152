import pytest
import torch

from factedit.core.arch import ModelAdapter
from factedit.core.requests import Request
from factedit.edit.values import ValueConfig, ValueProblem, optimize_values
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


def test_essence_term_is_kl_of_the_edited_from_the_original_distribution():
    """The essence loss is KL(P_δ ‖ P_orig) = Σ P_δ (log P_δ − log P_orig), as ROME's compute_v
    (torch's kl_div(P_orig_log, P_δ_log, log_target=True)); checked on toy distributions against a
    hand computation, which the reverse direction does not match."""
    import math

    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    p = ValueProblem(ad, 2, REQS[:1], TEMPLATES).prepare()
    V = p.kl_base.shape[-1]
    g = torch.Generator().manual_seed(5)
    orig, new = torch.randn(V, generator=g) * 2, torch.randn(V, generator=g) * 2
    p.kl_base = torch.log_softmax(orig, -1)[None]
    logits = p.logits(torch.zeros(1, ad.d_model)).detach().clone()
    logits[p.n_nll:] = new
    _, kl = p.losses(logits)
    po = [math.exp(x) for x in orig.tolist()]
    pn = [math.exp(x) for x in new.tolist()]
    zo, zn = sum(po), sum(pn)
    po, pn = [x / zo for x in po], [x / zn for x in pn]
    want = sum(q * (math.log(q) - math.log(o)) for q, o in zip(pn, po))
    reverse = sum(o * (math.log(o) - math.log(q)) for q, o in zip(pn, po))
    assert float(kl[0]) == pytest.approx(want, rel=1e-4)
    assert abs(want - reverse) > 1e-2 * want  # the toy distributions tell the directions apart


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


def test_nadam_first_step_is_nesterov_with_constant_momentum():
    # one update from δ = 0 with gradient g: Adam moves lr·sign(g); NAdam with μ = β₁/2 constant moves
    # lr·(1−μ)/(1−μ)·sign(g) + lr·μ/(1−μ²)·(1−β₁)·sign(g) (its definition, torch's NAdam with momentum_decay 0)
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    cfg = dict(steps=2, clamp_norm_factor=1e6)
    adam = optimize_values(ValueProblem(ad, 1, REQS[:1], TEMPLATES), ValueConfig(**cfg))
    nadam = optimize_values(ValueProblem(ad, 1, REQS[:1], TEMPLATES), ValueConfig(**cfg, optimizer="nadam"))
    mu, beta1, lr = 0.45, 0.9, 0.5
    assert adam.steps == nadam.steps == 1
    assert torch.allclose(adam.delta.abs(), torch.full_like(adam.delta, lr), rtol=1e-4)
    expected = adam.delta * (1 + mu * (1 - beta1) / (1 - mu * mu))
    assert torch.allclose(nadam.delta, expected, rtol=1e-4, atol=1e-6)


def test_value_config_refuses_unknown_choices_and_keeps_its_disk_identity():
    from factedit.core.errors import MethodError

    with pytest.raises(MethodError, match="value.optimizer must be one of adam, nadam"):
        ValueConfig(optimizer="sgd")
    with pytest.raises(MethodError, match="value.early_stop_on must be one of nll, loss"):
        ValueConfig(early_stop_on="los")
    # targets kept on disk are found by the repr of the settings: a field added later shows only when set
    assert "optimizer" not in repr(ValueConfig()) and "optimizer='nadam'" in repr(ValueConfig(optimizer="nadam"))
    assert repr(ValueConfig()) == ("ValueConfig(steps=25, lr=0.5, kl_factor=0.0625, weight_decay=0.5, "
                                   "clamp_norm_factor=4.0, early_stop_loss=0.05, early_stop_on='nll', bare_weight=0.0)")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_active_subset_equals_full_batch(arch):
    """Dropping finished requests from the batch gives the same logits for the others."""
    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    reqs = REQS + [Request("The capital of {} is", "Japan", "Tokyo")]
    p = ValueProblem(ad, 2, reqs, TEMPLATES, inject="residual").prepare()
    d = torch.randn(3, ad.d_model)
    full = p.logits(d)
    active = torch.tensor([True, False, True])
    sub = p.logits(d, active=active)
    entries = active[p.row_req[p.sel_rows]]
    assert torch.allclose(sub, full[entries], atol=1e-4)
    nll_full, kl_full = p.losses(full)
    nll_sub, kl_sub = p.losses(sub, active=active)
    assert torch.allclose(nll_sub[active], nll_full[active], atol=1e-5)
    assert torch.allclose(kl_sub[active], kl_full[active], atol=1e-5)
    assert float(nll_sub[1]) == 0.0


def test_batched_optimisation_equals_one_at_a_time():
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    cfg = ValueConfig(steps=8, early_stop_loss=3.0)  # some requests stop early, others do not
    both = optimize_values(ValueProblem(ad, 1, REQS, TEMPLATES), cfg)
    for i, r in enumerate(REQS):
        alone = optimize_values(ValueProblem(ad, 1, [r], TEMPLATES), cfg)
        assert torch.allclose(both.delta[i], alone.delta[0], atol=1e-4, rtol=1e-3)
        assert both.nll_after[i] == pytest.approx(alone.nll_after[0], abs=1e-4)
        assert both.steps_each[i] == alone.steps == alone.steps_each[0]  # per request, not the batch's maximum
        assert both.select(i).steps == alone.steps
