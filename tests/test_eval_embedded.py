"""The evaluation harness end to end on the embedded SmolLM2 model (slow: about a minute)."""

import json

import pytest

from conftest import CORPUS, COUNTERFACT, DEFAULT_STATS, STATS_ARGS

pytestmark = pytest.mark.slow


def test_cli_eval_r_rome_two_records(tmp_path, capsys):
    if not CORPUS.is_file():
        pytest.skip("shared data not found")
    from factedit.cli import main

    out = tmp_path / "run"
    code = main(["eval", "--method", "r-rome", "--dataset", str(COUNTERFACT), "--limit", "2", "--out", str(out),
                 *STATS_ARGS, "--ge-length", "30", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary)[:14] == ["n", "ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "gen_ES", "gen_PS", "gen_NS",
                                  "gen_leak", "seconds_per_edit"]
    for k in ("gen_ES", "gen_PS", "gen_NS", "gen_leak"):  # the generation-based scores, in percent
        assert 0 <= summary[k] <= 100
    assert summary["n"] == 2 and summary["ES"] == 100 and summary["EM"] > 50
    assert 0 < summary["delta_norm_max"] < 1e-3 and summary["GE"] > 300
    recs = [json.loads(l) for l in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in recs] == [0, 1]
    assert json.loads((out / "config.json").read_text())["compare"]["method_config"]["method"] == "r-rome"


def test_rome_disabling_edit_and_r_rome_on_the_same_record(embedded_bare):
    """CounterFact case 6276 (found by bench/eval_disabling.py): the original code's `rome` makes an update
    ~500× r-ROME's that damages the model (neighbour flipped, fluency probe down ~10%, gibberish); r-ROME on
    the same record edits as well and leaves the model's generations unchanged. Both updates come from the
    same optimised δ (the variants differ only in the closed form), so δ is optimised once."""
    from factedit import GuardConfig
    from factedit.edit.deltas import apply_deltas
    from factedit.edit.guard import entropy_probe
    from factedit.edit.methods.rome import rome_delta
    from factedit.evaluation import load_cases, score_cases
    from factedit.evaluation.scoring import normalized_delta_norm

    ed = embedded_bare  # prompts read without the prompt prefix, as when the record was found
    case = next(c for c in load_cases(COUNTERFACT, limit=2500, offset=4250) if c.case_id == 6276)
    probe = GuardConfig()
    before = entropy_probe(ed.adapter, probe)
    c = ed.compute(case.request, "r-rome", **DEFAULT_STATS)
    out = {}
    for variant in ("rome", "r-rome"):
        deltas = [rome_delta(c.C, c.values, 0, variant, c.config.layer)]
        applied = apply_deltas(ed.adapter, deltas)
        try:
            out[variant] = (normalized_delta_norm(deltas)[0], entropy_probe(ed.adapter, probe),
                            score_cases(ed.adapter, [case])[0])
        finally:
            applied.revert()
    (n_rome, h_rome, s_rome), (n_r, h_r, s_r) = out["rome"], out["r-rome"]
    assert n_rome > 100 * n_r and n_rome > 1e-4  # an outlier: r-ROME edits are ~1e-5
    assert h_rome < 0.95 * before and h_r > 0.99 * before
    assert s_rome["NS"] == 0 and s_r["NS"] == 1
    assert s_r["ES"] == s_r["PS"] == 1
