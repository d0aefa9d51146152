"""MQuAKE: the multi-hop data set read as it is, its scores on hand-written cases, and runs on a tiny model
(several edits per case, the unedited side in the same run, bad files refused)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import SHARED
from factedit import Editor
from factedit.core.fingerprints import matrix_fingerprint
from factedit.core.requests import Request
from factedit.evaluation import EvalConfig, GenerationConfig, run_eval
from factedit.evaluation.datasets import DatasetError, MQuAKECase, load_cases
from factedit.evaluation.score_model import mquake_prompts, qa_prompt
from factedit.evaluation.scoring import answer_side, mquake_case, summarize_records
from tiny import tiny_model

MQUAKE = SHARED / "data" / "mquake" / "mquake_cf_354.json"
needs_data = pytest.mark.skipif(not MQUAKE.is_file(), reason="shared data not found")


def _record(**over):
    rec = {"case_id": 7,
           "requested_rewrite": [
               {"prompt": "{} is a citizen of", "subject": "Ellie Kemper", "relation_id": "P27",
                "target_new": {"str": "Croatia", "id": "Q224"}, "target_true": {"str": "United States of America"},
                "question": "What is the country of citizenship of Ellie Kemper?"},
               {"prompt": "The head of state of {} is", "subject": "Croatia",
                "target_new": {"str": "Zoran Milanović"}, "target_true": {"str": "Kolinda Grabar-Kitarović"}}],
           "questions": ["Who is the head of state of the country Ellie Kemper is a citizen of?"] * 3,
           "answer": "Donald Trump", "answer_alias": ["Trump", "Donald J. Trump"],
           "new_answer": "Zoran Milanović", "new_answer_alias": ["Milanović"],
           "single_hops": [{"question": "Q1?", "cloze": "Ellie Kemper is a citizen of",
                            "answer": "United States of America", "answer_alias": ["USA", "US"]},
                           {"question": "Q2?", "cloze": "The head of state of United States of America is",
                            "answer": "Donald Trump", "answer_alias": ["Trump"]}],
           "new_single_hops": [{"question": "Q1?", "cloze": "Ellie Kemper is a citizen of", "answer": "Croatia",
                                "answer_alias": ["Republic of Croatia"]},
                               {"question": "Q3?", "cloze": "The head of state of Croatia is",
                                "answer": "Zoran Milanović", "answer_alias": ["Milanović"]}]}
    rec.update(over)
    return rec


def _write(tmp_path, records, name="mq.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records), encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------- the file
@needs_data
def test_the_shared_file_reads_as_354_cases_of_one_to_three_edits():
    cases = load_cases(MQUAKE)
    assert len(cases) == 354 and all(isinstance(c, MQuAKECase) for c in cases)
    counts = [len(c.requests) for c in cases]
    assert (counts.count(1), counts.count(2), counts.count(3)) == (277, 72, 5)
    c = cases[0]
    assert c.request == Request("{} is a citizen of", "Ellie Kemper", "Croatia", "United States of America")
    assert c.new_names == ("Kolinda Grabar-Kitarović", "Grabar-Kitarović") and len(c.questions) == 3
    # every edit is stated by a hop of the new chain, and its old object by the unedited chain's hop
    for case in cases:
        for r, hop, old in case.edited_hops():
            assert hop.cloze == r.text and hop.answer == r.target_new and old[0] == r.target_true


def test_hand_written_record_parses_with_its_edits_and_hops(tmp_path):
    (c,) = load_cases(_write(tmp_path, [_record()]))
    assert [r.target_new for r in c.requests] == ["Croatia", "Zoran Milanović"]
    assert c.requests[1].text == "The head of state of Croatia is"
    hops = c.edited_hops()
    assert hops[0][1].names == ("Croatia", "Republic of Croatia")
    assert hops[0][2] == ("United States of America", "USA", "US")
    assert hops[1][2] == ("Kolinda Grabar-Kitarović",)  # no hop of the old chain states it: the request's
    # the second hop of the new chain has another cloze than the old chain's: it has no old answer
    assert c.hop_names() == [(("Croatia", "Republic of Croatia"), ("United States of America", "USA", "US")),
                             (("Zoran Milanović", "Milanović"), ())]
    p = mquake_prompts(c)
    assert p["multihop"] == [qa_prompt(q) for q in c.questions] and p["edits"] == [r.text for r in c.requests]
    assert mquake_prompts(c, chat=True)["multihop"] == list(c.questions)  # the chat template frames them
    assert p["base_hops"] == ["Ellie Kemper is a citizen of", "The head of state of United States of America is"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("new_answer"), "missing field 'new_answer'"),
    (lambda r: r.pop("questions"), "missing field 'questions'"),
    (lambda r: r.update(questions=[]), "field 'questions' is empty"),
    (lambda r: r.update(answer=""), "field 'answer' must be a non-empty string"),
    (lambda r: r.update(requested_rewrite=[]), "'requested_rewrite' must be a non-empty list"),
    (lambda r: r["requested_rewrite"][1].pop("subject"), "requested_rewrite[1]"),
    (lambda r: r["requested_rewrite"][0].pop("target_true"), "'target_true' is needed"),
    (lambda r: r.pop("new_single_hops"), "field 'new_single_hops' must be a non-empty list"),
    (lambda r: r["single_hops"][1].pop("cloze"), "single_hops[1]: missing field 'cloze'"),
    (lambda r: r.update(new_answer_alias="Milanović"), "field 'new_answer_alias' must be a list"),
])
def test_a_malformed_record_is_refused_by_name(tmp_path, change, message):
    rec = _record()
    change(rec)
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_cases(_write(tmp_path, [_record(case_id=1), rec]))


def test_cli_refuses_a_bad_mquake_file_with_exit_2_and_writes_nothing(tmp_path, tiny_dir):
    rec = _record()
    del rec["new_single_hops"]
    bad = _write(tmp_path, [rec])
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "factedit", "eval", "--model", str(tiny_dir), "--method", "none",
                          "--dataset", str(bad), "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "FACTEDIT_HOME": str(tmp_path / "h")})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "new_single_hops" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- scoring
def test_answer_side_reads_aliases_whole_words_and_nested_names():
    new, old = ("Zoran Milanović", "Milanović"), ("Donald Trump", "Trump")
    assert answer_side("It is zoran milanović.", new, old) == "new"  # case and punctuation do not matter
    assert answer_side("President Trump", new, old) == "old"
    assert answer_side("Milanović, not Trump", new, old) == "both"
    assert answer_side("Trumpet player", new, old) is None  # whole words only
    # a name inside a longer name of the other side counts for the longer one only
    assert answer_side("Donald Trump Jr.", ("Donald Trump Jr.",), old) == "new"
    assert answer_side("the US of America", ("Croatia",), ("US of America", "US")) == "old"
    assert answer_side("Croatia and the US", ("Croatia",), ("US",)) == "both"


def test_mquake_case_scores_a_hand_computed_case():
    edit_pairs = [(-1.0, -2.0), (-3.0, -2.0)]  # edit 1 takes, edit 2 does not
    q_pairs = [(-5.0, -4.0), (-2.0, -2.0), (-1.0, -3.0)]  # only the third question prefers the new answer (ties fail)
    hits = [[True, False], [False, False], [True, True]]
    new, old = ("Zoran Milanović", "Milanović"), ("Donald Trump", "Trump")
    texts = {"edits": ["Croatia.", "Kolinda Grabar-Kitarović."], "edits_q": ["Republic of Croatia", "Milanović"],
             "hops": ["Croatia", "Milanović"],
             "multihop": ["Milanović.", "Trump, or rather Milanović", "Donald Trump"]}
    names = {"edits": [(("Croatia",), ("USA",)), (new, ("Kolinda Grabar-Kitarović",))],
             "hops": [(("Croatia",), ("USA",)), (new, ())], "multihop": (new, old)}
    unedited = {"tf": [(-4.0, -1.0), (-1.0, -1.0), (-3.0, -2.0)],
                "multihop": ["Trump", "I do not know", "Milanović"], "hops": ["USA", "Donald Trump"],
                "hop_names": [("United States of America", "USA"), ("Donald Trump", "Trump")]}
    got = mquake_case(edit_pairs, q_pairs, hits, texts, names, unedited)
    assert got == {"edit_tf": 0.5, "multihop_tf": 1.0, "multihop_tf_q": 1 / 3, "portability": (0.5 + 0 + 1) / 3,
                   "edit_gen": 0.5, "edit_gen_q": 1.0, "instance_gen": 1.0, "multihop_gen": 1.0,
                   "multihop_gen_q": 1 / 3, "multihop_old": 1 / 3,
                   "base_multihop_tf": 1.0, "base_multihop_gen": 1.0, "base_multihop_new": 1.0,
                   "base_instance_gen": 1.0}
    # one hop of the new chain not answered: the instance fails; no question answered new: multi-hop fails
    texts2 = {**texts, "hops": ["Croatia", "Kolinda"], "multihop": ["Trump"] * 3}
    got2 = mquake_case(edit_pairs, q_pairs, hits, texts2, names)
    assert got2["instance_gen"] == 0.0 and got2["multihop_gen"] == 0.0 and got2["multihop_old"] == 1.0
    assert "base_multihop_gen" not in got2
    # teacher-forced only (no generations)
    assert set(mquake_case(edit_pairs, q_pairs, hits)) == {"edit_tf", "multihop_tf", "multihop_tf_q", "portability"}


def test_a_failed_mquake_edit_counts_zero_in_the_summary():
    ok = {"kind": "mquake", "edit_tf": 1.0, "multihop_gen": 1.0, "base_multihop_gen": 1.0}
    failed = {"kind": "mquake", "error": "RequestError: no subject"}
    s = summarize_records([ok, failed])
    assert s["n"] == 2 and s["errors"] == 1
    assert s["edit_tf"] == 50.0 and s["multihop_gen"] == 50.0
    assert s["base_multihop_gen"] == 100.0  # the unedited model's score is not a success rate of the edit


# ---------------------------------------------------------------------------------------------- runs
def _cfg(tiny_corpus, path, method, **kw):
    opts = {"stats_corpus": str(tiny_corpus), "stats_tokens": 2000, "steps": 4}
    opts.update({"layers": (1, 2)} if method in ("memit", "emmet") else {"layer": 1})
    return EvalConfig(method=method, dataset=str(path), generation=GenerationConfig(length=0), gen_tokens=6,
                      method_options=tuple(sorted(opts.items())), **kw)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_a_run_edits_all_of_a_case_then_scores_and_restores(home, tiny_corpus, tmp_path, method):
    one_edit = _record(case_id=2, requested_rewrite=_record()["requested_rewrite"][:1])
    path = _write(tmp_path, [_record(case_id=1), one_edit])
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    before = {l: matrix_fingerprint(ed.adapter.w_out_stored(l)) for l in (1, 2)}
    seen = []
    real_score = __import__("factedit.evaluation.runner", fromlist=["score_cases"]).score_cases

    def spy(adapter, cases, *a, **kw):  # what the weights hold when a case is scored
        seen.append({l: matrix_fingerprint(adapter.w_out_stored(l)) for l in (1, 2)})
        return real_score(adapter, cases, *a, **kw)

    import factedit.evaluation.runner as runner
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "score_cases", spy)
    try:
        s = run_eval(ed, _cfg(tiny_corpus, path, method, verify=method == "rome"), tmp_path / "run")
    finally:
        mp.undo()
    recs = [json.loads(l) for l in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert [len(r["requests"]) for r in recs] == [2, 1]
    assert {l: matrix_fingerprint(ed.adapter.w_out_stored(l)) for l in (1, 2)} == before  # reverted
    if method == "rome":  # applied one after another (the second edit on the first's weights), then scored
        assert len(seen) == 2 and seen[0][1] != before[1]
        assert len(recs[0]["verification"]["edits"]) == 2
    for r in recs:
        assert 0 <= r["edit_tf"] <= 1 and r["multihop_tf"] in (0.0, 1.0)
        assert {"base_multihop_tf", "base_multihop_gen", "base_instance_gen"} <= set(r)
        assert len(r["gen_texts"]["multihop"]) == 3 and len(r["gen_texts"]["edits"]) == len(r["requests"])
    unedited = json.loads((tmp_path / "run" / "unedited.json").read_text())
    assert set(unedited) == {"1", "2"} and len(unedited["1"]["tf"]) == 3
    assert s["n"] == 2 and s["mode"].startswith("each case edited alone")
    for k in ("edit_tf", "multihop_tf", "portability", "multihop_gen", "base_multihop_gen"):
        assert s[k] is not None


def test_the_unedited_side_is_the_baseline_run(home, tiny_corpus, tmp_path):
    """The baseline scores recorded beside every edit are what the unedited model (method none) scores."""
    path = _write(tmp_path, [_record(case_id=1)])
    model, tok = tiny_model("llama")
    base = run_eval(Editor(model, tok, progress=False), _cfg(tiny_corpus, path, "none"), tmp_path / "none")
    edited = run_eval(Editor(model, tok, progress=False), _cfg(tiny_corpus, path, "memit"), tmp_path / "memit")
    rec = json.loads((tmp_path / "none" / "cases.jsonl").read_text())
    # on the unedited model, the old chain answered = the old answer beating the new one on some question
    assert base["base_multihop_tf"] == edited["base_multihop_tf"]
    assert rec["base_multihop_tf"] == float(any(b > a for a, b in rec["question_lp"]))
    assert torch.isfinite(torch.tensor(rec["question_lp"])).all()


def test_the_evaluate_tab_shows_the_multi_hop_columns_and_answer():
    from factedit.ui.render import render_eval

    rec = {"case_id": 1, "kind": "mquake", "request": {"prompt": "{} is a citizen of", "subject": "Ellie Kemper",
                                                       "target_new": "Croatia"},
           "multihop_gen": 1.0, "base_multihop_gen": 0.0, "gen_texts": {"multihop": ["Zoran Milanović."]}}
    html = render_eval({"n": 1, "multihop_gen": 100.0, "mode": "each case edited alone"}, [rec], True)
    assert "multihop-gen" in html and "base-multihop-gen" in html and "Zoran Milanović." in html
    assert ">ES<" not in html  # CounterFact's columns are not shown for MQuAKE runs
