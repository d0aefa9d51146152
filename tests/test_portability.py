"""The KnowEdit benchmark's files (portability and locality probes): read as EasyEdit documents them, scored as
EasyEdit scores them (hand-computed cases), and run on a tiny model; QAEdit, whose questions are the prompts."""

import json

import pytest

from factedit import Editor
from factedit.core.requests import Request
from factedit.evaluation import EvalConfig, GenerationConfig, run_eval
from factedit.evaluation.datasets import DatasetError, KnowEditCase, Probe, load_cases
from factedit.evaluation.scoring import knowedit_case
from tiny import tiny_model

# the three layouts of KnowEdit's README (examples/KnowEdit.md of EasyEdit), as they are
RECENT = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
          "portability": {
              "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?",
                                          "ground_truth": [["no"], ["incorrect"], ["false"]]}],
              "Reasoning": [{"prompt": "The name of the continent which the place of death of Leo Arons is part of is",
                             "ground_truth": [["Europe", "European continent", "Old Continent"]]}],
              "Subject_Aliasing": [{"prompt": "The place of death of Martin Leo Arons is",
                                    "ground_truth": [["Berlin", "Berlin, Germany"]]}]},
          "locality": {"Relation_Specificity": [
              {"prompt": "The name of the father of Leo Arons is", "ground_truth": [["Albert Arons"]]},
              {"prompt": "The name of the field of work of Leo Arons is", "ground_truth": [["experimental physics"]]}]}}
COUNTERFACT = {"subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
               "target_new": "Archbishop of León, Mexico", "ground_truth": "mayor of Vienna",
               "portability": {"Subject_Aliasing": [
                   {"prompt": "The name of the position held by Frederic of Pieschen is",
                    "ground_truth": "Archbishop of León, Mexico"}]},
               "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is",
                                                      "ground_truth": "male"}],
                            "Forgetfulness": [
                                {"prompt": "The name of the position held by Frederic Piesch, which is not Archbishop "
                                           "of León, Mexico, is", "ground_truth": "mayor of Vienna"}]}}
ZSRE = {"subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
        "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
        "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
        "locality": {"Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
            {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]}]},
        "portability": {"Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras belongs to?",
                                       "ground_truth": "Owlet moths"}]}}


def _write(tmp_path, records, name="ke.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records), encoding="utf-8")
    return p


def test_the_three_knowedit_layouts_read_with_their_probes(tmp_path):
    recent, cf, zsre = (load_cases(_write(tmp_path, [r], f"{i}.json"))[0]
                        for i, r in enumerate((RECENT, COUNTERFACT, ZSRE)))
    assert all(isinstance(c, KnowEditCase) for c in (recent, cf, zsre))
    assert recent.request == Request("The place of death of {} is", "Leo Arons", "Berlin", None)  # an insertion
    assert recent.portability[0] == Probe("Logical_Generalization", "Is Leo Arons still alive?",
                                          ("no", "incorrect", "false"))
    assert recent.portability[1].answers == ("Europe", "European continent", "Old Continent")
    assert [p.category for p in recent.locality] == ["Relation_Specificity"] * 2
    assert cf.request.target_true == "mayor of Vienna" and cf.rephrase == ()
    assert [p.category for p in cf.locality] == ["Relation_Specificity", "Forgetfulness"]
    assert zsre.request == Request("Which family does {} belong to?", "Epaspidoceras", "Noctuidae", "Aspidoceratidae")
    assert zsre.rephrase == ("What family are Epaspidoceras?",)
    assert zsre.portability == (Probe("Reasoning", "What is the common name for the family Epaspidoceras belongs to?",
                                      ("Owlet moths",)),)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(portability=[1]), "field 'portability' must be an object of categories"),
    (lambda r: r["portability"]["Reasoning"][0].pop("ground_truth"), r"portability.Reasoning\[0\]: missing field "
                                                                      "'ground_truth'"),
    (lambda r: r["portability"]["Reasoning"][0].update(ground_truth=[3]), "must be a string, a list of strings"),
    (lambda r: r["locality"].update(Relation_Specificity={"prompt": "x"}), "must be a list of"),
    (lambda r: (r.pop("portability"), r.update(locality={})), "no portability or locality probe"),
    (lambda r: r.update(prompt="Which family does it belong to?"), "subject"),
    (lambda r: r.pop("target_new"), "missing field 'target_new'"),
])
def test_a_malformed_knowedit_record_is_refused_by_name(tmp_path, change, message):
    rec = json.loads(json.dumps(ZSRE))
    change(rec)
    with pytest.raises(DatasetError, match=message):
        load_cases(_write(tmp_path, [rec]))


