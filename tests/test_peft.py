"""Patches as LoRA adapters, loaded by the real PEFT (tiny GPT-2 / GPT-J / LLaMA models)."""

import json

import pytest
import torch

from factedit import Editor, Request, ValueConfig
from factedit.cli import main
from factedit.core.arch import ModelAdapter
from factedit.patch.files import Patch, PatchError, apply_patches
from factedit.patch.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE, VLLM_RANKS, export_peft, import_peft
from tiny import tiny_model

peft = pytest.importorskip("peft")

REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        Request("{} is in", "Space Needle", "Tokyo", "Seattle"),
        Request("The capital of {} is", "Japan", "Paris", "Tokyo")]
PROMPTS = ["Eiffel Tower is located in the city of", "Space Needle is in the city of Seattle", "a b c"]


def _opts(tiny_corpus, method="r-rome", **kw):
    if method != "ft":
        kw = dict(value=ValueConfig(steps=3), context_lengths=((3, 2),), stats_tokens=800, **kw)
    return dict(stats_corpus=str(tiny_corpus), guard=False, verify=False, **kw)


def _probs(model, tok, prompt_prefix_ids=()):
    """Next-token distributions at every position of PROMPTS (a plain forward, float64)."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([list(prompt_prefix_ids) + tok(p)["input_ids"]])
        out.append(torch.softmax(model(input_ids=ids).logits[0].double(), -1))
    return out


def _edit(arch, tiny_corpus, method="r-rome", reqs=REQS[:1], **kw):
    model, tok = tiny_model(arch)
    ed = Editor(model, tok, progress=False)
    layer = dict(layer=1) if method in ("r-rome", "rome", "p-rome") else dict(layers=kw.pop("layers", (1, 2)))
    res = ed.edit(reqs if len(reqs) > 1 else reqs[0], method, **layer, **_opts(tiny_corpus, method, **kw))
    return ed, Patch.from_result(res)


def _base(arch):
    model, tok = tiny_model(arch)
    return ModelAdapter(model, tok)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_peft_loads_the_edit_merges_and_unloads(arch, home, tiny_corpus, tmp_path):
    ed, patch = _edit(arch, tiny_corpus)
    edited = _probs(ed.model, ed.tokenizer.factedit_source)
    ad = _base(arch)
    base_state = {k: v.clone() for k, v in ad.model.state_dict().items()}
    out = export_peft(ad, [patch], tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 1 and cfg["layers_to_transform"] == [1]
    assert cfg["fan_in_fan_out"] is (arch == "gpt2") and out["ranks"] == {ad.w_out_name(1): 1}
    pm = peft.PeftModel.from_pretrained(ad.model, str(tmp_path / "lora"))
    lora_layers = [n for n, m in pm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert lora_layers == ["base_model.model." + ad.w_out_name(1)]  # that one matrix, nothing else
    for a, b in zip(_probs(pm, ad.tokenizer.factedit_source), edited):
        assert torch.allclose(a, b, atol=1e-5)
    # merge_and_unload equals applying the patch to a fresh base
    ref = _base(arch)
    apply_patches(ref, [patch])
    merged = pm.merge_and_unload()
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k
    # unload gives the base weights bit for bit
    ad2 = _base(arch)
    pm2 = peft.PeftModel.from_pretrained(ad2.model, str(tmp_path / "lora"))
    plain = pm2.unload()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_memit_batch_of_ten_is_rank_ten_per_layer_and_imports_bit_for_bit(home, tiny_corpus, tmp_path):
    reqs = [Request("{} is in", s, t) for s, t in zip(
        ["Eiffel Tower", "Space Needle", "Japan", "France", "Rome", "Italy", "Spain", "Tokyo", "Paris", "Seattle"],
        ["Rome", "Tokyo", "Paris", "Spain", "Seattle", "Japan", "France", "Italy", "Madrid", "Guitar"])]
    ed, patch = _edit("llama", tiny_corpus, "memit", reqs, mom2_update_weight=0.1)
    edited = _probs(ed.model, ed.tokenizer.factedit_source)
    ad = _base("llama")
    out = export_peft(ad, [patch], tmp_path / "lora")
    assert set(out["ranks"].values()) == {10} and len(out["ranks"]) == 2
    pm = peft.PeftModel.from_pretrained(ad.model, str(tmp_path / "lora"))
    for a, b in zip(_probs(pm, ad.tokenizer.factedit_source), edited):
        assert torch.allclose(a, b, atol=1e-5)
    back = import_peft(tmp_path / "lora")
    assert len(back) == 1 and back[0].meta["fingerprints"] == patch.meta["fingerprints"]
    for d0, d1 in zip(patch.deltas, back[0].deltas):
        assert d0.layer == d1.layer and torch.equal(d0.left, d1.left) and torch.equal(d0.right, d1.right)
    # the imported patch applies like the original: the same after-edit fingerprints
    fresh = _base("llama")
    apply_patches(fresh, back)
    from factedit.core.fingerprints import matrix_fingerprint

    for l in (1, 2):
        assert matrix_fingerprint(fresh.w_out_parameter(l)) == patch.meta["fingerprints_after"][fresh.w_out_name(l)]


def test_stacked_patches_export_as_one_adapter_and_size_is_linear(home, tiny_corpus, tmp_path):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    patches = []
    for r in REQS:
        patches.append(Patch.from_result(ed.edit(r, "r-rome", layer=1, **_opts(tiny_corpus))))
    edited = _probs(ed.model, tok)
    sizes = []
    for n in (1, 2, 3):
        export_peft(_base("llama"), patches[:n], tmp_path / f"lora{n}")
        sizes.append((tmp_path / f"lora{n}" / ADAPTER_WEIGHTS).stat().st_size)
    step = sizes[1] - sizes[0]
    assert step > 0 and abs((sizes[2] - sizes[1]) - step) <= 16  # linear in the edits (header aside)
    assert sizes[0] < 1_000  # one rank-1 edit of a (24 x 40) matrix: 64 floats and the header
    ad = _base("llama")
    pm = peft.PeftModel.from_pretrained(ad.model, str(tmp_path / "lora3"))
    for a, b in zip(_probs(pm, tok), edited):
        assert torch.allclose(a, b, atol=1e-5)
    back = import_peft(tmp_path / "lora3")
    assert [p.meta["requests"] for p in back] == [p.meta["requests"] for p in patches]
    for p0, p1 in zip(patches, back):
        assert all(torch.equal(a.left, b.left) and torch.equal(a.right, b.right) for a, b in zip(p0.deltas, p1.deltas))


def test_vllm_variant_pads_one_rank_and_gives_the_same_outputs(home, tiny_corpus, tmp_path):
    ed, patch = _edit("llama", tiny_corpus, "memit", REQS, mom2_update_weight=0.1)
    export_peft(_base("llama"), [patch], tmp_path / "plain")
    out = export_peft(_base("llama"), [patch], tmp_path / "vllm", vllm=True)
    assert out["stored_rank"] == 8 and out["stored_rank"] in VLLM_RANKS
    cfg = json.loads((tmp_path / "vllm" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["down_proj"] and "rank_pattern" not in cfg
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "vllm" / ADAPTER_WEIGHTS))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert all(t.shape[0 if k.endswith("lora_A.weight") else 1] == 8 for k, t in tensors.items())
    outs = []
    for d in ("plain", "vllm"):
        ad = _base("llama")
        outs.append(_probs(peft.PeftModel.from_pretrained(ad.model, str(tmp_path / d)), ad.tokenizer.factedit_source))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6)
    back = import_peft(tmp_path / "vllm")  # the padding is dropped again
    assert [d.rank for d in back[0].deltas] == [d.rank for d in patch.deltas]


def test_dense_fine_tuning_exports_through_svd_with_its_error(home, tiny_corpus, tmp_path):
    ed, patch = _edit("llama", tiny_corpus, "ft", REQS[:1], steps=3, norm_constraint=1.0, layers=(1,))
    with pytest.raises(PatchError, match="--svd RANK"):
        export_peft(_base("llama"), [patch], tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    dense = patch.deltas[0].dense().double()
    s = torch.linalg.svdvals(dense)
    out = export_peft(_base("llama"), [patch], tmp_path / "lora", svd_rank=4)
    want = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    svd = out["svd"][ed.adapter.w_out_name(1)]
    assert svd["rank"] == 4 and svd["relative_error"] == pytest.approx(want, rel=1e-6)
    back = import_peft(tmp_path / "lora")
    assert back[0].meta["approximate"] is True and back[0].meta["fingerprints_after"] == {}
    assert float((back[0].deltas[0].dense().double() - dense).norm() / dense.norm()) == pytest.approx(want, rel=1e-4)


def test_bad_exports_and_imports(home, tiny_corpus, tmp_path):
    ed, patch = _edit("llama", tiny_corpus)
    other = ModelAdapter(*tiny_model("llama", seed=1))
    with pytest.raises(PatchError, match="different base model"):
        export_peft(other, [patch], tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    g_ed, g_patch = _edit("gpt2", tiny_corpus)
    with pytest.raises(PatchError, match="vLLM has no LoRA support .* 'gpt2'"):
        export_peft(_base("gpt2"), [g_patch], tmp_path / "lora", vllm=True)
    big = Patch([type(patch.deltas[0])(1, torch.randn(24, 600), torch.randn(40, 600))], dict(patch.meta))
    big.meta["norms"] = {"1": big.deltas[0].norm()}
    with pytest.raises(PatchError, match="above the largest LoRA rank vLLM serves"):
        export_peft(_base("llama"), [big], tmp_path / "lora", vllm=True)
    export_peft(_base("llama"), [patch], tmp_path / "lora")
    with pytest.raises(PatchError, match="already exists"):
        export_peft(_base("llama"), [patch], tmp_path / "lora")
    # a truncated adapter file is refused on import
    w = tmp_path / "lora" / ADAPTER_WEIGHTS
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(PatchError, match="damaged or truncated|damaged"):
        import_peft(tmp_path / "lora")
    (tmp_path / "lora" / PROVENANCE).unlink()
    with pytest.raises(PatchError, match="only adapters written by factedit"):
        import_peft(tmp_path / "lora")


def test_cli_export_and_import(home, tiny_corpus, tiny_dir, tmp_path, capsys):
    from factedit.core.models import load_model

    model, tok = load_model(str(tiny_dir))
    ed = Editor(model, tok, progress=False)
    patch = Patch.from_result(ed.edit(REQS[0], "r-rome", layer=1, **_opts(tiny_corpus)))
    p = patch.save(tmp_path / "e.safetensors")
    argv = ["export", str(p), "--peft", str(tmp_path / "lora"), "--model", str(tiny_dir), "--json"]
    assert main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["stored_rank"] == 1 and obj["bytes"] > 0
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    other = tmp_path / "other"
    m2, t2 = tiny_model("llama", seed=3)
    m2.save_pretrained(other), t2.save_pretrained(other)
    code = main(["export", str(p), "--peft", str(tmp_path / "lora2"), "--model", str(other)])
    assert code == 2 and "different base model" in capsys.readouterr().err and not (tmp_path / "lora2").exists()
    assert main(["import", "--peft", str(tmp_path / "lora"), "--out", str(tmp_path / "back.safetensors")]) == 0
    back = Patch.load(tmp_path / "back.safetensors")
    assert torch.equal(back.deltas[0].left, patch.deltas[0].left) and back.meta["requests"] == patch.meta["requests"]
    assert main(["import", "--peft", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_export_from_an_editor_that_holds_its_edits(home, tiny_corpus, tmp_path):
    """`applied=True` (the web page's download): the model holds the stack; checked against what the patches left."""
    ed, first = _edit("llama", tiny_corpus)
    res = ed.edit(REQS[1], layer=1, **_opts(tiny_corpus))
    second = Patch.from_result(res)
    export_peft(ed.adapter, [first, second], tmp_path / "held", applied=True)
    ad = _base("llama")
    export_peft(ad, [first, second], tmp_path / "base")  # the same adapter from the base model
    for name in (ADAPTER_WEIGHTS,):
        assert (tmp_path / "held" / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
    with pytest.raises(PatchError, match="does not hold"):
        export_peft(ad, [first, second], tmp_path / "no", applied=True)  # the base does not hold them
    ed.revert()
    with pytest.raises(PatchError, match="does not hold"):
        export_peft(ed.adapter, [first, second], tmp_path / "no", applied=True)  # only the first is applied
    assert not (tmp_path / "no").exists()
