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
    from conftest import COUNTERFACT
    from factedit.core.request_files import load_requests

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


def test_guard_catches_a_real_rome_disabling_edit(embedded_bare):
    """CounterFact record 6276 is a disabling edit of the original code's `rome` on this model read
    without the prompt prefix (update ~500× r-ROME's, neighbour flipped, gibberish: docs/EVALUATION.md).
    The guard rolls it back with an explanation and leaves the weights bit-identical; r-ROME on the same
    request passes."""
    from conftest import COUNTERFACT
    from factedit.edit.guard import CollapseError
    from factedit.evaluation import load_cases

    ed = embedded_bare
    req = next(c for c in load_cases(COUNTERFACT, limit=2500, offset=4250) if c.case_id == 6276).request
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    try:
        with pytest.raises(CollapseError, match="disabling edit"):
            ed.edit(req, method="rome", **DEFAULT_STATS)
    finally:
        while ed.history:  # a failure here must not leave the shared model edited for the next tests
            ed.revert()
    assert ed.history == ()
    for k, v in ed.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    result = ed.edit(req, method="r-rome", **DEFAULT_STATS)
    try:
        assert result.guard["passed"], result.guard
        new, true = target_logprobs(ed.adapter, [req.text] * 2, [req.target_new, req.target_true])
        assert new > true
    finally:
        ed.revert()


def test_peft_adapter_of_an_embedded_edit(embedded, tmp_path):
    """Edit -> export -> PeftModel.from_pretrained on a fresh base: the edited prompt's probabilities
    equal the in-session edit; merge_and_unload equals applying the patch; unload is the base."""
    peft = pytest.importorskip("peft")
    from factedit import load_model
    from factedit.core.arch import ModelAdapter
    from factedit.patch.peft import ADAPTER_WEIGHTS, export_peft

    ed = embedded
    result = ed.edit(REQ, guard=GuardConfig(enabled=False), **STATS)
    try:
        want = target_logprobs(ed.adapter, [REQ.text, REQ.text], ["Rome", "Paris"])
        edited_w = ed.adapter.w_out_parameter(5).detach().clone()
        patch = Patch.from_result(result)
    finally:
        ed.revert()
    base_model, tok = load_model()
    base = ModelAdapter(base_model, tok)
    original = base.w_out_parameter(5).detach().clone()
    out = export_peft(base, [patch], tmp_path / "lora")
    assert (tmp_path / "lora" / ADAPTER_WEIGHTS).stat().st_size < 10_000  # rank 1: (576 + 1536) floats
    assert out["bytes"] < 40_000, out["bytes"]  # with the config and the provenance: a few KB
    pm = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "lora"))
    got = target_logprobs(ModelAdapter(pm.base_model.model, tok), [REQ.text, REQ.text], ["Rome", "Paris"])
    assert got == pytest.approx(want, abs=1e-5)
    merged = pm.merge_and_unload()
    assert torch.allclose(ModelAdapter(merged, tok).w_out_parameter(5), edited_w, atol=1e-6)
    again, _ = load_model()
    plain = peft.PeftModel.from_pretrained(again, str(tmp_path / "lora")).unload()
    assert torch.equal(ModelAdapter(plain, tok).w_out_parameter(5), original)


def test_gguf_export_of_an_embedded_edit(embedded, tmp_path):
    """Edit -> GGUF (the embedded model's own Q4_1 file as the base): only the edited matrix is
    replaced; transformers loads the f16 file with P(new) within 1e-3 of the fp32 edit; the q4_1
    file holds exactly patch.gguf.roundtrip of the edited matrix (what bench/gguf_survival.py uses)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    from factedit.core.arch import ModelAdapter
    from factedit.core.models import embedded_gguf_path
    from factedit.patch.files import PatchError
    from factedit.patch.gguf import export_gguf, gguf_quant_type, roundtrip

    ed = embedded
    base_file = embedded_gguf_path()
    result = ed.edit(REQ, guard=GuardConfig(enabled=False), **STATS)
    try:
        want = target_logprobs(ed.adapter, [REQ.text], ["Rome"])[0]
        edited_w = ed.adapter.w_out_weight(5).detach().clone()
        patch = Patch.from_result(result)
    finally:
        ed.revert()
    out = export_gguf(ed.adapter, [patch], base_file, tmp_path / "f16.gguf", quant="f16")
    assert out["replaced"] == {"blk.5.ffn_down.weight": "F16"}
    export_gguf(ed.adapter, [patch], base_file, tmp_path / "q4.gguf", quant="q4_1")
    base = {t.name: t for t in gguf.GGUFReader(str(base_file)).tensors}
    q4 = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q4.gguf")).tensors}
    assert q4.keys() == base.keys()
    assert all(np.array_equal(q4[n].data, base[n].data) for n in base if n != "blk.5.ffn_down.weight")
    t = q4["blk.5.ffn_down.weight"]
    stored = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)).reshape(edited_w.shape))
    assert torch.equal(stored, roundtrip(edited_w, gguf_quant_type("q4_1")))
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="f16.gguf", dtype=torch.float32)
    got = target_logprobs(ModelAdapter(m, ed.adapter.tokenizer), [REQ.text], ["Rome"])[0]
    assert abs(float(torch.tensor(got).exp()) - float(torch.tensor(want).exp())) < 1e-3
    with pytest.raises(PatchError, match="already exists"):
        export_gguf(ed.adapter, [patch], base_file, tmp_path / "f16.gguf")
    with pytest.raises(PatchError, match="not the matrix of the model"):  # an edited file is not this base
        export_gguf(ed.adapter, [patch], tmp_path / "q4.gguf", tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()