def test_knowedit_scores_of_a_hand_computed_case():
    got = knowedit_case(
        [True, False], [[True, True]],
        [("Reasoning", [True, False, False, False]), ("Reasoning", [True]), ("Subject_Aliasing", [False, True])],
        [("Relation_Specificity", [5, 6, 7], [5, 6, 8]), ("Forgetfulness", [1], [1])],
        {"rewrite": ["Noctuidae, a family"], "rephrase": ["Noctuidae."], "portability": ["Owlet moths.", "no idea",
                                                                                         "Berlin, Germany"],
         "locality": ["genus", "a species"]},
        {"rewrite": (("Noctuidae",), ("Aspidoceratidae",)), "portability": [("Owlet moths",), ("x",), ("Berlin",)]},
        ["Genus.", "genus"])
    reasoning = (0.25 + 1.0) / 2
    assert got == pytest.approx({
        "rewrite_acc": 0.5, "rephrase_acc": 1.0, "portability": (reasoning + 0.5) / 2,
        "portability_reasoning": reasoning,
        "portability_subject_aliasing": 0.5, "locality": (2 / 3 + 1.0) / 2, "locality_relation_specificity": 2 / 3,
        "locality_forgetfulness": 1.0, "rewrite_gen": 1.0, "portability_gen": (0.5 + 1.0) / 2, "locality_gen": 0.5,
        "rephrase_gen": 1.0, "rewrite_em": 0.0, "rephrase_em": 1.0})


def _cfg(tiny_corpus, path, method):
    opts = {"stats_corpus": str(tiny_corpus), "stats_tokens": 2000, "steps": 4, "layers": (1, 2)}
    return EvalConfig(method=method, dataset=str(path), generation=GenerationConfig(length=0), gen_tokens=6,
                      method_options=tuple(sorted(opts.items())) if method != "none" else ())


