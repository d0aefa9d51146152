"""Scoring many edits in one batch (RowDeltas), batched GE sampling, prefetched ROME targets, and
the chunked single-edit evaluation path: each must equal doing the same thing one edit at a time."""

import json

import pytest
import torch

from conftest import COUNTERFACT
from factedit import Editor, Request
from factedit.core.lm import position_scores
from factedit.edit.deltas import LayerDelta, apply_deltas
from factedit.edit.guard import GuardConfig
from factedit.edit.row_deltas import RowDeltas
from factedit.evaluation import EvalConfig, GenerationConfig, load_cases, run_eval
from factedit.evaluation.score_model import sample_text_groups, sample_texts, score_cases
from factedit.evaluation.scoring import normalized_delta_norm
from tiny import tiny_model

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "gemma"]


def _random_models(adapter, seed=0):
    """Three edited models: rank-1 on layer 1, rank-2 on layers 1 and 2, a dense Δ on layer 2."""
    g = torch.Generator().manual_seed(seed)
    d_model, d_ff = adapter.d_model, adapter.d_ff

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    return [[LayerDelta(1, r(d_model, 1), r(d_ff, 1))],
            [LayerDelta(1, r(d_model, 2), r(d_ff, 2)), LayerDelta(2, r(d_model, 2), r(d_ff, 2))],
            [LayerDelta.from_dense(2, r(d_model, d_ff) * 0.1)]]


@pytest.mark.parametrize("kind", ARCHS)
def test_rows_run_on_their_own_edited_model(kind):
    model, tok = tiny_model(kind)
    ed = Editor(model, tok, progress=False)
    ad = ed.adapter
    models = _random_models(ad)
    ids = torch.randint(2, len(tok), (5, 7), generator=torch.Generator().manual_seed(1))
    owners = [2, 0, -1, 1, 0]
    w0 = {l: ad.w_out_parameter(l).clone() for l in (1, 2)}
    with RowDeltas(ad, models) as rd, rd.rows(owners):
        batched = ad.body(input_ids=ids).last_hidden_state
    for l in (1, 2):  # the weights were never written
        assert torch.equal(ad.w_out_parameter(l), w0[l])
    for r, m in enumerate(owners):
        applied = apply_deltas(ad, models[m]) if m >= 0 else None
        try:
            alone = ad.body(input_ids=ids[r: r + 1]).last_hidden_state
        finally:
            if applied is not None:
                applied.revert()
        torch.testing.assert_close(batched[r: r + 1], alone, rtol=1e-4, atol=1e-5)


def test_owners_must_be_set_and_match_the_batch():
    model, tok = tiny_model("llama")
    ad = Editor(model, tok, progress=False).adapter
    ids = torch.tensor([[3, 4, 5]])
    with RowDeltas(ad, _random_models(ad)) as rd:
        with pytest.raises(RuntimeError, match="set .owners"):
            ad.body(input_ids=ids)
        with rd.rows([0, 1]), pytest.raises(RuntimeError, match="2 owners for a batch of 1"):
            ad.body(input_ids=ids)
    assert not ad.w_out(1)._forward_hooks  # hooks removed on exit


def test_position_scores_per_model_equal_applied_edits():
    model, tok = tiny_model("gpt2")  # Conv1D W_out: transposed storage
    ad = Editor(model, tok, progress=False).adapter
    models = _random_models(ad)
    seqs = [[3, 5, 7, 9], [4, 6, 8], [10, 11, 12, 13, 14], [3, 5, 7, 9]]
    queries = [[(2, 7), (3, 9)], [(1, 6)], [(4, 14)], [(3, 9)]]
    owners = [0, 1, 2, 1]
    with RowDeltas(ad, models) as rd:
        got = position_scores(ad, seqs, queries, batch_size=3, models=rd, owners=owners)
    for i, m in enumerate(owners):
        applied = apply_deltas(ad, models[m])
        try:
            want = position_scores(ad, [seqs[i]], [queries[i]])[0]
        finally:
            applied.revert()
        torch.testing.assert_close(got[i][0], want[0], rtol=1e-4, atol=1e-5)
        assert torch.equal(got[i][1], want[1])


def test_grouped_sampling_draws_what_each_group_draws_alone():
    model, tok = tiny_model("llama")
    ad = Editor(model, tok, progress=False).adapter
    groups = [(["The Eiffel Tower is", "Paris is"], 7), (["Tokyo"], 8), ([], 9), (["The capital of Japan is a"], 7)]
    together = sample_text_groups(ad, groups, length=16)
    for (prompts, seed), texts in zip(groups, together):
        assert texts == (sample_texts(ad, prompts, 16, seed) if prompts else [])
    assert together[0] != together[3]  # same seed, other prompt: its own draws


def test_grouped_sampling_on_edited_models_equals_applied_edits():
    model, tok = tiny_model("gptj")
    ad = Editor(model, tok, progress=False).adapter
    models = _random_models(ad)
    groups = [(["The Eiffel Tower is"], 1), (["Rome is in", "Tokyo"], 2), (["Paris"], 3)]
    with RowDeltas(ad, models) as rd:
        together = sample_text_groups(ad, groups, 14, models=rd, owners=[0, 2, 1])
    for (prompts, seed), m, texts in zip(groups, [0, 2, 1], together):
        applied = apply_deltas(ad, models[m])
        try:
            assert texts == sample_texts(ad, prompts, 14, seed)
        finally:
            applied.revert()


