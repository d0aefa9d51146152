"""GGUF export on a tiny LLaMA: a GGUF base written here with llama.cpp's tensor names (the
embedded-model test loads a real exported file with transformers)."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from factedit import Editor, Request, ValueConfig  # noqa: E402
from factedit.core.arch import ModelAdapter  # noqa: E402
from factedit.patch.files import Patch, PatchError  # noqa: E402
from factedit.patch.gguf import export_gguf, roundtrip  # noqa: E402
from tiny import tiny_model  # noqa: E402

REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
Q8 = gguf.GGMLQuantizationType.Q8_0


def _base_file(adapter, path):
    """A GGUF file holding the tiny model's W_out matrices as Q8_0 (plus one F32 tensor and metadata),
    and the model's W_out set to exactly what a reader dequantizes from it (as when a model is loaded
    from GGUF)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_key_value("tokenizer.ggml.tokens", ["a", "b"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    for l in range(adapter.n_layers):
        W = adapter.w_out_weight(l).detach().float().numpy()
        q = quantize(W, Q8)
        with torch.no_grad():
            adapter.w_out_parameter(l).copy_(torch.from_numpy(dequantize(q, Q8).reshape(W.shape)))
        w.add_tensor(f"blk.{l}.ffn_down.weight", q, raw_dtype=Q8)
    w.add_tensor("output_norm.weight", np.ones(24, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def setup(home, tiny_corpus, tmp_path):
    model, tok = tiny_model("llama", intermediate_size=64)  # GGUF blocks are 32 wide: rows of 64
    ed = Editor(model, tok, progress=False)
    base = _base_file(ed.adapter, tmp_path / "base.gguf")
    res = ed.edit(REQ, "r-rome", layer=1, stats_corpus=str(tiny_corpus), stats_tokens=800, guard=False,
                  verify=False, value=ValueConfig(steps=3), context_lengths=((3, 2),))
    edited = ed.adapter.w_out_weight(1).detach().clone()
    patch = Patch.from_result(res)
    ed.revert()
    return ed, patch, base, edited


def test_only_the_edited_matrix_is_replaced(setup, tmp_path):
    ed, patch, base, edited = setup
    for quant, qtype in (("f16", gguf.GGMLQuantizationType.F16), (None, Q8), ("q4_1", gguf.GGMLQuantizationType.Q4_1)):
        out = tmp_path / f"out-{quant}.gguf"
        info = export_gguf(ed.adapter, [patch], base, out, quant=quant)
        assert info["replaced"] == {"blk.1.ffn_down.weight": qtype.name}
        r0, r1 = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(out))
        t0, t1 = {t.name: t for t in r0.tensors}, {t.name: t for t in r1.tensors}
        assert t0.keys() == t1.keys()
        for n in t0:
            if n != "blk.1.ffn_down.weight":
                assert t1[n].tensor_type == t0[n].tensor_type and np.array_equal(t1[n].data, t0[n].data), n
        t = t1["blk.1.ffn_down.weight"]
        stored = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)).reshape(edited.shape))
        assert t.tensor_type == qtype and torch.equal(stored, roundtrip(edited, qtype))
        if quant == "f16":
            assert torch.allclose(stored, edited, atol=1e-2 * float(edited.abs().max()))
        assert str(r1.fields["tokenizer.ggml.tokens"].contents()) == str(r0.fields["tokenizer.ggml.tokens"].contents())
        prov = json.loads(str(r1.fields["factedit.provenance"].contents()))
        assert prov["patches"][0]["requests"] == patch.meta["requests"]
    assert torch.equal(ed.adapter.w_out_weight(1), torch.from_numpy(  # the model was left as it was
        dequantize(t0["blk.1.ffn_down.weight"].data, Q8).reshape(edited.shape)))


def test_bad_gguf_exports(setup, tmp_path):
    ed, patch, base, _ = setup
    export_gguf(ed.adapter, [patch], base, tmp_path / "out.gguf")
    with pytest.raises(PatchError, match="already exists"):
        export_gguf(ed.adapter, [patch], base, tmp_path / "out.gguf")
    with pytest.raises(PatchError, match="not the matrix of the model"):
        export_gguf(ed.adapter, [patch], tmp_path / "out.gguf", tmp_path / "x.gguf")
    with pytest.raises(PatchError, match="overwrite the base"):
        export_gguf(ed.adapter, [patch], base, base, force=True)
    with pytest.raises(PatchError, match="unknown GGUF quantization"):
        export_gguf(ed.adapter, [patch], base, tmp_path / "x.gguf", quant="q3_banana")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(PatchError, match="not a readable GGUF"):
        export_gguf(ed.adapter, [patch], tmp_path / "junk.gguf", tmp_path / "x.gguf")
    other = ModelAdapter(*tiny_model("llama", seed=2, intermediate_size=64))
    with pytest.raises(PatchError, match="different base model"):
        export_gguf(other, [patch], base, tmp_path / "x.gguf")
    gpt2 = ModelAdapter(*tiny_model("gpt2"))
    with pytest.raises(PatchError, match="convert_hf_to_gguf"):
        export_gguf(gpt2, [patch], base, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