def test_unedited_locality_is_exactly_one_and_an_edit_is_scored_against_it(home, tiny_corpus, tmp_path):
    path = _write(tmp_path, [{**COUNTERFACT, "case_id": 1}, {**ZSRE, "case_id": 2}])
    model, tok = tiny_model("llama")
    base = run_eval(Editor(model, tok, progress=False), _cfg(tiny_corpus, path, "none"), tmp_path / "none")
    # the unedited model predicts what the unedited model predicted: the definition's fixed point
    assert base["locality"] == 100.0 and base["locality_gen"] == 100.0 and base["n"] == 2
    edited = run_eval(Editor(model, tok, progress=False), _cfg(tiny_corpus, path, "memit"), tmp_path / "memit")
    recs = [json.loads(l) for l in (tmp_path / "memit" / "cases.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["knowedit"] * 2
    for r in recs:
        assert 0 <= r["rewrite_acc"] <= 1 and 0 <= r["locality"] <= 1 and r["portability"] is not None
        assert set(r["gen_texts"]) == {"rewrite", "rephrase", "portability", "locality"}
    assert recs[0]["locality_forgetfulness"] is not None and recs[1]["rephrase_acc"] is not None
    for k in ("rewrite_acc", "portability", "locality", "rewrite_gen", "portability_gen", "locality_gen"):
        assert edited[k] is not None


# ---------------------------------------------------------------------------------------------- QAEdit
QA = {"id": 1104, "source": "NQ", "prompt": "who has the most 70 point games in nba history?",
      "target": "Wilt Chamberlain *", "subject": "most 70 point games in nba history",
      "rephrase": "Which NBA player holds the record for the most games scoring 70 points or more?",
      "locality": [{"loc": "who is the saint that protects police officers", "loc_ans": "Michael"},
                   {"loc": "when did the us host the world cup", "loc_ans": "1994"}]}


def test_qaedit_questions_are_prompts_with_the_subject_located_inside(tmp_path):
    from factedit.evaluation.datasets import QAEditCase

    other = {**QA, "id": 1104, "source": "TQA", "subject": "Most 70 Point Games"}  # same id, another source
    missing = {**QA, "id": 7, "subject": "Kareem Abdul-Jabbar"}
    a, b, c = load_cases(_write(tmp_path, [QA, other, missing]))
    assert isinstance(a, QAEditCase) and a.kind == "qaedit"
    assert (a.case_id, b.case_id, c.case_id) == (0, 1, 2) and (a.source, b.source) == ("NQ:1104", "TQA:1104")
    assert a.request == Request("who has the {} in nba history?".replace("{} in nba history", "{}"),
                                "most 70 point games in nba history", "Wilt Chamberlain *")
    assert a.request.text == QA["prompt"] and a.rephrase == (QA["rephrase"],)
    assert a.locality == (Probe("QA", "who is the saint that protects police officers", ("Michael",)),
                          Probe("QA", "when did the us host the world cup", ("1994",)))
    assert b.request.subject == "most 70 point games"  # as the question spells it
    assert c.problem and "does not occur in the question" in c.problem and c.requests == ()


@pytest.mark.parametrize("sequential", [False, True])
def test_qaedit_run_counts_a_case_without_its_subject_as_a_failed_edit(home, tiny_corpus, tmp_path, sequential):
    from dataclasses import replace

    path = _write(tmp_path, [QA, {**QA, "id": 7, "subject": "Kareem Abdul-Jabbar"}])
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    s = run_eval(ed, replace(_cfg(tiny_corpus, path, "memit"), sequential=sequential), tmp_path / "run")
    assert len(ed.history) == (1 if sequential else 0)  # the case that could not be edited made no edit
    recs = [json.loads(l) for l in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["qaedit"] * 2
    assert "error" not in recs[0] and recs[0]["rewrite_em"] in (0.0, 1.0) and recs[0]["rephrase_gen"] is not None
    assert recs[1]["error"].startswith("RequestError: subject 'Kareem Abdul-Jabbar' does not occur")
    assert recs[1]["request"]["prompt"] == QA["prompt"]
    assert s["n"] == 2 and s["errors"] == 1
    assert s["rewrite_acc"] == pytest.approx(100 * recs[0]["rewrite_acc"] / 2)  # the failure counts 0
    assert s["locality"] == pytest.approx(100 * recs[0]["locality"])  # locality averages over the edits made


def test_qaedit_locality_is_read_without_generations(home, tiny_corpus, tmp_path):
    """The teacher-forced locality needs the unedited model's top-1 tokens even when no answer is generated."""
    from dataclasses import replace

    path = _write(tmp_path, [QA])
    model, tok = tiny_model("llama")
    s = run_eval(Editor(model, tok, progress=False), replace(_cfg(tiny_corpus, path, "none"), gen_tokens=0),
                 tmp_path / "run")
    assert s["locality"] == 100.0 and s["rewrite_gen"] is None


def test_a_sequential_qaedit_checkpoint_rescores_its_edits_with_qaedit_scores(home, tiny_corpus, tmp_path):
    """WILD's sequential protocol: the edits re-scored after the last one. With one edit the checkpoint's scores
    are the case's own right-after scores (nothing changed in between), and the checkpoint table shows them."""
    from dataclasses import replace

    from factedit.evaluation.ability import AbilityConfig
    from factedit.evaluation.summarize import checkpoint_table, load_run

    path = _write(tmp_path, [QA])
    model, tok = tiny_model("llama")
    cfg = replace(_cfg(tiny_corpus, path, "memit"), sequential=True, checkpoints=[1],
                  ability=AbilityConfig(ppl_corpus=str(tiny_corpus), ppl_tokens=200, window=64))
    run_eval(Editor(model, tok, progress=False), cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "cases.jsonl").read_text().splitlines()[0])
    ends = [json.loads(l) for l in (tmp_path / "run" / "downstream.jsonl").read_text().splitlines()]
    assert [d["n_edits"] for d in ends] == [0, 1] and ends[0]["retention"] is None
    ret = ends[1]["retention"]
    for k in ("rewrite_acc", "rephrase_acc", "locality", "rewrite_gen", "rewrite_em", "rephrase_gen", "rephrase_em",
              "locality_gen"):
        assert ret[k] == pytest.approx(100 * rec[k], rel=1e-5, abs=1e-6), k
    table = checkpoint_table(load_run(tmp_path / "run")).splitlines()
    assert table[0].startswith("| edits | edit succ. | rephrase | locality | edit gen | edit EM | rephrase gen | "
                               "rephrase EM | locality gen | re-scored | perplexity |")
    assert table[-1].startswith(f"| 1 | {100 * rec['rewrite_acc']:.1f} |")
    import warnings

    from factedit.evaluation.summarize import plot_runs, score_panels, sequential_table

    run = load_run(tmp_path / "run")
    seq = sequential_table([run]).splitlines()  # the run's own scores at its end, beside the ability measures
    cell = dict(zip((c.strip(" |") for c in seq[0].split(" | ")), (c.strip(" |") for c in seq[2].split(" | "))))
    assert cell["edit succ. at end"] == f"{ret['rewrite_acc']:.1f}" and cell["re-scored at end"] == "all"
    assert cell["locality gen at end"] == f"{ret['locality_gen']:.1f}" and cell["ES at end"] == "–"
    # the plot of the re-scored edits has the QAEdit panels (not CounterFact's empty ES/PS/NS), with a legend
    assert score_panels([run]) == [("rewrite_acc", "rewrite_gen"), ("rephrase_acc", "rephrase_gen"),
                                   ("locality", "locality_gen")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no labelled line
        written = plot_runs([run], tmp_path / "plots")
    assert tmp_path / "plots" / "sequential_scores.png" in written
