"""`factedit audit` (issue 33) on tiny random models saved as folders: synthetic updates of known rank and factors,
format round trips (computed here from each format's definition), dense changes, real edits made by the editor,
extraction into a patch that `factedit revert` takes out, and the inputs it must refuse."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from factedit import Editor, Request
from factedit.audit import AuditError, TensorFiles, audit_files, classify, rounding_format
from factedit.cli import main
from factedit.edit.guard import GuardConfig
from tiny import tiny_model

W_OUT = "model.layers.{}.mlp.down_proj.weight"
SHAPE = dict(hidden_size=32, intermediate_size=64)  # W_out 32 x 64: rows in whole Q8_0 blocks of 32


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def base(tmp_path):
    model, tok = tiny_model("llama", **SHAPE)
    return _save(model, tok, tmp_path / "base")


def _suspect(base, folder, change):
    """A copy of ``base`` whose tensors ``change(dict)`` altered in place (saved in the dtypes it leaves)."""
    import shutil

    shutil.copytree(base, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def _audit(base, suspect, **kw):
    return audit_files(TensorFiles(base), TensorFiles(suspect), **kw)


def _q8_0(x):
    """GGUF Q8_0 round trip from its definition: blocks of 32, scale max|x|/127 kept in float16, int8 levels."""
    b = x.reshape(-1, 32)
    d = (b.abs().amax(dim=1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(b))
    return (q.clamp(-127, 127) * d).reshape(x.shape)


def test_a_rank_one_update_is_found_with_its_factors(base, tmp_path):
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(32, generator=g), torch.randn(64, generator=g)
    d = 0.05 * torch.outer(u, v)
    sus = _suspect(base, tmp_path / "s", lambda t: t.__setitem__(W_OUT.format(2), t[W_OUT.format(2)] + d))
    r = _audit(base, sus)
    assert r.verdict == "edited" and len(r.edits) == 1 and not r.other
    (e,) = r.edits
    assert e.layers == [2] and e.rank == 1
    f = e.findings[0]
    assert torch.allclose(f.left @ f.right.T, d, atol=1e-6)
    cos = lambda a, b: float(abs(a @ b) / (a.norm() * b.norm()))  # noqa: E731
    assert cos(f.left[:, 0], u) > 0.9999 and cos(f.right[:, 0], v) > 0.9999
    assert r.counts() == {"identical": len(r.findings) - 1, "rounding": 0, "low_rank": 1, "dense": 0}


def test_a_multi_layer_rank_k_update_is_one_edit(base, tmp_path):
    g = torch.Generator().manual_seed(2)

    def change(t):
        for layer in (1, 2, 3):
            t[W_OUT.format(layer)] += 0.02 * torch.randn(32, 3, generator=g) @ torch.randn(3, 64, generator=g)

    r = _audit(base, _suspect(base, tmp_path / "s", change))
    (e,) = r.edits
    assert e.layers == [1, 2, 3] and [f.rank for f in e.findings] == [3, 3, 3]
    assert all(f.energy > 1 - 1e-9 for f in e.findings)
    # a span longer than an edit's is not called an edit
    r2 = _audit(base, tmp_path / "s", max_span=2)
    assert r2.verdict == "changed, not an edit" and not r2.edits and "3 consecutive layers" in r2.notes[0]


@pytest.mark.parametrize("fmt", ["BF16", "F16", "Q8_0"])
def test_format_round_trips_are_rounding_not_edits(base, tmp_path, fmt):
    def trip(x):
        if fmt == "Q8_0":
            return _q8_0(x) if x.ndim == 2 and x.shape[-1] % 32 == 0 else x
        dtype = torch.bfloat16 if fmt == "BF16" else torch.float16
        return x.to(dtype)  # saved in the format itself

    r = _audit(base, _suspect(base, tmp_path / "s", lambda t: t.update({k: trip(v) for k, v in t.items()})))
    assert r.verdict == "not edited" and not r.edits and not r.other
    assert {f.rounding for f in r.findings if f.kind == "rounding"} <= {"F32", "F16", "BF16", "Q8_0"}
    assert any(f.rounding == fmt for f in r.findings)


def test_rounding_bounds_are_the_formats_and_no_looser():
    x = torch.randn(4, 64, dtype=torch.float64)
    assert rounding_format(x, x.float().double()) == "F32"
    assert rounding_format(x, x.half().double()) == "F16"
    assert rounding_format(x, x.bfloat16().double()) == "BF16"
    assert rounding_format(x, _q8_0(x.float()).double()) == "Q8_0"
    y = x.clone()
    y[0, 0] += 0.5 * x.abs().max() / 127 * 1.2  # beyond half a Q8_0 step
    assert rounding_format(x, y) is None


def test_a_dense_change_and_changes_beside_w_out_are_not_edits(base, tmp_path):
    g = torch.Generator().manual_seed(3)

    def change(t):
        t[W_OUT.format(0)] += 0.01 * torch.randn(32, 64, generator=g)  # full rank
        t["model.layers.2.mlp.up_proj.weight"] += 0.01 * torch.randn(64, 1, generator=g) @ torch.randn(
            1, 32, generator=g)
        t[W_OUT.format(2)] += 0.01 * torch.randn(32, 1, generator=g) @ torch.randn(1, 64, generator=g)

    r = _audit(base, _suspect(base, tmp_path / "s", change))
    assert r.verdict == "changed, not an edit" and not r.edits
    kinds = {f.name: f.kind for f in r.other}
    assert kinds == {W_OUT.format(0): "dense", "model.layers.2.mlp.up_proj.weight": "low_rank",
                     W_OUT.format(2): "low_rank"}
    assert next(f for f in r.other if f.name == W_OUT.format(0)).rank == 32


def test_an_edit_saved_in_bfloat16_is_still_found(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    d = 0.05 * torch.randn(32, 1, generator=g) @ torch.randn(1, 64, generator=g)

    def change(t):
        t[W_OUT.format(1)] += d
        for k in t:
            t[k] = t[k].to(torch.bfloat16)

    r = _audit(base, _suspect(base, tmp_path / "s", change))
    (e,) = r.edits
    assert e.layers == [1] and e.rank == 1 and not r.other
    assert float((e.findings[0].left @ e.findings[0].right.T - d).norm()) < 0.02 * float(d.norm())


@pytest.mark.parametrize("method,layers,n", [("r-rome", (1,), 1), ("memit", (1, 2), 2)])
def test_edits_made_by_the_editor_are_found_and_extracted_then_reverted(home, tiny_corpus, tmp_path, capsys, method,
                                                                        layers, n):
    model, tok = tiny_model("llama", **SHAPE)
    base = _save(model, tok, tmp_path / "base")
    ed = Editor(model, tok, progress=False)
    reqs = [Request("The capital of {} is", "Japan", "Paris", "Tokyo"), Request("{} speaks", "Danielle Darrieux",
                                                                                 "Italian")][:n]
    kw = {"layer": layers[0]} if method == "r-rome" else {"layers": layers}
    ed.edit(reqs, method=method, steps=5, stats_corpus=str(tiny_corpus), stats_tokens=800,
            guard=GuardConfig(enabled=False), verify=False, **kw)
    suspect = _save(model, tok, tmp_path / "suspect")
    out = tmp_path / "found.safetensors"
    assert main(["audit", "--base", str(base), "--suspect", str(suspect), "--json", "--extract-patch", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["verdict"] == "edited" and got["extracted_patch"] == str(out)
    (e,) = got["edits"]
    assert e["layers"] == list(layers) and e["rank"] == n
    assert main(["inspect", str(out), "--json", "--no-claims"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "audit-extract" and shown["layers"] == list(layers)
    assert main(["revert", str(out), "--model", str(suspect), "--save-model", str(tmp_path / "reverted")]) == 0
    capsys.readouterr()
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "reverted" /
                                                                              "model.safetensors"))
    for k, w in before.items():
        if k in {W_OUT.format(l) for l in layers}:
            assert classify(k, w, after[k]).kind in ("identical", "rounding"), k  # back within rounding
        else:
            assert torch.equal(w, after[k]), k  # untouched


def test_identical_models_are_not_edited_and_extraction_is_refused(base, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["audit", "--base", str(base), "--suspect", str(base)]) == 0
    assert capsys.readouterr().out.startswith("factedit audit: not edited")
    assert main(["audit", "--base", str(base), "--suspect", str(base), "--extract-patch", str(out)]) == 2
    assert "no edit to extract" in capsys.readouterr().err and not out.exists()


def test_models_that_cannot_be_compared_are_refused(base, tmp_path, capsys):
    other, tok = tiny_model("gpt2")
    gpt2 = _save(other, tok, tmp_path / "gpt2")
    wide_model, wtok = tiny_model("llama", hidden_size=32, intermediate_size=96)
    wide = _save(wide_model, wtok, tmp_path / "wide")
    cases = {gpt2: "different architectures", wide: "has shape"}
    for folder, msg in cases.items():
        assert main(["audit", "--base", str(base), "--suspect", str(folder)]) == 2
        assert msg in capsys.readouterr().err
    cfg = json.loads((base / "config.json").read_text())
    vocab = _suspect(base, tmp_path / "vocab", lambda t: None)
    (vocab / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(AuditError, match="vocabularies differ"):
        _audit(base, vocab)
    truncated = _suspect(base, tmp_path / "trunc", lambda t: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["audit", "--base", str(base), "--suspect", str(truncated)]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["audit", "--base", str(base), "--suspect", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["audit", "--base", str(base), "--suspect", str(base), "--max-rank", "0"]) == 2


def test_a_bare_safetensors_suspect_is_read_with_the_bases_config(base, tmp_path, capsys):
    """A weights file sent alone (an upload, a model.safetensors without its folder): compared with --base, whose
    config gives the architecture; without --base, as the base, truncated or of another shape: refused."""
    g = torch.Generator().manual_seed(3)
    d = 0.05 * torch.outer(torch.randn(32, generator=g), torch.randn(64, generator=g))
    sus = _suspect(base, tmp_path / "s", lambda t: t.__setitem__(W_OUT.format(1), t[W_OUT.format(1)] + d))
    bare = tmp_path / "upload" / "edited.safetensors"
    bare.parent.mkdir()
    (sus / "model.safetensors").rename(bare)  # no config.json beside it
    out = tmp_path / "found.safetensors"
    assert main(["audit", "--base", str(base), "--suspect", str(bare), "--json", "--extract-patch", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["verdict"] == "edited" and [e["layers"] for e in got["edits"]] == [[1]] and out.is_file()
    assert main(["audit", "--suspect", str(bare)]) == 2
    assert "bare .safetensors file: it needs --base" in capsys.readouterr().err
    assert main(["audit", "--base", str(bare), "--suspect", str(base)]) == 2
    assert "the base must be a model folder" in capsys.readouterr().err
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(bare.read_bytes()[:1000])
    assert main(["audit", "--base", str(base), "--suspect", str(torn)]) == 2
    assert "torn.safetensors" in capsys.readouterr().err
    wide_model, _ = tiny_model("llama", hidden_size=32, intermediate_size=96)
    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide_model.state_dict().items()}, str(wide), metadata={"format": "pt"})
    assert main(["audit", "--base", str(base), "--suspect", str(wide)]) == 2
    assert "has shape" in capsys.readouterr().err


SUBJECTS = ["Japan", "France", "Italy", "Spain", "Paris", "Tokyo", "Seattle", "the Eiffel Tower", "the Space Needle",
            "Danielle Darrieux", "Toko Yasuda", "Madrid", "Rome", "Zorbul", "Quentavia", "Brimstone Hall", "Oslo",
            "Marcus Delay", "the Red Keep", "Vinson Massif"]


def test_key_shares_are_the_formulas_in_the_metric_of_c_inverse():
    from factedit.audit.explain import _shares

    g = torch.Generator().manual_seed(5)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    C = A @ A.T + 0.5 * torch.eye(12, dtype=torch.float64)
    K = torch.randn(6, 12, generator=g, dtype=torch.float64)
    r = torch.randn(12, 1, generator=g, dtype=torch.float64)
    with_c, without = _shares(K, r / r.norm(), C)
    Ci = torch.linalg.inv(C)
    for i, k in enumerate(K):
        want_c = abs(float(k @ r[:, 0])) / float((k @ Ci @ k) * (r[:, 0] @ C @ r[:, 0])) ** 0.5
        want_i = abs(float(k @ Ci @ r[:, 0])) / float((k @ Ci @ k) * (r[:, 0] @ Ci @ r[:, 0])) ** 0.5
        assert float(with_c[i]) == pytest.approx(want_c, rel=1e-9)
        assert float(without[i]) == pytest.approx(want_i, rel=1e-9)
    # a key whose C-inverse image is the update's direction scores 1 under "C⁻¹k", a key along it 1 under "k"
    k0 = K[0]
    a, _ = _shares(K, (Ci @ k0)[:, None], C)
    _, b = _shares(K, k0[:, None], C)
    assert float(a[0]) == pytest.approx(1.0, abs=1e-9) and float(b[0]) == pytest.approx(1.0, abs=1e-9)


def test_answers_are_ranked_by_their_strongest_evidence_not_by_how_many_prompts_show_them():
    """The edited relation's answer, sure on its own prompt, comes before one that several other prompts show less
    surely (what a summed ranking got wrong in 18 of 140 single edits); scores are max(subject score × p)."""
    from factedit.audit.explain import rank_answers

    items = [("English.", 0.98, 0.99), ("the UK.", 0.98, 0.30), ("the UK.", 0.98, 0.12), ("the UK.", 0.98, 0.45),
             ("Dutch.", 0.40, 0.97), ("London.", 0.98, 0.22)]
    got = rank_answers(items)
    assert [d["text"] for d in got] == ["English.", "the UK.", "Dutch.", "London."]
    want = {"English.": 0.98 * 0.99, "the UK.": 0.98 * 0.45, "Dutch.": 0.40 * 0.97, "London.": 0.98 * 0.22}
    assert {d["text"]: d["score"] for d in got} == {t: round(w, 4) for t, w in want.items()}
    assert rank_answers([]) == []


def test_first_token_probabilities_are_the_models_next_token_softmax():
    """Checked against a plain forward pass of the model on prompt + " " + answer (not through the scorer)."""
    from factedit.audit.explain import first_token_probabilities
    from factedit.core.arch import ModelAdapter

    model, tok = tiny_model("llama", **SHAPE)
    ad = ModelAdapter(model, tok)
    prompts = ["The capital of Japan is", "Vinson Massif is located in", "The Red Keep is in"]
    answers = ["Tokyo, and", "", "the city of"]
    got = first_token_probabilities(ad, prompts, answers)
    assert got[1] == 0.0
    for p, a, g in zip(prompts, answers, got):
        if not a:
            continue
        n = len(ad.tokenizer(p)["input_ids"])
        full = ad.tokenizer(p + " " + a, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, n - 1].double()
        assert g == pytest.approx(float(torch.softmax(logits, -1)[full[0, n]]), rel=1e-5)


def _key(model, tok, layer, subject):
    """The W_out input of ``layer`` at the subject's last token, read with a hook here (not the package's)."""
    from factedit.core.arch import ModelAdapter

    ad = ModelAdapter(model, tok)
    ids = ad.tokenizer(subject, return_tensors="pt")["input_ids"]
    got = {}

    def keep(module, inputs, output):
        got["k"] = inputs[0]

    h = model.model.layers[layer].mlp.down_proj.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return got["k"][0, -1].double()


def test_explain_names_the_subject_of_an_editor_edit_and_of_a_plain_rank_one_write(home, tiny_corpus, tmp_path,
                                                                                    capsys):
    model, tok = tiny_model("llama", **SHAPE)
    base = _save(model, tok, tmp_path / "base")
    subjects = tmp_path / "subjects.jsonl"  # a requests file: each subject with the prompt it is asked in
    subjects.write_text("".join(json.dumps({"prompt": "The capital of {} is", "subject": s, "target_new": "x"}) + "\n"
                                for s in SUBJECTS))
    # a random model's keys depend on the context more than a trained one's: average over 5 prefixes, as ROME does
    stats = ["--stats-corpus", str(tiny_corpus), "--stats-tokens", "800", "--key-contexts", "5"]
    ed = Editor(model, tok, progress=False)
    ed.edit([Request("The capital of {} is", "Japan", "Paris", "Tokyo")], method="r-rome", layer=1, steps=20,
            guard=GuardConfig(enabled=False), verify=False, stats_corpus=str(tiny_corpus), stats_tokens=800)
    edited = _save(model, tok, tmp_path / "edited")
    argv = ["audit", "--base", str(base), "--suspect", str(edited), "--subjects", str(subjects), "--json", *stats]
    assert main(argv) == 0
    (e,) = json.loads(capsys.readouterr().out)["edits"]
    assert e["key_hypothesis"] == "C⁻¹k" and e["subjects"][0]["text"] == "Japan"
    top, second = e["subjects"][0]["score"], e["subjects"][1]["score"]
    assert top > 0.8 and second < top - 0.2, e["subjects"]
    for ev in e["evidence"]:  # what the prompts show: the answers differ between base and suspect
        assert ev["base"] != ev["suspect"] and ev["subject"] in SUBJECTS
    # another tool's write without C⁻¹: Δ = u kᵀ / ‖k‖² along the subject's own key
    ed.revert()
    k = _key(model, tok, 2, "The capital of France")  # its key in the prompt, as such a tool reads it
    u = torch.randn(32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    plain = _suspect(base, tmp_path / "plain", lambda t: t.__setitem__(
        W_OUT.format(2), t[W_OUT.format(2)] + (torch.outer(u, k) / float(k @ k)).float()))
    assert main([*argv[:4], str(plain), *argv[5:]]) == 0
    (e,) = json.loads(capsys.readouterr().out)["edits"]
    assert e["layers"] == [2] and e["key_hypothesis"] == "k" and e["subjects"][0]["text"] == "France"


def test_a_missing_subjects_file_is_refused_before_any_work(base, tmp_path, capsys):
    assert main(["audit", "--base", str(base), "--suspect", str(base), "--subjects", str(tmp_path / "no.txt")]) == 2
    assert "subjects file not found" in capsys.readouterr().err


def test_what_audit_cannot_see_an_edit_behind_a_neuron_permutation_or_in_noise_of_its_norm(base, tmp_path):
    """docs/AUDIT.md's limits, as tested claims: permuting a layer's MLP neurons keeps its function but changes three
    matrices densely, so an edit made together with it is not called an edit; nor is one buried in full-rank noise
    of its own norm. Both are reported as changes ("changed, not an edit"), never as "not edited"."""
    g = torch.Generator().manual_seed(7)
    d = 0.05 * torch.randn(32, 1, generator=g) @ torch.randn(1, 64, generator=g)
    perm = torch.randperm(64, generator=g)

    def permuted(t):
        pre = "model.layers.1.mlp."
        t[pre + "gate_proj.weight"] = t[pre + "gate_proj.weight"][perm]
        t[pre + "up_proj.weight"] = t[pre + "up_proj.weight"][perm]
        t[pre + "down_proj.weight"] = (t[pre + "down_proj.weight"] + d)[:, perm]

    r = _audit(base, _suspect(base, tmp_path / "perm", permuted))
    assert r.verdict == "changed, not an edit" and not r.edits
    assert {f.name for f in r.other} == {f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    noise = torch.randn(32, 64, generator=g)
    noise *= float(d.norm()) / float(noise.norm())
    r2 = _audit(base, _suspect(base, tmp_path / "noise", lambda t: t.__setitem__(
        W_OUT.format(3), t[W_OUT.format(3)] + d + noise)))
    assert r2.verdict == "changed, not an edit" and [f.kind for f in r2.other] == ["dense"]


def test_without_a_base_a_spike_in_one_layers_spectrum_is_flagged(tmp_path, capsys):
    """The base-free check against σ₁/σ₂ computed here: a rank-one update far above the matrix's top singular value
    is flagged in its layer only; the unedited model is not flagged; extraction needs a base."""
    model, tok = tiny_model("llama", num_hidden_layers=8, **SHAPE)
    clean = _save(model, tok, tmp_path / "clean")
    assert main(["audit", "--suspect", str(clean), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["mode"] == "base-free" and got["verdict"] == "nothing suspicious found" and got["flagged"] == []
    w = load_file(str(clean / "model.safetensors"))[W_OUT.format(5)].double()
    s = torch.linalg.svdvals(w)
    assert got["tensors"][5]["gap"] == pytest.approx(float(torch.log(s[0] / s[1])), rel=1e-9)
    g = torch.Generator().manual_seed(8)
    u, v = torch.randn(32, 1, generator=g), torch.randn(1, 64, generator=g)
    spike = 3 * float(s[0]) * (u / u.norm()) @ (v / v.norm())
    sus = _suspect(clean, tmp_path / "spiked", lambda t: t.__setitem__(W_OUT.format(5), t[W_OUT.format(5)] + spike))
    assert main(["audit", "--suspect", str(sus), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["verdict"] == "suspicious" and got["flagged"] == [5]
    assert main(["audit", "--suspect", str(sus), "--extract-patch", str(tmp_path / "x.safetensors")]) == 2
    assert "needs --base" in capsys.readouterr().err
