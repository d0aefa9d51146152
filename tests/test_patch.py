"""Patch files: round trip, integrity, stacking, fuzzing (tiny models)."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factedit import Editor, Request, ValueConfig
from factedit.core.arch import ModelAdapter
from factedit.core.fingerprints import matrix_fingerprint
from factedit.core.lm import target_logprobs
from factedit.patch.files import Patch, PatchError, apply_patch, apply_patches, revert_patch, revert_patches
from tiny import tiny_model

REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")


def _opts(tiny_corpus, **kw):
    return dict(layer=2, stats_corpus=str(tiny_corpus), stats_tokens=800, value=ValueConfig(steps=4),
                context_lengths=((3, 2),), **kw)


@pytest.fixture
def edited(home, tiny_corpus, tmp_path):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    res = ed.edit(REQ, **_opts(tiny_corpus))
    path = Patch.from_result(res).save(tmp_path / "p.safetensors")
    lp = target_logprobs(ed.adapter, [REQ.text], ["Rome"])[0]
    return ed, res, path, lp


def _fresh(arch="llama", seed=0):
    m, t = tiny_model(arch, seed=seed)
    return ModelAdapter(m, t)


def test_round_trip_and_exact_revert(edited):
    ed, res, path, lp = edited
    ad = _fresh()
    base = {k: v.clone() for k, v in ad.model.state_dict().items()}
    applied = apply_patch(ad, Patch.load(path))
    assert target_logprobs(ad, [REQ.text], ["Rome"])[0] == pytest.approx(lp, abs=1e-5)
    assert torch.allclose(ad.w_out_weight(2), ed.adapter.w_out_weight(2), atol=1e-6)
    applied.revert()
    for k, v in ad.model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_patch_is_small_and_describes_itself(edited):
    ed, res, path, _ = edited
    assert path.stat().st_size < 16_000  # factors, not the dense (24 x 40) matrix... and metadata
    info = Patch.load(path).describe()
    assert info["method"] == "r-rome" and info["layers"] == [2] and info["ranks"] == {"2": 1}
    assert info["requests"][0]["subject"] == "Eiffel Tower"
    assert "model.layers.2.mlp.down_proj" in info["fingerprints"]


def test_different_base_refused_naming_matrix_and_force_recorded(edited):
    _, _, path, _ = edited
    other = _fresh(seed=1)
    before = other.w_out_weight(2).clone()
    with pytest.raises(PatchError, match=r"model\.layers\.2\.mlp\.down_proj"):
        apply_patch(other, Patch.load(path))
    assert torch.equal(other.w_out_weight(2), before)
    p = Patch.load(path)
    apply_patch(other, p, force=True)
    assert p.meta["forced"] is True and p.meta["forced_mismatch"] == ["model.layers.2.mlp.down_proj"]


def test_wrong_shapes_refused(edited, home, tiny_corpus):
    _, _, path, _ = edited
    gpt2 = _fresh("gpt2")  # d_ff 96 vs 40
    with pytest.raises(PatchError, match="shape"):
        apply_patch(gpt2, Patch.load(path))


def test_stack_and_revert_saved_model(home, tiny_corpus, tmp_path):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    r1 = ed.edit(REQ, **_opts(tiny_corpus))
    p1 = Patch.from_result(r1)
    r2 = ed.edit(Request("{} is in", "Space Needle", "Tokyo"), **_opts(tiny_corpus))
    p2 = Patch.from_result(r2)
    ad = _fresh()
    base = ad.w_out_weight(2).clone()
    with pytest.raises(PatchError):  # p2 was computed on base + p1: refused on the bare base
        apply_patch(ad, p2)
    done = apply_patches(ad, [p1, p2])
    assert torch.allclose(ad.w_out_weight(2), ed.adapter.w_out_weight(2), atol=1e-6)
    for a in reversed(done):
        a.revert()
    assert torch.equal(ad.w_out_weight(2), base)
    # a saved edited model has no originals in memory: revert by subtraction, close to the base
    apply_patch(ad, p1)
    exact = revert_patch(ad, p1)
    assert set(exact) == {"model.layers.2.mlp.down_proj"}
    assert torch.allclose(ad.w_out_weight(2), base, atol=1e-6)
    # reverting again, or a patch that is not applied, is refused and changes nothing
    now = ad.w_out_weight(2).clone()
    for p in (p1, p2):
        with pytest.raises(PatchError, match="does not have this patch applied"):
            revert_patch(ad, p)
        assert torch.equal(ad.w_out_weight(2), now)
    # a stack is reverted newest first in one call; out of order (oldest on top) is refused
    ad2 = _fresh()
    apply_patches(ad2, [p1, p2])
    with pytest.raises(PatchError, match="does not have this patch applied"):
        revert_patch(ad2, p1)
    revert_patches(ad2, [p1, p2])
    assert torch.allclose(ad2.w_out_weight(2), base, atol=1e-6)


def _signed(path, tensors, meta):
    """Write a patch file with valid checksums (so that the structural checks behind them are reached)."""
    import hashlib

    from safetensors.torch import save_file

    from factedit.patch.files import tensor_sha256

    meta = dict(meta, checksums={k: tensor_sha256(v) for k, v in tensors.items()})
    raw = json.dumps(meta)
    save_file(tensors, str(path),
              metadata={"factedit": raw, "factedit_sha256": hashlib.sha256(raw.encode()).hexdigest()})
    return path


def test_truncated_and_tampered_files(edited, tmp_path):
    _, _, path, _ = edited
    data = path.read_bytes()
    for cut in (0, 8, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(PatchError):
            Patch.load(bad)
    p = Patch.load(path)
    left, right = p.deltas[0].left, p.deltas[0].right
    # metadata naming other layers than the tensors
    _signed(tmp_path / "t.safetensors", {"0.layer2.left": left, "0.layer2.right": right}, dict(p.meta, layers=[3]))
    with pytest.raises(PatchError, match="layers"):
        Patch.load(tmp_path / "t.safetensors")
    _signed(tmp_path / "m.safetensors", {"0.layer2.left": left}, p.meta)
    with pytest.raises(PatchError, match="factors"):
        Patch.load(tmp_path / "m.safetensors")
    _signed(tmp_path / "n.safetensors", {"0.layer2.left": left * float("nan"), "0.layer2.right": right}, p.meta)
    with pytest.raises(PatchError, match="NaN"):
        Patch.load(tmp_path / "n.safetensors")
    # factors whose norm disagrees with the recorded per-layer norm (consistent checksums)
    _signed(tmp_path / "s.safetensors", {"0.layer2.left": 2 * left, "0.layer2.right": right}, p.meta)
    with pytest.raises(PatchError, match="norm"):
        Patch.load(tmp_path / "s.safetensors")
    with pytest.raises(PatchError, match="not found"):
        Patch.load(tmp_path / "missing.safetensors")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_corrupted_bytes_never_crash_nor_half_apply(edited, tmp_path, data):
    _, _, path, _ = edited
    raw = bytearray(path.read_bytes())
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(raw))
    ad = _fresh()
    before = ad.w_out_weight(2).clone()
    original = Patch.load(path)
    try:
        loaded = Patch.load(bad)
    except PatchError:  # header, metadata or tensor data changed: refused before anything is applied
        assert torch.equal(ad.w_out_weight(2), before)
        return
    # it loaded: then what it holds is exactly the original (the bytes were rewritten with the same values,
    # or only JSON whitespace in the header's padding changed), so applying it applies the original
    assert loaded.meta == original.meta
    assert all(torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
               for a, b in zip(loaded.deltas, original.deltas))


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    raw = bytearray(data)
    raw[at] ^= 1 << bit
    return bytes(raw)


def test_one_flipped_bit_is_refused_in_data_header_and_metadata(edited, tmp_path):
    """A flipped exponent bit in a factor once produced a model printing gibberish; now every region
    of the file is covered by a checksum and nothing is applied."""
    _, _, path, _ = edited
    data = path.read_bytes()
    n_header = int.from_bytes(data[:8], "little")
    header = data[8: 8 + n_header].decode()
    cases = {
        "tensor data": (len(data) - 2, 6),  # the high byte of the last float32: an exponent bit
        "header": (8 + header.index('"shape"') + 1, 0),
        "metadata": (8 + header.index("Eiffel") + 1, 0),
    }
    ad = _fresh()
    before = ad.w_out_weight(2).clone()
    for where, (at, bit) in cases.items():
        bad = tmp_path / f"flip-{where.replace(' ', '_')}.safetensors"
        bad.write_bytes(_flip(data, at, bit))
        with pytest.raises(PatchError):
            apply_patch(ad, Patch.load(bad))
        assert torch.equal(ad.w_out_weight(2), before), where


def test_cli_apply_of_a_damaged_patch_writes_nothing(edited, tmp_path, capsys):
    from factedit.cli import main

    ed, _, path, _ = edited
    base = tmp_path / "base"
    m, t = tiny_model("llama")
    m.save_pretrained(base)
    t.save_pretrained(base)
    data = path.read_bytes()
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(_flip(data, len(data) - 2, 6))
    out = tmp_path / "out"
    assert main(["apply", str(bad), "--model", str(base), "--save-model", str(out)]) == 2
    assert "damaged" in capsys.readouterr().err and not out.exists()


def test_matrix_fingerprint_is_bit_exact():
    a = torch.randn(4, 5)
    b = a.clone()
    assert matrix_fingerprint(a) == matrix_fingerprint(b)
    b[0, 0] = torch.nextafter(b[0, 0], torch.tensor(10.0))
    assert matrix_fingerprint(a) != matrix_fingerprint(b)
    assert matrix_fingerprint(a.bfloat16()) != matrix_fingerprint(a.half())


def test_cli_patch_workflow(home, tiny_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factedit.cli import main

    model, tok = tiny_model("llama")
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    patch, edited_dir = tmp_path / "e.safetensors", tmp_path / "edited"
    code = main(["edit", "--model", str(base_dir), "--prompt", "{} is located in the city of", "--subject",
                 "Eiffel Tower", "--target", "Rome", "--layer", "2", "--stats-corpus", str(tiny_corpus),
                 "--stats-tokens", "800", "--steps", "3", "--save-patch", str(patch), "--save-model", str(edited_dir),
                 "--json",
                 "--allow-unverified"])  # the patch workflow is tested, not whether the tiny model's edit takes
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["patch"] == str(patch)
    # the saved edited model loads in plain transformers and matches the in-session edit
    plain = AutoModelForCausalLM.from_pretrained(edited_dir)
    ad_plain = ModelAdapter(plain, AutoTokenizer.from_pretrained(edited_dir))
    assert target_logprobs(ad_plain, [REQ.text], ["Rome"])[0] == pytest.approx(
        __import__("math").log(out["after"]["p_new"]), abs=1e-5)
    assert main(["inspect", str(patch)]) == 0
    assert "Eiffel Tower" in capsys.readouterr().out
    applied_dir = tmp_path / "applied"
    assert main(["apply", str(patch), "--model", str(base_dir), "--save-model", str(applied_dir), "--json"]) == 0
    capsys.readouterr()
    a = AutoModelForCausalLM.from_pretrained(applied_dir).state_dict()
    b = plain.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)
    # applying twice is refused: the base no longer matches
    assert main(["apply", str(patch), "--model", str(applied_dir)]) == 2
    assert "does not match its fingerprint" in capsys.readouterr().err
    assert main(["revert", str(patch), "--model", str(applied_dir), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    base_w = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    back = AutoModelForCausalLM.from_pretrained(applied_dir).state_dict()
    assert all(torch.allclose(back[k], base_w[k], atol=1e-6) for k in base_w)
    assert "model.layers.2.mlp.down_proj" in r["bit_identical_to_base"]
    # reverting the same folder again is refused, and the folder is left as it is
    files = {f.name: f.read_bytes() for f in applied_dir.iterdir()}
    assert main(["revert", str(patch), "--model", str(applied_dir)]) == 2
    assert "does not have this patch applied" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in applied_dir.iterdir()} == files
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(patch.read_bytes()[:100])
    assert main(["apply", str(bad), "--model", str(base_dir)]) == 2
    assert main(["inspect", str(bad)]) == 2


def test_history_saved_and_reloaded_as_patch_stack(home, tiny_corpus, tmp_path):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    ed.edit(REQ, **_opts(tiny_corpus))
    ed.edit(Request("{} is in", "Space Needle", "Tokyo"), **_opts(tiny_corpus))
    names = ed.save_history(tmp_path / "hist")
    assert len(names) == 2
    target = ed.adapter.w_out_weight(2).clone()
    m2, t2 = tiny_model("llama")
    ed2 = Editor(m2, t2, progress=False)
    base = ed2.adapter.w_out_weight(2).clone()
    assert ed2.load_history(tmp_path / "hist") == 2
    assert torch.allclose(ed2.adapter.w_out_weight(2), target, atol=1e-6)
    assert [r.requests[0].subject for r in ed2.history] == ["Eiffel Tower", "Space Needle"]
    ed2.revert(2)
    assert torch.equal(ed2.adapter.w_out_weight(2), base)
    (tmp_path / "hist" / "stack.json").write_text("{not json")
    with pytest.raises(PatchError, match="not a factedit history"):
        ed2.load_history(tmp_path / "hist")


def test_revert_of_several_patches_is_all_or_nothing(edited, monkeypatch):
    """A failure while the second of two patches is taken off leaves the model with both patches on, bit for bit."""
    import factedit.patch.files as files

    ed, res, path, _ = edited
    ad = _fresh()
    patch = Patch.load(path)
    apply_patch(ad, patch)
    second = Patch(patch.deltas, dict(patch.meta, fingerprints=dict(patch.meta["fingerprints_after"]),
                                      fingerprints_after={}))
    apply_patch(ad, second)
    on = ad.w_out_stored(2).clone()
    calls = []
    real = files.apply_deltas

    def failing(adapter, deltas):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(adapter, deltas)

    monkeypatch.setattr(files, "apply_deltas", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        files.revert_patches(ad, [patch, second], force=True)
    assert len(calls) == 2 and torch.equal(ad.w_out_stored(2), on)
