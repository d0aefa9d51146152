"""Verification: an edit that did not take is never silent (rule, retry, CLI refusal, records)."""

import json
import math

import pytest
import torch

from factedit import Editor, Patch, Request, ValueConfig
from factedit.cli import main
from factedit.edit.verify import VERIFY_MIN_P, verified_by_scores, verify_request
from tiny import tiny_model


def test_rule_on_the_two_reported_failures():
    # "{} was founded by" / Microsoft -> "Elon Musk": P(new) 0.2050 before and after, true target far below
    assert not verified_by_scores(math.log(0.2050), new_is_greedy=False, lp_true=math.log(0.0126))
    # "Nigel de Jong plays in the position of" -> pitcher: the true target still ahead (margin -2.85)
    assert not verified_by_scores(math.log(0.03), new_is_greedy=True, lp_true=math.log(0.03) + 2.85)
    assert verified_by_scores(math.log(0.2), new_is_greedy=True, lp_true=math.log(0.01))
    assert verified_by_scores(math.log(VERIFY_MIN_P), new_is_greedy=False, lp_true=math.log(0.1))
    assert verified_by_scores(math.log(0.9), new_is_greedy=False)  # no true target named


def test_outcome_matches_an_independent_greedy_and_probability(home):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    req = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    out = verify_request(ed.adapter, req)
    assert ed.adapter.prompt_prefix == "\n"  # the tiny tokenizer adds no BOS: prompts start with a newline
    start = tok("\n", add_special_tokens=False)["input_ids"]
    ids = start + tok(req.text)["input_ids"]
    new = tok(req.text + " Rome")["input_ids"][len(ids) - len(start):]
    logits = model(torch.tensor([ids + new])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    lp_new = float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(new)) / len(new))
    assert out["p_new"] == pytest.approx(math.exp(lp_new), rel=1e-4)
    assert out["new_is_greedy"] == (int(logits[len(ids) - 1].argmax()) == new[0])


UNTAKEABLE = ["--steps", "1", "--set", "value.lr=1e-7"]  # δ stays ~0: the edit cannot take


def test_an_edit_that_does_not_take_is_retried_flagged_and_refused_by_the_cli(tiny_dir, tiny_corpus, home,
                                                                               tmp_path, capsys):
    from factedit import load_model

    model, tok = load_model(str(tiny_dir))
    ed = Editor(model, tok, progress=False)
    req = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    w0 = ed.adapter.w_out_parameter(1).detach().clone()
    r = ed.edit(req, layer=1, stats_corpus=str(tiny_corpus), stats_tokens=600, value=ValueConfig(steps=1, lr=1e-7))
    assert r.verified is False and r.retried and r.config.value.steps == 2 and r.config.value.bare_weight == 0.5
    meta = Patch.from_result(r).meta
    assert meta["verified"] is False and meta["retried"] is True and meta["verification"][0]["verified"] is False
    ed.revert()
    assert torch.equal(ed.adapter.w_out_parameter(1), w0)

    patch, saved = tmp_path / "p.safetensors", tmp_path / "saved"
    argv = ["edit", "--model", str(tiny_dir), "--prompt", "{} is located in the city of", "--subject", "Eiffel Tower",
            "--target", "Rome", "--true", "Paris", "--layer", "1", "--stats-corpus", str(tiny_corpus), "--stats-tokens",
            "600", "--no-guard", *UNTAKEABLE, "--save-patch", str(patch), "--save-model", str(saved), "--json"]
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 2 and "did not take" in cap.err and "--allow-unverified" in cap.err
    assert json.loads(cap.out)["verified"] is False
    assert not patch.exists() and not saved.exists()  # nothing saved: the model on disk is unchanged
    assert main(argv + ["--allow-unverified"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is False
    assert Patch.load(patch).meta["verified"] is False


def test_batch_reports_every_request(tiny_dir, tiny_corpus, home, tmp_path, capsys):
    path = tmp_path / "reqs.jsonl"
    reqs = [{"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
             "target_true": "Paris"}, {"prompt": "{} is in", "subject": "Space Needle", "target_new": "Tokyo"}]
    path.write_text("\n".join(json.dumps(r) for r in reqs))
    base = ["edit", "--model", str(tiny_dir), "--requests", str(path), "--method", "memit", "--layers", "1,2",
            "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "2", "--no-guard"]
    code = main(base + ["--json", "--allow-unverified"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and [o["prompt"] for o in out["requests"]] == ["Eiffel Tower is located in the city of",
                                                                     "Space Needle is in"]
    assert all({"verified", "p_new", "p_true", "new_is_greedy"} <= set(o) for o in out["requests"])
    assert out["n_verified"] == sum(o["verified"] for o in out["requests"])
    code = main(base + UNTAKEABLE)
    cap = capsys.readouterr()
    assert code == 2 and cap.out.count("FAILED") == 2 and "2 of 2 edits did not take" in cap.err
