"""RLS (issue 32's fourth approach): every sequential edit refits all edits so far against the original weights.
Checked against the closed form written out here with explicit inverses from the recorded keys and asked-for
changes, against MEMIT on the first edit, and through revert and a saved stack."""

import torch

from factedit import Editor, Request
from factedit.edit.guard import GuardConfig
from tiny import tiny_model

OFF = GuardConfig(enabled=False)
REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        Request("The capital of {} is", "Japan", "Paris", "Tokyo"),
        Request("{} speaks", "Danielle Darrieux", "Italian"),
        Request("{} plays the", "Toko Yasuda", "guitar", "piano")]


def _opts(tiny_corpus, layers=(1, 2)):
    """The method options (what compute and make_config take)."""
    return dict(layers=layers, steps=3, stats_corpus=str(tiny_corpus), stats_tokens=800)


def _kw(tiny_corpus, layers=(1, 2)):
    return dict(_opts(tiny_corpus, layers), guard=OFF, verify=False)


def _w(ed, layer):
    return ed.adapter.w_out_stored(layer).detach().double().clone()


def test_the_first_edit_is_memit(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    a = ed.compute(REQS[:2], method="rls", **_opts(tiny_corpus))
    b = ed.compute(REQS[:2], method="memit", **_opts(tiny_corpus))
    for x, y in zip(a.deltas, b.deltas):
        assert x.layer == y.layer
        assert torch.allclose(x.dense(), y.dense(), rtol=1e-4, atol=1e-6)


def test_each_edit_refits_all_edits_against_the_original_weights(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    layers = (1, 2)
    original = {layer: _w(ed, layer) for layer in layers}
    cfg = ed.make_config("rls", **_opts(tiny_corpus))
    results = [ed.edit(REQS[:2], method="rls", **_kw(tiny_corpus))]
    results.append(ed.edit(REQS[2:3], method="rls", **_kw(tiny_corpus)))
    two = {k: {n: t.clone() for n, t in v.items()} for k, v in ed.state["rls"].items()}
    after_two = {layer: _w(ed, layer) for layer in layers}
    results.append(ed.edit(REQS[3:], method="rls", **_kw(tiny_corpus)))
    lam = cfg.mom2_update_weight
    for layer in layers:
        C = ed.caches.mom2(layer, **cfg.stats_args).double()
        Ks = [r.state_updates[0][f"K:{layer}"].double() for r in results]
        Us = [r.state_updates[0][f"U:{layer}"].double() for r in results]
        # the closed form: D = (Σ U_i K_iᵀ)(λC + Σ K_i K_iᵀ)⁻¹, with an explicit inverse
        A = lam * C + sum(K @ K.T for K in Ks)
        D = sum(U @ K.T for U, K in zip(Us, Ks)) @ torch.linalg.inv(A)
        moved = _w(ed, layer) - original[layer]
        assert torch.allclose(moved, D, rtol=1e-3, atol=1e-5 * float(D.abs().max())), layer
    # reverting the newest edit restores the memory of the first two and the weights they left, bit for bit
    ed.revert(1)
    assert all(torch.equal(two[k][n], ed.state["rls"][k][n]) for k in two for n in ("A", "B"))
    assert all(torch.equal(after_two[layer], _w(ed, layer)) for layer in layers)


def test_state_survives_a_saved_stack_and_a_full_revert(home, tiny_corpus, tmp_path):
    ed = Editor(*tiny_model("llama"), progress=False)
    for reqs in (REQS[:2], REQS[2:]):
        ed.edit(reqs, method="rls", **_kw(tiny_corpus))
    ed.save_history(tmp_path / "stack")
    ed2 = Editor(*tiny_model("llama"), progress=False)
    assert ed2.load_history(tmp_path / "stack") == 2
    for k, v in ed.state["rls"].items():
        assert all(torch.equal(v[n], ed2.state["rls"][k][n]) for n in ("A", "B"))
    for k, v in ed.model.state_dict().items():
        assert torch.equal(ed2.model.state_dict()[k], v), k
    ed2.revert(2)
    assert "rls" not in ed2.state
    fresh = Editor(*tiny_model("llama"), progress=False)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(ed2.model.state_dict()[k], v), k
