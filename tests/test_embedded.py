"""Integration tests on the embedded SmolLM2-135M-Instruct (slow: minutes, not hours)."""

import json

import pytest
import torch

from conftest import COUNTERFACT, STATS, STATS_ARGS
from factedit import GuardConfig, Request
from factedit.core.lm import greedy_continuation, target_probabilities

pytestmark = pytest.mark.slow


def test_eiffel_tower_to_rome(embedded):
    ed = embedded
    req = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    japan_before = greedy_continuation(ed.adapter, "The capital of Japan is", 6)
    assert "Tokyo" in japan_before
    p_new0, p_true0 = target_probabilities(ed.adapter, [req.text] * 2, ["Rome", "Paris"])
    assert p_true0 > p_new0
    w0 = ed.adapter.w_out_parameter(5).detach().clone()
    result = ed.edit(req, **STATS)
    try:
        p_new, p_true = target_probabilities(ed.adapter, [req.text] * 2, ["Rome", "Paris"])
        assert p_new > p_true
        assert "Rome" in greedy_continuation(ed.adapter, req.text, 6)
        assert greedy_continuation(ed.adapter, "The capital of Japan is", 6) == japan_before
        assert result.layers == [5]
    finally:
        ed.revert()
    # the revert is bit-exact on the weights; probabilities are compared only between identical calls
    # (a different batch shape may round differently in the last bits)
    assert torch.equal(ed.adapter.w_out_parameter(5), w0)
    assert target_probabilities(ed.adapter, [req.text] * 2, ["Rome", "Paris"]) == [p_new0, p_true0]


def _records(n):
    with open(COUNTERFACT, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_counterfact_first_records(embedded):
    """r-ROME takes hold on each of the first 6 CounterFact records (P(new) > P(true) on the rewrite
    prompt). The edits are deterministic, so these records are a fixed regression check; six of them
    span five relations (mother tongue, religion, instrument, location, twin city), which is what the
    ten of earlier versions added over one record. The guard is off: its decisions are tested on
    their own (test_embedded_patch.py)."""
    ed = embedded
    failures = []
    for rec in _records(6):
        req = Request.from_filled(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
        ed.edit(req, guard=GuardConfig(enabled=False), **STATS)
        try:
            p_new, p_true = target_probabilities(ed.adapter, [req.text] * 2, [req.target_new, req.target_true])
            if not p_new > p_true:
                failures.append((rec["case_id"], p_new, p_true))
        finally:
            ed.revert()
    assert not failures


def test_cli_demo_json(embedded, capsys):
    from factedit.cli import main

    code = main(["edit", "--prompt", "{} is located in the city of", "--subject", "Eiffel Tower",
                 "--target", "Rome", "--true", "Paris", *STATS_ARGS, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    obj = json.loads(out)
    assert obj["after"]["p_new"] > obj["after"]["p_true"]
    assert obj["before"]["p_true"] > obj["before"]["p_new"]
    assert "Rome" in obj["after"]["generation"]
    # the object's keys are the interface scripts read (unchanged when the report's reads were batched; the
    # wear meter and the guard's wear warnings added with issue 32)
    assert set(obj) == {"method", "model", "layers", "request", "before", "after", "chat", "layer_rule", "verified",
                        "verification", "retried", "delta_norm", "seconds", "guard", "rounding", "statistics",
                        "prompt_prefix", "timings", "side_effects", "total_seconds", "wear", "warnings"}
    for side in ("before", "after"):
        assert set(obj[side]) == {"p_new", "p_true", "generation", "paraphrase_generations", "chat_answer"}
    # the continuations are greedy decoding's, one prompt at a time (the fixture holds the same unedited weights)
    from factedit.core.lm import greedy_continuation

    assert not embedded.history
    assert obj["before"]["generation"] == greedy_continuation(embedded.adapter, "Eiffel Tower is located in the "
                                                              "city of", 12)


def _cli_edit(capsys, *argv):
    from factedit.cli import main

    code = main(["edit", *argv, *STATS_ARGS, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_position_0_subject_takes_after_the_prompt_prefix(embedded, capsys):
    """"{} was founded by" / Microsoft: the subject was read at position 0 (no BOS: the attention-sink
    position) and the edit changed nothing (P 0.2050 -> 0.2050). Read after the prompt prefix it takes;
    read at position 0 (``--prompt-prefix none``) it still does not, and the verification refuses it."""
    request = ["--prompt", "{} was founded by", "--subject", "Microsoft", "--target", "Elon Musk"]
    code, obj, err = _cli_edit(capsys, *request)
    assert code == 0, err
    assert obj["prompt_prefix"] == "\n" and obj["verified"] is True
    assert obj["before"]["p_new"] < 0.3 and obj["after"]["p_new"] > 0.9 and "Elon Musk" in obj["after"]["generation"]
    code, obj, err = _cli_edit(capsys, *request, "--prompt-prefix", "none")
    assert code == 2 and obj["verified"] is False and "did not take" in err
    assert "--prompt-prefix auto" in err  # says what to do about it


def test_nigel_de_jong_takes_or_is_refused(embedded, capsys):
    """The case the side-by-side run with EasyEdit found failing silently: with the default settings
    it takes on its own prompt (P(new) > P(true)) or the CLI exits non-zero saying so."""
    code, obj, err = _cli_edit(capsys, "--prompt", "{} plays in the position of", "--subject", "Nigel de Jong",
                               "--target", "pitcher", "--true", "midfielder")
    if code == 0:
        assert obj["verified"] is True and obj["after"]["p_new"] > obj["after"]["p_true"]
        assert obj["verification"]["p_new"] > obj["verification"]["p_true"]
    else:
        assert code == 2 and "did not take" in err