def test_prefetched_rome_targets_equal_single_optimisation(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    cfg = ed.make_config("r-rome", layer=1, stats_corpus=str(tiny_corpus), stats_tokens=2000, steps=6)
    reqs = [Request("{} is located in the city of", "The Eiffel Tower", "Rome"),
            Request("The capital of {} is", "Japan", "Paris"),
            Request("{} plays the", "Toko Yasuda", "piano")]
    single = [ed.compute(r, config=cfg) for r in reqs]
    ed2 = Editor(*tiny_model("llama"), progress=False)
    spent = ed2.prefetch_targets(reqs, cfg, batch_size=2)
    assert spent > 0
    for r, s in zip(reqs, single):
        c = ed2.compute(r, config=cfg)
        assert c.timings["values"] < spent / 3  # taken from the memo, not optimised again
        torch.testing.assert_close(c.values.delta, s.values.delta, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.deltas[0].dense(), s.deltas[0].dense(), rtol=1e-4, atol=1e-6)
        assert c.info[0]["nll_after"] == pytest.approx(s.info[0]["nll_after"], rel=1e-4, abs=1e-6)
    assert ed2.prefetch_targets(reqs, cfg) < spent / 3  # all memoised already
    # the weights change: the memo of the old weights is not used
    ed2.edit(reqs[0], config=cfg, guard=GuardConfig(enabled=False))
    c = ed2.compute(reqs[1], config=cfg)
    assert not torch.equal(c.values.delta, single[1].values.delta)


def _cfg(tiny_corpus, method, **kw):
    opts = {"stats_corpus": str(tiny_corpus), "stats_tokens": 2000, "steps": 4}
    opts.update({"layers": (1, 2)} if method in ("memit", "emmet", "alphaedit", "ft") else {"layer": 1})
    base = dict(method=method, dataset=str(COUNTERFACT), limit=5, generation=GenerationConfig(length=20),
                method_options=tuple(sorted(opts.items())))
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
@pytest.mark.parametrize("method,batch,prefetch", [("rome", 1, 1), ("r-rome", 1, 3), ("memit", 2, 1), ("ft", 2, 1),
                                                   ("none", 1, 1)])
def test_chunked_run_equals_editing_each_case_for_real(home, tiny_corpus, tmp_path, method, batch, prefetch):
    cfg = _cfg(tiny_corpus, method, cases_per_edit=batch, chunk=4, prefetch_batch=prefetch)
    ed = Editor(*tiny_model("llama"), progress=False)
    run_eval(ed, cfg, tmp_path / "run")
    recs = [json.loads(l) for l in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in recs] == [c.case_id for c in load_cases(COUNTERFACT, 5)]

    ref = Editor(*tiny_model("llama"), progress=False)
    cases = load_cases(COUNTERFACT, 5)
    mcfg = None if method == "none" else ref.make_config(method, **dict(cfg.method_options))
    for i in range(0, 5, batch):
        group = cases[i: i + batch]
        off = GuardConfig(enabled=False)
        res = None if mcfg is None else ref.edit([c.request for c in group], config=mcfg, guard=off, verify=False)
        want = score_cases(ref.adapter, group, cfg.generation)
        if res is not None:
            ref.revert()
        for c, w, got in zip(group, want, recs[i: i + batch]):
            assert got["case_id"] == c.case_id
            for k in ("rewrite_lp", "paraphrase_lp", "neighborhood_lp"):
                torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(w[k]), rtol=1e-4, atol=1e-4)
            assert got["generations"] == w["generations"]
            if res is not None:
                assert got["delta_norm"] == pytest.approx(normalized_delta_norm(res.deltas)[0], rel=1e-3)
            else:
                assert got["delta_norm"] is None


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
@pytest.mark.parametrize("method,batch", [("r-rome", 1), ("emmet", 2)])
def test_sequential_ge_of_pending_edits_equals_ge_right_after_each_edit(home, tiny_corpus, tmp_path, method, batch):
    # GE of up to 3 consecutive edits is sampled together after the third, each row on the weights
    # right after its own edit (later deltas subtracted); the reference samples right after each edit
    cfg = _cfg(tiny_corpus, method, cases_per_edit=batch, sequential=True, chunk=3, limit=6)
    ed = Editor(*tiny_model("llama"), progress=False)
    run_eval(ed, cfg, tmp_path / "run")
    recs = [json.loads(l) for l in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    stack = json.loads((tmp_path / "run" / "patches" / "stack.json").read_text())
    assert len(stack["groups"]) == 6 // batch and len(recs) == 6

    ref = Editor(*tiny_model("llama"), progress=False)
    mcfg = ref.make_config(method, **dict(cfg.method_options))
    cases = load_cases(COUNTERFACT, 6)
    for i in range(0, 6, batch):
        group = cases[i: i + batch]
        ref.edit([c.request for c in group], config=mcfg, guard=GuardConfig(enabled=False), verify=False)
        want = score_cases(ref.adapter, group, cfg.generation)
        for w, got in zip(want, recs[i: i + batch]):
            assert got["generations"] == w["generations"]
            assert got["GE"] == pytest.approx(w["GE"])
            torch.testing.assert_close(torch.tensor(got["rewrite_lp"]), torch.tensor(w["rewrite_lp"]))
    for l in mcfg.layers:  # the run applied the same edits, bit for bit
        assert torch.equal(ed.adapter.w_out_parameter(l), ref.adapter.w_out_parameter(l))
