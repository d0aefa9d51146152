"""The evaluation harness end to end on the embedded SmolLM2 model (slow: about a minute)."""

import json

import pytest

from conftest import CORPUS, COUNTERFACT

pytestmark = pytest.mark.slow


def test_cli_eval_r_rome_two_records(tmp_path, capsys):
    if not CORPUS.is_file():
        pytest.skip("shared data not found")
    from factedit.cli import main

    out = tmp_path / "run"
    code = main(["eval", "--method", "r-rome", "--dataset", str(COUNTERFACT), "--limit", "2", "--out", str(out),
                 "--corpus", str(CORPUS), "--ge-length", "30", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary)[:10] == ["n", "ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "seconds_per_edit"]
    assert summary["n"] == 2 and summary["ES"] == 100 and summary["EM"] > 50
    assert 0 < summary["delta_norm_max"] < 1e-3 and summary["GE"] > 300
    recs = [json.loads(l) for l in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in recs] == [0, 1]
    assert json.loads((out / "config.json").read_text())["compare"]["method_config"]["variant"] == "r-rome"
