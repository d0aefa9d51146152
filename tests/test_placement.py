"""Models placed by accelerate: layers offloaded to disk or kept in a CPU state dict by accelerate's hooks
give the same edits, traces and patches as the model in memory, and the weights accelerate keeps really
change (on disk too) and are restored bit for bit."""

import json
import os

import pytest
import torch

from factedit import Editor, GuardConfig, Request, ValueConfig, load_model
from factedit.core import offload
from factedit.core.arch import ModelAdapter
from factedit.core.errors import FactEditError, ModelLoadError
from factedit.core.fingerprints import model_fingerprint
from factedit.core.lm import target_probabilities
from factedit.core.models import parse_max_memory
from factedit.patch.files import Patch, apply_patch
from factedit.trace.causal import TraceConfig, trace_prompt
from tiny import tiny_model

REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
REQS = [REQ, Request("{} is in", "Space Needle", "Tokyo"), Request("The capital of {} is", "Japan", "Paris")]
NO_GUARD = GuardConfig(enabled=False)  # tiny random models are not fluent (the guard has its own tests)
PROMPTS = [REQ.text, "The Space Needle is in", "The capital of Japan is"]
TARGETS = ["Rome", "Tokyo", "Paris"]


def _stats(corpus):
    return dict(stats_corpus=str(corpus), stats_tokens=2000)


def _rome(corpus):
    return dict(layer=2, value=ValueConfig(steps=6), context_lengths=((3, 2),), **_stats(corpus))


def _disk_map(arch: str) -> dict:
    """Layers 1 and 2 (the edited ones) offloaded to disk, the rest in memory."""
    if arch == "gpt2":
        return {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
                "transformer.h.1": "disk", "transformer.h.2": "disk", "transformer.h.3": "cpu",
                "transformer.ln_f": "cpu", "lm_head": "cpu"}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(params=["llama", "gpt2"])
def pair(request, tmp_path):
    """(plain Editor, Editor over the same weights loaded with layers 1-2 offloaded to disk, offload folder)."""
    model, tok = tiny_model(request.param)
    d = tmp_path / request.param
    model.save_pretrained(d)
    tok.save_pretrained(d)
    plain = Editor(*load_model(str(d)), progress=False)
    folder = tmp_path / "offload"
    placed = Editor(*load_model(str(d), device_map=_disk_map(request.param), offload_folder=str(folder)),
                    progress=False)
    assert placed.adapter.w_out_offloaded(2) and not placed.adapter.w_out_offloaded(3)
    return plain, placed, folder


def _offloaded_values(adapter, layer):
    """W_out of ``layer`` as accelerate's hook will load it for the next forward (read from its map / files)."""
    store, key = offload._slot(adapter.w_out(layer), "weight")
    return store[key].clone()


def test_same_model_same_fingerprint(pair):
    plain, placed, _ = pair
    assert model_fingerprint(placed.model) == model_fingerprint(plain.model)
    assert model_fingerprint(placed.model, upto_layer=2) == model_fingerprint(plain.model, upto_layer=2)
    assert torch.equal(placed.adapter.w_out_stored(2), plain.adapter.w_out_stored(2))
    assert placed.adapter.w_out_device(2) == torch.device("cpu")


def test_r_rome_edit_on_disk_offloaded_layer(pair, home, tiny_corpus):
    plain, placed, folder = pair
    w0 = placed.adapter.w_out_stored(2).clone()
    a = plain.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    b = placed.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    assert torch.allclose(b.deltas[0].dense(), a.deltas[0].dense(), rtol=1e-5, atol=1e-7)
    pa, pb = (target_probabilities(plain.adapter, PROMPTS, TARGETS),
              target_probabilities(placed.adapter, PROMPTS, TARGETS))
    assert pb == pytest.approx(pa, abs=1e-5)
    # the edited weight is what the hook loads: a new .dat file in the offload folder, not the checkpoint
    on_disk = _offloaded_values(placed.adapter, 2)
    assert not torch.equal(on_disk, w0)
    assert torch.allclose(on_disk, plain.adapter.w_out_stored(2), atol=1e-6)
    key = placed.adapter.w_out_name(2) + ".weight"
    assert (folder / f"{key}.dat").is_file()
    placed.revert()
    plain.revert()
    assert torch.equal(_offloaded_values(placed.adapter, 2), w0)  # bit for bit, on disk
    assert torch.equal(placed.adapter.w_out_stored(2), w0)
    pb2 = target_probabilities(placed.adapter, PROMPTS, TARGETS)
    assert pb2 == pytest.approx(target_probabilities(plain.adapter, PROMPTS, TARGETS), abs=1e-6)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batch_edit_across_disk_and_memory_layers(pair, method, home, tiny_corpus):
    plain, placed, _ = pair
    opts = dict(layers=(1, 2, 3), value=ValueConfig(steps=6), **_stats(tiny_corpus))
    if method == "alphaedit":
        opts["nullspace_threshold"] = 1e9
    before = {l: placed.adapter.w_out_stored(l).clone() for l in (1, 2, 3)}
    a = plain.edit(REQS, method, guard=NO_GUARD, **opts)
    b = placed.edit(REQS, method, guard=NO_GUARD, **opts)
    for da, db in zip(a.deltas, b.deltas):
        assert da.layer == db.layer
        assert torch.allclose(db.dense(), da.dense(), rtol=1e-4, atol=1e-6)
    pa, pb = (target_probabilities(plain.adapter, PROMPTS, TARGETS),
              target_probabilities(placed.adapter, PROMPTS, TARGETS))
    assert pb == pytest.approx(pa, abs=1e-5)
    for l in (1, 2):
        assert not torch.equal(_offloaded_values(placed.adapter, l), before[l])
    placed.revert()
    for l in (1, 2, 3):
        assert torch.equal(placed.adapter.w_out_stored(l), before[l])


