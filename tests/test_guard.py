"""Collapse guard on tiny models: passes normal edits, rolls back the others."""

import pytest
import torch

import factedit.edit.guard as G
import factedit.edit.methods.rome as R
from factedit import Editor, GuardConfig, Request, ValueConfig
from factedit.core.metrics import generation_entropy, ngram_entropy
from factedit.edit.guard import CollapseError
from factedit.patch.files import Patch
from tiny import tiny_model

REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome")


def _opts(tiny_corpus):
    return dict(layer=2, stats_corpus=str(tiny_corpus), stats_tokens=800, value=ValueConfig(steps=3))


def test_entropy_metrics_hand_computed():
    assert ngram_entropy([1, 1, 1, 1], 2) == 0.0
    assert ngram_entropy([1, 2, 3, 4], 2) == pytest.approx(1.584962, abs=1e-5)  # 3 distinct bigrams
    assert ngram_entropy([1], 2) == 0.0
    assert generation_entropy([1, 2, 3, 4, 5]) == pytest.approx((2 / 3 * 2 + 4 / 3 * 1.584962) / 2, abs=1e-5)


def test_normal_edit_passes_and_is_recorded(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    r = ed.edit(REQ, **_opts(tiny_corpus))
    assert r.guard["passed"] and r.guard["fired"] == []
    assert float(r.guard["norms"]["2"]) <= float(r.guard["limits"]["2"])
    assert Patch.from_result(r).meta["guard"]["passed"] is True


def test_huge_update_is_rolled_back(home, tiny_corpus, monkeypatch):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = R.rome_delta

    def blown_up(C, values, i, variant, layer):  # a disabling edit: the denominator nearly vanishes
        d = real(C, values, i, variant, layer)
        d.right = d.right * 1e4
        return d

    monkeypatch.setattr(R, "rome_delta", blown_up)
    with pytest.raises(CollapseError, match=r"‖Δ‖ of layer 2.*--no-guard"):
        ed.edit(REQ, **_opts(tiny_corpus))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ed.history == ()
    r = ed.edit(REQ, guard=GuardConfig(enabled=False), **_opts(tiny_corpus))  # forced
    assert r.guard is None


def test_entropy_collapse_is_rolled_back(home, tiny_corpus, monkeypatch):
    model, tok = tiny_model("gpt2")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = iter([3.0, 0.5])  # before: fluent; after: repeating itself
    monkeypatch.setattr(G, "entropy_of", lambda tokens: next(values))
    with pytest.raises(CollapseError, match="entropy fell from 3.00 to 0.50"):
        ed.edit(REQ, **_opts(tiny_corpus))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_multi_request_rome_edit_records_the_guard_decision(home, tiny_corpus):
    """Several requests edited one after another in one call: one decision, passed only if every edit
    passed, with each edit's decision kept (it was None before)."""
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    reqs = [REQ, Request("{} is in", "Space Needle", "Tokyo")]
    r = ed.edit(reqs, **_opts(tiny_corpus))
    assert r.guard is not None and r.guard["passed"] is True and len(r.guard["edits"]) == 2
    assert all(d["passed"] for d in r.guard["edits"])
    assert r.guard["entropy_before"] == r.guard["edits"][0]["entropy_before"]
    assert Patch.from_result(r).meta["guard"]["passed"] is True
    ed.revert()


def test_patch_norms_are_the_norm_of_the_summed_update(home, tiny_corpus):
    """Two ROME edits of one layer in one call: the recorded norm is ‖Δ1 + Δ2‖, not ‖Δ1‖ + ‖Δ2‖."""
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    r = ed.edit([REQ, Request("{} is in", "Space Needle", "Tokyo")], guard=GuardConfig(enabled=False),
                **_opts(tiny_corpus))
    d1, d2 = (d.dense().double() for d in r.deltas)
    norm = Patch.from_result(r).meta["norms"]["2"]
    assert norm == pytest.approx(float(torch.linalg.matrix_norm(d1 + d2)), rel=1e-9)
    assert norm < float(torch.linalg.matrix_norm(d1) + torch.linalg.matrix_norm(d2)) * (1 - 1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_probe_tokens_are_generate_tokens_with_any_draft(arch):
    """The guard's fluency probe gives model.generate's greedy tokens, whatever draft it verifies: the exact
    one (one forward), a wrong one, a short one, one with an early EOS, none."""
    from factedit.core.arch import ModelAdapter
    from factedit.core.batching import pad_id, pad_rows
    from factedit.edit.guard import probe_tokens

    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    cfg = GuardConfig(max_new_tokens=10)
    batch = pad_rows([ad.tokenizer(p)["input_ids"] for p in cfg.prompts], pad_id(tok), side="left")
    out = model.generate(**batch.inputs(), max_new_tokens=cfg.max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
    ref = out[:, batch.width:].tolist()
    eos = tok.eos_token_id
    drafts = [None, ref, [[5] * 10] * 3, [r[:3] for r in ref], [[eos]] * 3, [r[:4] + [7] + r[5:] for r in ref]]
    for draft in drafts:
        assert probe_tokens(ad, cfg, draft=draft) == ref, draft


def test_probe_after_an_edit_costs_one_forward_when_the_continuations_hold(home, tiny_corpus):
    from factedit.core.arch import ModelAdapter
    from factedit.edit.guard import probe_tokens

    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    cfg = GuardConfig(max_new_tokens=12)
    ref = probe_tokens(ad, cfg)
    calls = []
    handle = ad.body.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert probe_tokens(ad, cfg, draft=ref) == ref
    finally:
        handle.remove()
    assert len(calls) == 1


def test_the_probe_of_a_model_is_read_from_disk_by_a_later_editor(home):
    """The first editor decodes the fluency probe of the base weights and keeps it under $FACTEDIT_HOME/guard;
    a later one over the same weights reads it (no forward), the same tokens; a damaged file is decoded again."""
    from factedit.edit.guard import _probe_path, cached_probe_tokens, probe_tokens

    model, tok = tiny_model("llama")
    cfg = GuardConfig(max_new_tokens=8)
    first = Editor(model, tok, progress=False)
    assert first.guard.wanted(cfg) == (cfg.prompts, 8) and cached_probe_tokens(first.adapter, cfg) is None
    first.guard.prepare(first.make_config("ft", layer=1), cfg, norm_limit=False)
    want = probe_tokens(first.adapter, cfg)
    assert cached_probe_tokens(first.adapter, cfg) == want
    later = Editor(model, tok, progress=False)
    calls = []
    handle = later.adapter.body.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert later.guard.wanted(cfg) is None  # nothing to read: the cache has it
        later.guard.prepare(later.make_config("ft", layer=1), cfg, norm_limit=False)
    finally:
        handle.remove()
    assert not calls and later.guard._probe[1] == want
    _probe_path(later.adapter, cfg).write_text("{not json", encoding="utf-8")
    again = Editor(model, tok, progress=False)
    assert again.guard.wanted(cfg) == (cfg.prompts, 8)
    again.guard.prepare(again.make_config("ft", layer=1), cfg, norm_limit=False)
    assert again.guard._probe[1] == want and cached_probe_tokens(again.adapter, cfg) == want
