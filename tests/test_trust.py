"""Trust what you ship: signatures (OpenSSF model signing, offline keys), claims checked against what a
patch's delta does, and saved models that revert bit for bit and take the same patch again."""

import json
import shutil

import pytest
import torch

from conftest import STATS
from factedit.cli import main
from factedit.core.signing import check, generate_key, sign
from factedit.patch.files import Patch

pytest.importorskip("model_signing", reason="signing needs the sign extra: pip install 'factedit[sign]'")

EDIT = ["--prompt", "{} is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome", "--true", "Paris",
        "--layer", "1", "--steps", "12", "--no-side-effects", "--allow-unverified"]


@pytest.fixture
def made(tiny_dir, tiny_corpus, home, tmp_path, capsys):
    """A tiny model folder, a patch made on it, and a key pair."""
    stats = ["--stats-corpus", str(tiny_corpus), "--stats-tokens", "600"]
    assert main(["edit", "--model", str(tiny_dir), *stats, *EDIT, "--save-patch", str(tmp_path / "p.safetensors")]) == 0
    capsys.readouterr()
    private, public = generate_key(tmp_path / "me.key")
    return tiny_dir, tmp_path / "p.safetensors", private, public


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _fake(path, out, **changes):
    """What a forger can do without the key: rewrite the metadata and let save() recompute every checksum."""
    p = Patch.load(path)
    p.meta.update(changes)
    return p.save(out)


def test_signatures_verify_offline_and_refuse_any_change(made, tmp_path, capsys):
    _, patch, private, public = made
    assert main(["sign", str(patch), "--key", str(private)]) == 0 and patch.with_name("p.safetensors.sig").is_file()
    assert main(["verify", str(patch), "--trust", str(public)]) == 0
    assert "verified with" in capsys.readouterr().out
    # one byte of metadata changed (re-hashed as a forger would): the signature no longer verifies
    forged = _fake(patch, tmp_path / "p2.safetensors",
                   requests=[{**Patch.load(patch).meta["requests"][0], "target_new": "Romf"}])
    shutil.copy(patch.with_name("p.safetensors.sig"), tmp_path / "p2.safetensors.sig")
    assert main(["verify", str(forged), "--trust", str(public)]) == 2
    assert "content changed since it was signed" in capsys.readouterr().out
    other, other_pub = generate_key(tmp_path / "other.key")
    assert check(patch, [str(other_pub)]).detail.endswith("signed with another key")
    assert check(patch).state == "unchecked" and check(tmp_path / "nothing").state == "unsigned"
    with pytest.raises(Exception, match="already exists"):
        generate_key(private)  # keys are never overwritten


