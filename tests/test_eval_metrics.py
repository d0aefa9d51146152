"""Evaluation metrics on hand-computed examples, and batched scoring against a plain forward."""

import math

import pytest
import torch

from factedit.edit.deltas import LayerDelta
from factedit.evaluation import scoring as S
from tiny import tiny_model


def test_success_rate_ties_fail_both_ways():
    pairs = [(-1.0, -2.0), (-2.0, -2.0), (-3.0, -1.0)]  # new wins, tie, true wins
    assert S.success_rate(pairs) == pytest.approx(1 / 3)  # ES/PS: only the first
    assert S.success_rate(pairs, new_wins=False) == pytest.approx(1 / 3)  # NS: only the third
    assert S.success_rate([]) is None


def test_magnitudes_are_probability_differences():
    pairs = [(-1.0, -2.0), (-3.0, -1.0)]
    em = ((math.exp(-1) - math.exp(-2)) + (math.exp(-3) - math.exp(-1))) / 2
    assert S.magnitude(pairs) == pytest.approx(em)
    assert S.magnitude(pairs, new_minus_true=False) == pytest.approx(-em)
    case = S.counterfact_case([(-0.5, -4.0)], [(-1.0, -2.0), (-3.0, -1.0)], [(-3.0, -1.0)])
    assert case["ES"] == 1 and case["PS"] == 0.5 and case["NS"] == 1
    assert case["EM"] == pytest.approx(math.exp(-0.5) - math.exp(-4))
    assert case["NM"] == pytest.approx(math.exp(-1) - math.exp(-3))


def test_harmonic_mean():
    assert S.harmonic_mean([100, 50, 25]) == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))
    assert S.harmonic_mean([100, 0, 25]) == 0
    assert S.harmonic_mean([100, None, 25]) is None


def test_token_accuracy_and_text_entropy():
    assert S.token_accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        S.token_accuracy([])
    # words a b a b a b: bigrams ab×3, ba×2; trigrams aba×2, bab×2
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    h3 = 1.0
    assert S.text_entropy(["a b a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert S.word_tokens("It's Rome, Italy.") == ["It's", "Rome", ",", "Italy", "."]
    assert S.text_entropy(["x x x x x x"]) == 0.0  # total repetition: zero entropy


def test_normalized_delta_norm():
    d = LayerDelta(0, torch.tensor([[3.0], [0.0]]), torch.tensor([[0.0], [4.0]]))  # [[0, 12], [0, 0]]
    assert S.normalized_delta_norm([d]) == pytest.approx((12 / 4, 12))
    # same layer twice: summed first (12 - 12 = 0); another layer adds its squared norm and elements
    neg = LayerDelta(0, torch.tensor([[-3.0], [0.0]]), torch.tensor([[0.0], [4.0]]))
    other = LayerDelta(1, torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [5.0]]))
    assert S.normalized_delta_norm([d, neg, other]) == pytest.approx((5 / 8, 5))


def test_outliers_and_summary():
    assert S.outliers([1.0, 1.2, 0.9, 50.0]) == [3]
    assert S.outliers([1.0, float("inf"), 1.0]) == [1]
    recs = [{"ES": 1.0, "PS": 0.5, "NS": 1.0, "GE": 6.0, "delta_norm": 1.0},
            {"ES": 0.0, "PS": 0.5, "NS": 0.5, "GE": 5.0, "delta_norm": 3.0},
            {"error": "RequestError: bad"}]
    s = S.summarize_records(recs)
    # the failed case counts as 0 in every success rate; GE and norms describe the edits that were made
    assert (s["n"], s["errors"], s["GE"]) == (3, 1, 550)
    assert (s["ES"], s["PS"], s["NS"]) == pytest.approx((100 / 3, 100 / 3, 50))
    assert s["S"] == pytest.approx(3 / (3 / 100 + 3 / 100 + 1 / 50))
    assert s["delta_norm_median"] == 2.0 and s["EM"] is None
    assert (S.summarize_records([{"error": "x"}])["ES"] == 0
            and S.summarize_records([{"error": "x"}])["efficacy"] is None)


def test_scores_use_mean_per_token_log_prob(monkeypatch):
    """Ordering edge case: a two-token o* with token log-probs (-1, -1) beats a one-token o_c at -1.5
    (means -1 > -1.5) although its summed log-prob (-2) is lower; an exact tie counts as a failure."""
    import factedit.evaluation.score_model as SM
    from factedit import Request
    from factedit.evaluation import CounterFactCase

    toks = {("p0", "new"): [1, 2], ("p0", "true"): [3], ("p1", "new"): [4], ("p1", "true"): [5, 6],
            ("n0", "new"): [7], ("n0", "true"): [8, 9]}
    logp = {1: -1.0, 2: -1.0, 3: -1.5, 4: -2.0, 5: -1.0, 6: -3.0, 7: -0.5, 8: -0.2, 9: -0.4}

    def fake_encode(tok, prompt, target):
        ids = [100] + toks[(prompt, target)]
        return ids, list(range(1, len(ids)))

    def fake_scores(adapter, seqs, queries, batch_size=32, models=None, owners=None):
        return [(torch.tensor([logp[t] for _, t in q]), torch.zeros(len(q), dtype=torch.bool)) for q in queries]

    monkeypatch.setattr(SM, "encode_with_target", fake_encode)
    monkeypatch.setattr(SM, "position_scores", fake_scores)
    case = CounterFactCase(0, Request("{}", "p0", "new", "true"), ("p1",), ("n0",))
    rec = SM.score_cases(type("A", (), {"tokenizer": None})(), [case])[0]
    assert rec["rewrite_lp"] == [(-1.0, -1.5)] and rec["paraphrase_lp"] == [(-2.0, -2.0)]
    assert (rec["ES"], rec["PS"], rec["NS"]) == (1.0, 0.0, 1.0)
    assert rec["NM"] == pytest.approx(math.exp(-0.3) - math.exp(-0.5))


