"""`factedit audit` on the embedded model: a real r-ROME edit of a CounterFact record is found at its layer,
its subject named first among CounterFact subjects, and its new object named first. The record is one whose
edit also changes answers on other relations ("the UK." for *is located in* after the mother tongue became
English), which a ranking that summed the evidence of every prompt named second."""

import pytest

from conftest import COUNTERFACT, STATS

pytestmark = pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")


def test_an_edit_of_the_embedded_model_is_found_and_its_new_object_named_first(embedded):
    from factedit.audit import LoadedTensors, TensorFiles, audit_files
    from factedit.audit.explain import explain_report, load_candidates
    from factedit.core.answers import mentions
    from factedit.core.models import embedded_model_dir
    from factedit.edit.guard import GuardConfig
    from factedit.evaluation import load_cases

    (case,) = [c for c in load_cases(COUNTERFACT, limit=200) if c.request.subject == "Thomas Joannes Stieltjes"]
    req = case.request
    pool = load_candidates(COUNTERFACT)[:200]
    assert req.subject in {c.subject for c in pool}
    res = embedded.edit([req], method="r-rome", guard=GuardConfig(enabled=False), verify=False, **STATS)
    try:
        report = audit_files(TensorFiles(embedded_model_dir()), LoadedTensors(embedded.model, "edited"))
    finally:
        embedded.revert()
    (e,) = report.edits
    assert e.layers == sorted(res.layers) and e.rank == 1
    explain_report(report, embedded.model, embedded.tokenizer, pool,
                   {"corpus": STATS["stats_corpus"], "n_tokens": STATS["stats_tokens"]})
    x = e.explanation
    assert x.subjects[0]["text"] == req.subject
    assert mentions(x.new_objects[0]["text"], [req.target_new]), x.new_objects[:3]
    own = [ev for ev in x.evidence if ev["prompt"] == req.prompt.format(req.subject)]
    assert own and own[0]["p_suspect"] > 0.9 and mentions(own[0]["suspect"], [req.target_new])