def test_apply_checks_signatures_and_claims(made, tmp_path, capsys):
    model, patch, private, public = made
    out = tmp_path / "out"
    base = ["apply", str(patch), "--model", str(model), "--trust", str(public)]
    assert main(base + ["--require-signature", "--save-model", str(out)]) == 2  # unsigned
    assert "signature verified by a trusted key is required" in capsys.readouterr().err and not out.exists()
    sign(patch, private)
    assert main(base + ["--require-signature", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["signatures"][0]["state"] == "verified" and got["claims"][0]["ok"]
    # the description rewritten (and re-hashed): its recorded P(new) after the edit is not what the delta gives
    forged = _fake(patch, tmp_path / "f.safetensors",
                   requests=[{"prompt": "The spelling of {} in the docs is", "subject": "Eiffel Tower",
                              "target_new": "Rome (unchanged, cosmetic fix)", "target_true": None}])
    assert main(["apply", str(forged), "--model", str(model), "--save-model", str(out)]) == 2
    err = capsys.readouterr().err
    assert "claims FAIL" in err and "nothing was applied" in err and not out.exists()
    assert main(["inspect", str(forged), "--model", str(model)]) == 0
    text = capsys.readouterr().out
    assert "claims FAIL" in text and "signature: unsigned" in text and "statistics of layer 1" in text
    assert main(["apply", str(forged), "--model", str(model), "--force"]) == 0  # forced: applied, and said
    assert "claims FAIL" in capsys.readouterr().out
    # a signed patch with a changed byte: refused whatever --force says
    shutil.copy(patch.with_name("p.safetensors.sig"), tmp_path / "f.safetensors.sig")
    assert main(["apply", str(forged), "--model", str(model), "--trust", str(public), "--force"]) == 2
    assert "signature INVALID" in capsys.readouterr().err


def test_saved_models_revert_bit_for_bit_and_take_the_patch_again(made, tmp_path, capsys):
    model, patch, _, _ = made
    out = tmp_path / "saved"
    assert main(["apply", str(patch), "--model", str(model), "--save-model", str(out)]) == 0
    record = json.loads((out / "factedit-provenance.json").read_text())
    assert [r["file"] for r in record["patches"]] == [str(patch)] and (out / "factedit-undo.safetensors").is_file()
    edited = _weights(out)
    assert main(["revert", str(patch), "--model", str(out), "--json"]) == 0
    assert all(json.loads(capsys.readouterr().out.splitlines()[-1])["bit_identical_to_base"].values())
    base, back = _weights(model), _weights(out)
    assert all(torch.equal(base[k], back[k]) for k in base)
    assert json.loads((out / "factedit-provenance.json").read_text())["patches"] == []
    assert main(["apply", str(patch), "--model", str(out), "--save-model", str(out)]) == 0  # the same patch again
    again = _weights(out)
    assert all(torch.equal(edited[k], again[k]) for k in edited)
    # without the undo data (a model saved elsewhere): said, not hidden
    (out / "factedit-undo.safetensors").unlink()
    assert main(["revert", str(patch), "--model", str(out)]) == 0
    assert "bit-identical to the base: no" in capsys.readouterr().out


def test_edit_signs_what_it_writes_and_its_saved_model_reverts_exactly(tiny_dir, tiny_corpus, home, tmp_path,
                                                                        capsys):
    private, public = generate_key(tmp_path / "k")
    stats = ["--stats-corpus", str(tiny_corpus), "--stats-tokens", "600"]
    assert main(["edit", "--model", str(tiny_dir), *stats, *EDIT, "--save-patch", str(tmp_path / "e.safetensors"),
                 "--save-model", str(tmp_path / "m"), "--sign", str(private), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["signatures"]) == 2
    assert check(tmp_path / "e.safetensors", [str(public)]).verified and check(tmp_path / "m", [str(public)]).verified
    assert main(["revert", str(tmp_path / "e.safetensors"), "--model", str(tmp_path / "m"), "--save-model",
                 str(tmp_path / "r")]) == 0
    base, back = _weights(tiny_dir), _weights(tmp_path / "r")
    assert all(torch.equal(base[k], back[k]) for k in base)
    # an adapter exported and signed, imported only when it verifies
    assert main(["export", str(tmp_path / "e.safetensors"), "--model", str(tiny_dir), "--peft", str(tmp_path / "a"),
                 "--sign", str(private)]) == 0
    capsys.readouterr()
    imp = ["import", "--peft", str(tmp_path / "a"), "--trust", str(public), "--require-signature"]
    assert main(imp + ["--out", str(tmp_path / "i.safetensors")]) == 0
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert main(imp + ["--out", str(tmp_path / "j.safetensors")]) == 2
    assert "content changed" in capsys.readouterr().err and not (tmp_path / "j.safetensors").exists()


def test_the_page_checks_signatures_and_claims_on_upload(made, tmp_path):
    from factedit import Editor, load_model
    from factedit.app.session import Session
    from factedit.app.settings import Settings
    from factedit.core.errors import FactEditError

    model_dir, patch, private, public = made
    ed = Editor(*load_model(str(model_dir)), progress=False)
    strict = Session(ed, Settings("ui", {"trust": [str(public)], "require_signature": True,
                                         "workdir": str(tmp_path / "w")}))
    with pytest.raises(FactEditError, match="required"):
        strict.upload_patch(str(patch))
    sig = sign(patch, private)
    upload = tmp_path / "upload"  # the page's uploads land in folders of their own
    upload.mkdir()
    moved = shutil.copy(patch, upload / "p.safetensors")
    got = strict.upload_patch([str(moved), str(sig)])
    assert got["signature"]["state"] == "verified" and got["claims"]["ok"] and len(ed.history) == 1
    ed.revert()
    forged = _fake(patch, tmp_path / "f.safetensors", verification=[{"verified": True, "p_new": 0.99}], verified=True)
    loose = Session(ed, Settings("ui", {"workdir": str(tmp_path / "w2")}))
    with pytest.raises(FactEditError, match="claims FAIL"):
        loose.upload_patch(str(forged))
    assert ed.history == ()
    assert loose.upload_patch(str(forged), force=True)["claims"]["ok"] is False and len(ed.history) == 1


@pytest.mark.slow
def test_a_faked_description_of_a_real_edit_is_refused(embedded, tmp_path, capsys):
    """The issue's forgery on the embedded model: a real edit (Japan's currency -> euro) whose patch says it
    is a cosmetic change of another prompt, the metadata re-hashed; apply refuses it and inspect says why."""
    from factedit import GuardConfig, Request

    ed = embedded
    req = Request("The currency of {} is", "Japan", "euro", "yen")
    result = ed.edit(req, guard=GuardConfig(enabled=False), **STATS)
    try:
        path = Patch.from_result(result).save(tmp_path / "real.safetensors")
    finally:
        ed.revert()
    assert result.verified
    forged = _fake(path, tmp_path / "forged.safetensors",
                   requests=[{"prompt": "The spelling of {} in the docs is", "subject": "Japan",
                              "target_new": "yen (unchanged, cosmetic fix)", "target_true": None}])
    assert main(["apply", str(forged), "--save-model", str(tmp_path / "out")]) == 2
    assert "claims FAIL" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["inspect", str(forged)]) == 0
    text = capsys.readouterr().out
    assert "'The spelling of Japan in the docs is' -> 'yen (unchanged, cosmetic fix)'" in text
    assert "claims FAIL" in text and "the delta gives" in text
    assert main(["apply", str(path), "--json"]) == 0  # the honest patch passes the same check
    assert json.loads(capsys.readouterr().out)["claims"][0]["ok"]


@pytest.mark.slow
def test_a_saved_embedded_model_reverts_bit_for_bit_and_takes_the_patch_again(embedded, tmp_path, capsys):
    """apply -> save -> revert -> apply again on the embedded model (float32, 30 layers): the reverted weights
    equal the base bitwise (they were 35,348 entries off before the undo records)."""
    from safetensors import safe_open

    from factedit import GuardConfig, Request
    from factedit.core.models import embedded_model_dir

    ed = embedded
    result = ed.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
                     guard=GuardConfig(enabled=False), **STATS)
    try:
        path = Patch.from_result(result).save(tmp_path / "eiffel.safetensors")
    finally:
        ed.revert()
    name = ed.adapter.w_out_name(result.layers[0]) + ".weight"
    saved = tmp_path / "saved"
    assert main(["apply", str(path), "--save-model", str(saved)]) == 0
    assert main(["revert", str(path), "--model", str(saved), "--json"]) == 0
    assert all(json.loads(capsys.readouterr().out.splitlines()[-1])["bit_identical_to_base"].values())
    with safe_open(str(embedded_model_dir() / "model.safetensors"), "pt") as a, \
            safe_open(str(saved / "model.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    assert main(["apply", str(path), "--model", str(saved), "--json"]) == 0  # the same patch takes again