@pytest.fixture(scope="module")
def tiny():
    from factedit import ModelAdapter

    model, tok = tiny_model("gpt2")
    return ModelAdapter(model, tok)


@torch.no_grad()
def _naive(adapter, prompt, target):
    """Token log-probs and top-1 hits of ``prompt + " " + target`` from one plain forward of that row."""
    from factedit.core.tokens import encode_with_target

    ids, idx = encode_with_target(adapter.tokenizer, prompt, target)
    logp = torch.log_softmax(adapter.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [float(logp[i - 1, ids[i]]) for i in idx], [int(logp[i - 1].argmax()) == ids[i] for i in idx]


def test_batched_scores_match_plain_forward_in_order(tiny):
    """Rows are sorted by length inside; results come back in input order, equal to one row at a time
    (multi-token targets included)."""
    from factedit.core.lm import target_token_scores

    prompts = ["The Eiffel Tower is located in the city of", "Rome is in", "The capital of Japan is the city"]
    targets = ["Paris and Tokyo", "Italy", "Seattle"]
    got = target_token_scores(tiny, prompts, targets, batch_size=2)
    for (lp, hits), p, t in zip(got, prompts, targets):
        ref_lp, ref_hits = _naive(tiny, p, t)
        assert lp.tolist() == pytest.approx(ref_lp, abs=1e-4)
        assert hits.tolist() == ref_hits
    assert len(got[0][0]) > 1  # a multi-token target


def test_case_scores_share_rows_without_changing_results(tiny):
    """o* and o_c read from one sequence where possible: same numbers as scoring each pair alone."""
    from factedit import Request
    from factedit.core.lm import target_token_scores
    from factedit.evaluation import CounterFactCase, score_cases

    case = CounterFactCase(5, Request("The capital of {} is", "Japan", "Paris", "Tokyo and Rome"),
                           ("Japan's capital city is",), ("The Space Needle is in the city of", "Rome is in"))
    rec = score_cases(tiny, [case])[0]
    prompts = [case.request.text, *case.paraphrase_prompts, *case.neighborhood_prompts]
    ref = [(float(a[0].mean()), float(b[0].mean())) for a, b in zip(
        target_token_scores(tiny, prompts, ["Paris"] * 4), target_token_scores(tiny, prompts, ["Tokyo and Rome"] * 4))]
    got = rec["rewrite_lp"] + rec["paraphrase_lp"] + rec["neighborhood_lp"]
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, abs=1e-4)


def test_zsre_token_accuracy_is_teacher_forced_top1(tiny):
    from factedit import Request
    from factedit.evaluation import ZsRECase, score_cases

    case = ZsRECase(3, Request("What is {} made of?", "UniFirst", "Paris Tokyo", "uniform"), "What does UniFirst make?",
                    "nq question: where is the Space Needle", "Seattle")
    rec = score_cases(tiny, [case])[0]
    for name, p, t in (("efficacy", case.request.text, "Paris Tokyo"), ("paraphrase", case.rephrase, "Paris Tokyo"),
                       ("specificity", case.loc + "?", "Seattle")):
        hits = _naive(tiny, p, t)[1]
        assert rec[f"{name}_hits"] == hits
        assert rec[name] == pytest.approx(sum(hits) / len(hits))


def test_sequential_table_retention_and_ge_change_against_unedited_records():
    from pathlib import Path

    from factedit.evaluation.summarize import Run, sequential_table

    # 4 edits in 2 groups of 2; GE of each case right after its edit, in edit order 0.3, 0.2, 0.5, 0.1
    recs = [{"case_id": c, "n_edits_before": nb, "GE": ge}
            for c, nb, ge in ((7, 0, 0.3), (3, 0, 0.2), (1, 2, 0.5), (9, 2, 0.1))]
    down = [{"n_edits": 0, "tasks": {"mean": 0.5}, "retention": None},
            {"n_edits": 4, "tasks": {"mean": 0.25}, "retention": {"ES": 75.0, "PS": 50.0, "NS": 100.0}}]
    seq = Run(Path("runs/seq"), {"compare": {"sequential": True}}, {"method": "emmet", "ES": 100.0}, recs, down)
    base = Run(Path("runs/none"), {"compare": {}}, {"method": "none"},
               [{"case_id": c, "GE": ge} for c, ge in ((1, 0.4), (3, 0.2), (7, 0.1), (9, 0.2))], [])

    rows = sequential_table([seq], window=2).splitlines()
    assert "| GE, first 2 | GE, last 2 |" in rows[0]
    # edit order: (0, 3) then (0, 7), (2, 1), (2, 9); first two GE 0.2, 0.3; last two 0.5, 0.1
    # ... and the re-scored edits at the end: all of them (the checkpoint names no sample)
    assert rows[0].endswith("| re-scored at end |")
    assert rows[2] == "| seq | emmet | 4 | 100.0 | 75.0 | 50.0 | 100.0 | 25.0 | 30.0 | 50.0 | 25.0 | all |"

    rows = sequential_table([base, seq], window=2).splitlines()
    assert "| ΔGE vs unedited, first 2 | ΔGE vs unedited, last 2 |" in rows[0] and len(rows) == 3
    # first two: (0.2 - 0.2 + 0.3 - 0.1) / 2 = 0.1; last two: (0.5 - 0.4 + 0.1 - 0.2) / 2 = 0.0
    assert rows[2] == "| seq | emmet | 4 | 100.0 | 75.0 | 50.0 | 100.0 | 10.0 | 0.0 | 50.0 | 25.0 | all |"
    assert sequential_table([base]) == ""
