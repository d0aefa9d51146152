"""Patches and the guard on the embedded model (slow)."""

import pytest
import torch

from conftest import DEFAULT_STATS, STATS
from factedit import GuardConfig, Request
from factedit.core.lm import target_logprobs
from factedit.patch.files import Patch, apply_patch

pytestmark = pytest.mark.slow
REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")


def test_round_trip_on_embedded_model(embedded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factedit import load_model, save_model
    from factedit.core.arch import ModelAdapter

    ed = embedded
    result = ed.edit(REQ, guard=GuardConfig(enabled=False), **STATS)
    try:
        lp = target_logprobs(ed.adapter, [REQ.text, REQ.text], ["Rome", "Paris"])
        path = Patch.from_result(result).save(tmp_path / "eiffel.safetensors")
        saved = save_model(ed.model, ed.tokenizer, tmp_path / "edited")
    finally:
        ed.revert()
    size = path.stat().st_size
    assert size < 16_000, size  # a few KB, vs 576 x 1536 x 4 B = 3.5 MB dense
    fresh_model, fresh_tok = load_model()
    fresh = ModelAdapter(fresh_model, fresh_tok)
    base = fresh.w_out_parameter(5).detach().clone()
    applied = apply_patch(fresh, Patch.load(path))
    lp2 = target_logprobs(fresh, [REQ.text, REQ.text], ["Rome", "Paris"])
    assert lp2 == pytest.approx(lp, abs=1e-5)
    applied.revert()
    assert torch.equal(fresh.w_out_parameter(5), base)
    plain = AutoModelForCausalLM.from_pretrained(saved)
    lp3 = target_logprobs(ModelAdapter(plain, AutoTokenizer.from_pretrained(saved)), [REQ.text, REQ.text],
                          ["Rome", "Paris"])
    assert lp3 == pytest.approx(lp, abs=1e-5)


def test_patch_size_grows_linearly_with_requests(embedded, tmp_path):
    from factedit.core.request_files import load_requests
    from conftest import COUNTERFACT

    ed = embedded
    sizes = {}
    for n in (2, 8):
        reqs = load_requests(COUNTERFACT, limit=n)
        r = ed.edit(reqs, method="memit", layers=(7, 8), steps=2, guard=GuardConfig(enabled=False), **STATS)
        try:
            sizes[n] = Patch.from_result(r).save(tmp_path / f"m{n}.safetensors").stat().st_size
        finally:
            ed.revert()
    # factors: 2 layers x (576 + 1536) x n floats; metadata grows with the requests too
    per_request = (sizes[8] - sizes[2]) / 6
    assert 2 * (576 + 1536) * 4 <= per_request <= 2 * (576 + 1536) * 4 + 2000


def test_guard_catches_a_real_rome_disabling_edit(embedded):
    """CounterFact record 6276 is a disabling edit of the original code's `rome` on this model
    (update ~500× r-ROME's, neighbour flipped, gibberish: docs/EVALUATION.md). The guard rolls it
    back with an explanation and leaves the weights bit-identical; r-ROME on the same request passes."""
    from conftest import COUNTERFACT
    from factedit.evaluation import load_cases
    from factedit.edit.guard import CollapseError

    ed = embedded
    req = next(c for c in load_cases(COUNTERFACT, limit=2500, offset=4250) if c.case_id == 6276).request
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    with pytest.raises(CollapseError, match="disabling edit"):
        ed.edit(req, method="rome", **DEFAULT_STATS)
    assert ed.history == []
    for k, v in ed.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    result = ed.edit(req, method="r-rome", **DEFAULT_STATS)
    try:
        assert result.guard["passed"], result.guard
        new, true = target_logprobs(ed.adapter, [req.text] * 2, [req.target_new, req.target_true])
        assert new > true
    finally:
        ed.revert()