def test_causal_trace_of_offloaded_model(pair, home):
    plain, placed, _ = pair
    cfg = TraceConfig(samples=3, kinds=("hidden", "mlp"))
    a = trace_prompt(plain.adapter, REQ.text, REQ.subject, config=cfg)
    b = trace_prompt(placed.adapter, REQ.text, REQ.subject, config=cfg)
    assert a.answer == b.answer and b.p_clean == pytest.approx(a.p_clean, abs=1e-6)
    for kind in ("hidden", "mlp"):
        assert torch.allclose(b.scores[kind], a.scores[kind], atol=1e-5, equal_nan=True)


def test_patch_apply_and_revert_on_offloaded_model(pair, home, tiny_corpus, tmp_path):
    plain, placed, _ = pair
    res = plain.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    path = Patch.from_result(res).save(tmp_path / "edit.safetensors")
    want = target_probabilities(plain.adapter, PROMPTS, TARGETS)
    w0 = _offloaded_values(placed.adapter, 2)
    applied = apply_patch(placed.adapter, Patch.load(path))
    assert target_probabilities(placed.adapter, PROMPTS, TARGETS) == pytest.approx(want, abs=1e-5)
    assert not torch.equal(_offloaded_values(placed.adapter, 2), w0)
    applied.revert()
    assert torch.equal(_offloaded_values(placed.adapter, 2), w0)


def test_dispatched_in_memory_model_and_cpu_state_dict(home, tiny_corpus, tmp_path):
    """The two other places accelerate keeps weights: ``.dat`` files it wrote itself (dispatch_model of a
    model in memory, with its index.json) and a CPU state dict (cpu_offload)."""
    from accelerate import cpu_offload, dispatch_model

    plain = Editor(*tiny_model("llama"), progress=False)
    m1, tok = tiny_model("llama")
    folder = tmp_path / "off"
    m1 = dispatch_model(m1, device_map=_disk_map("llama"), offload_dir=str(folder))
    m2, _ = tiny_model("llama")
    m2 = cpu_offload(m2, execution_device="cpu")
    a = plain.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    want = target_probabilities(plain.adapter, PROMPTS, TARGETS)
    for model in (m1, m2):
        ed = Editor(model, tok, progress=False)
        assert ed.adapter.w_out_offloaded(2)
        w0 = _offloaded_values(ed.adapter, 2)
        b = ed.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
        assert torch.allclose(b.deltas[0].dense(), a.deltas[0].dense(), rtol=1e-5, atol=1e-7)
        assert target_probabilities(ed.adapter, PROMPTS, TARGETS) == pytest.approx(want, abs=1e-5)
        ed.revert()
        assert torch.equal(_offloaded_values(ed.adapter, 2), w0)
    index = json.loads((folder / "index.json").read_text())
    key = ModelAdapter(m1, tok).w_out_name(2) + ".weight"
    assert index[key]["shape"] == list(m1.model.layers[2].mlp.down_proj.weight.shape)


def test_unwritable_offload_folder_leaves_weights(tmp_path, home, tiny_corpus):
    from accelerate import dispatch_model

    m, tok = tiny_model("llama")
    folder = tmp_path / "off"
    m = dispatch_model(m, device_map=_disk_map("llama"), offload_dir=str(folder))
    ed = Editor(m, tok, progress=False)
    w0 = _offloaded_values(ed.adapter, 2)
    import shutil
    import subprocess

    folder.chmod(0o500)
    immutable = False
    if os.access(folder, os.W_OK):  # root writes anywhere: make the folder immutable instead
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            folder.chmod(0o700)
            pytest.skip("running as root on a file system without chattr +i")
        immutable = True
    try:
        with pytest.raises(FactEditError, match="not writable"):
            ed.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)
    assert torch.equal(_offloaded_values(ed.adapter, 2), w0)
    assert not ed.history


def test_bad_placement_is_refused(tmp_path, tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA")
    with pytest.raises(ModelLoadError, match="no CUDA"):
        load_model(str(tiny_dir), device="cuda:0")
    with pytest.raises(ModelLoadError, match="no CUDA"):
        load_model(str(tiny_dir), device_map={"": "cuda:1"})
    with pytest.raises(ModelLoadError, match="not a device"):
        load_model(str(tiny_dir), device="gpu7")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(str(tiny_dir), device_map="auto", max_memory={"cpu": "1KB"})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ModelLoadError, match="offload folder"):
        load_model(str(tiny_dir), device_map="auto", offload_folder=str(blocker / "sub"))
    with pytest.raises(ModelLoadError, match="DEVICE=SIZE"):
        parse_max_memory("cpu:20GiB")
    with pytest.raises(ModelLoadError, match="not a size"):
        parse_max_memory("cpu=lots")
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}


def test_all_on_disk_with_offload_folder_still_edits(tmp_path, tiny_dir, home, tiny_corpus):
    """--max-memory too small for any layer, but with an offload folder: everything on disk, edits work."""
    ed = Editor(*load_model(str(tiny_dir), device_map="auto", max_memory={"cpu": "1KB"},
                            offload_folder=str(tmp_path / "off")), progress=False)
    assert ed.adapter.w_out_offloaded(2)
    r = ed.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    assert r.delta_norm > 0


def _cli(capsys, *argv):
    from factedit.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_edit_with_a_device_map_file(tiny_dir, tiny_corpus, home, tmp_path, capsys):
    """The same edit with layers 1-2 on disk reports the same numbers as in memory."""
    dm = tmp_path / "map.json"
    dm.write_text(json.dumps(_disk_map("llama")))
    base = ["edit", "--model", str(tiny_dir), "--prompt", "{} is located in the city of", "--subject", "Eiffel Tower",
            "--target", "Rome", "--true", "Paris", "--layer", "2", "--stats-corpus", str(tiny_corpus),
            "--stats-tokens", "600", "--steps", "3",
            "--json", "--allow-unverified", "--no-guard", "--no-side-effects"]
    runs = []
    for extra in ([], ["--device-map", str(dm), "--offload-folder", str(tmp_path / "off")]):
        code, out, err = _cli(capsys, *base, *extra)
        assert code == 0, err
        runs.append(json.loads(out))
    plain, placed = runs
    assert placed["layers"] == [2]
    for side in ("before", "after"):
        assert placed[side]["p_new"] == pytest.approx(plain[side]["p_new"], abs=1e-6)
        assert placed[side]["p_true"] == pytest.approx(plain[side]["p_true"], abs=1e-6)
    assert placed["after"]["p_new"] != placed["before"]["p_new"]
    assert placed["delta_norm"] == pytest.approx(plain["delta_norm"], rel=1e-5)
    assert list((tmp_path / "off").glob("*.dat"))  # the edited weight went to the offload folder


@pytest.mark.parametrize("extra,match", [
    (["--device", "cuda:0"], "no CUDA"),
    (["--device-map", "MAP_GPU"], "no CUDA"),
    (["--device-map", "auto", "--max-memory", "cpu=1KB"], "does not fit"),
    (["--device-map", "auto", "--offload-folder", "BLOCKED/sub"], "offload folder"),
    (["--device-map", "nowhere.json"], "neither one of"),
    (["--max-memory", "cpu=1GiB"], "needs --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
])
def test_cli_bad_placement_exits_2_and_writes_nothing(extra, match, tiny_dir, tiny_corpus, home, tmp_path, capsys):
    if torch.cuda.is_available() and "no CUDA" in match:
        pytest.skip("a machine with CUDA")
    (tmp_path / "map.json").write_text(json.dumps({"": "cuda:1"}))
    (tmp_path / "BLOCKED").write_text("a file, not a folder")
    extra = [str(tmp_path / "map.json") if x == "MAP_GPU" else str(tmp_path / x) if x.startswith("BLOCKED") else x
             for x in extra]
    code, out, err = _cli(capsys, "edit", "--model", str(tiny_dir), "--prompt", "{} is in", "--subject", "Eiffel Tower",
                          "--target", "Rome", "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600",
                          "--steps", "2", *extra)
    assert code == 2 and match in err and "factedit: error:" in err, err
    assert out == ""
    assert not (home / "stats").exists()  # nothing computed, nothing cached


def test_saving_an_edited_offloaded_model_keeps_the_edit(pair, home, tiny_corpus, tmp_path):
    from factedit.core.models import save_model

    _, placed, _ = pair
    placed.edit(REQ, "r-rome", guard=NO_GUARD, **_rome(tiny_corpus))
    edited = placed.adapter.w_out_stored(2).clone()
    save_model(placed.model, placed.tokenizer, tmp_path / "saved")
    reloaded = ModelAdapter(*load_model(str(tmp_path / "saved")))
    assert torch.equal(reloaded.w_out_stored(2), edited)
    assert torch.equal(reloaded.w_out_stored(1), placed.adapter.w_out_stored(1))
