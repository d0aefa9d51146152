"""--hparams (issue 34): every ROME / R-ROME / MEMIT / EMMET / AlphaEdit hyperparameter file that the ROME and MEMIT
research repositories and EasyEdit ship (copied into tests/fixtures/hparams, see SOURCES.md there) is read; the
mapping is asserted field by field; an edit from a file equals the edit from the same options given by hand; and
files that cannot run here are refused with a reason."""

import json
from pathlib import Path

import pytest
import torch

from factedit import Editor, Request
from factedit.cli import main
from factedit.core.errors import FactEditError, MethodError
from factedit.edit.guard import GuardConfig
from factedit.edit.methods.hparams import read_hparams
from factedit.edit.methods.options import parse_options
from tiny import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "hparams"
FILES = sorted(p for p in FIXTURES.rglob("*") if p.suffix in (".json", ".yaml"))
#: the method each folder's files are for
FOLDER = {"ROME": "rome", "R-ROME": "r-rome", "MEMIT": "memit", "EMMET": "emmet", "AlphaEdit": "alphaedit"}


def test_the_fixture_holds_every_file_of_the_two_repositories():
    counts = {str(p.relative_to(FIXTURES).parent): 0 for p in FILES}
    for p in FILES:
        counts[str(p.relative_to(FIXTURES).parent)] += 1
    assert counts == {"rome-repo/ROME": 4, "memit-repo/MEMIT": 2, "memit-repo/ROME": 5, "easyedit/ROME": 14,
                      "easyedit/R-ROME": 7, "easyedit/MEMIT": 11, "easyedit/EMMET": 4, "easyedit/AlphaEdit": 6}


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FIXTURES)) for p in FILES])
def test_every_file_is_read_as_its_method(path):
    hp = read_hparams(path)
    assert hp.method == FOLDER[path.parent.name]
    raw = json.loads(path.read_text()) if path.suffix == ".json" else __import__("yaml").safe_load(path.read_text())
    assert [r[0] for r in hp.rows if "×" not in r[0]] == list(raw)  # every key accounted for, in order
    fields = dict(hp.options.fields)
    assert fields["value.steps"] == raw["v_num_grad_steps"] and fields["value.lr"] == float(raw["v_lr"])
    assert fields["value.clamp_norm_factor"] == float(raw["clamp_norm_factor"])
    if hp.method in ("rome", "r-rome"):
        assert hp.options.layer == raw["layers"][0] and fields["mom2_adjustment"] == raw["mom2_adjustment"]
        assert any("mom2_adjustment is false" in w for w in hp.warnings) == (not raw["mom2_adjustment"])
    else:
        assert list(hp.options.layers) == raw["layers"]
    if hp.method == "alphaedit":
        assert fields["alpha"] == float(raw["L2"])
        assert fields["nullspace_threshold"] == float(raw["nullspace_threshold"])
    if hp.method == "emmet":  # EasyEdit: D + λI with C scaled by mom2_update_weight is our ridge λ · weight
        assert fields["ridge"] == pytest.approx(float(raw["emmet_lambda"]) * float(raw["mom2_update_weight"]))
    for key in ("device", "stats_dir", "model_name"):
        assert (key in raw) == any(w.startswith(f"{path.name}: {key} has no meaning") for w in hp.warnings)


def test_the_seed_tutorials_gpt2_medium_file_field_by_field(home):
    hp = read_hparams(FIXTURES / "rome-repo" / "ROME" / "gpt2-medium.json")
    o = hp.options
    assert hp.method == "rome" and o.layer == 8 and o.stats_tokens == 100_000 and o.stats_corpus == "wikipedia"
    f = dict(o.fields)
    assert (f["value.steps"], f["value.lr"], f["value.weight_decay"], f["value.clamp_norm_factor"],
            f["value.kl_factor"], f["mom2_adjustment"]) == (20, 0.5, 0.5, 3.0, 0.0625, True)
    assert f["context_lengths"] == ((5, 10), (10, 10)) and f["fact_token"] == "subject_last"
    # on a GPT-2 (tiny: 4 layers, so the layer is given on top, as a user would for another size)
    ed = Editor(*tiny_model("gpt2"), progress=False)
    cfg = ed.make_config(hparams=str(FIXTURES / "rome-repo" / "ROME" / "gpt2-medium.json"), layer=2)
    assert cfg.method == "rome" and cfg.layer == 2 and cfg.mom2_adjustment
    v = cfg.value
    assert (v.steps, v.lr, v.weight_decay, v.clamp_norm_factor, v.kl_factor) == (20, 0.5, 0.5, 3.0, 0.0625)
    assert cfg.stats_tokens == 100_000 and cfg.stats_dtype == "float32" and cfg.stats_corpus == "wikipedia"
    with pytest.raises(FactEditError, match="layer 8 is out of range"):  # the file's own layer, on 4 layers
        ed.make_config(hparams=str(FIXTURES / "rome-repo" / "ROME" / "gpt2-medium.json"))


def _file(tmp_path, name="rome.yaml", **changes):
    data = __import__("yaml").safe_load((FIXTURES / "easyedit" / "ROME" / "llama-7b.yaml").read_text())
    data.update(layers=[1], v_num_grad_steps=3, context_template_length_params=[[3, 2]], mom2_n_samples=800)
    data.update(changes)
    for k, v in list(changes.items()):
        if v is None:
            data.pop(k)
    path = tmp_path / name
    path.write_text(__import__("yaml").safe_dump(data))
    return path


def test_an_edit_from_an_easyedit_file_equals_the_same_options_given_by_hand(home, tiny_corpus, tmp_path):
    path = _file(tmp_path, mom2_dataset=str(tiny_corpus))
    req = Request("The capital of {} is", "Japan", "Paris", "Tokyo")
    kw = dict(guard=GuardConfig(enabled=False), verify=False)
    ed = Editor(*tiny_model("llama"), progress=False)
    a = ed.compute(req, config=ed.make_config(hparams=str(path)), **{})
    by_hand = ed.make_config("rome", layer=1, stats_corpus=str(tiny_corpus), stats_tokens=800, stats_dtype="float32",
                             options={"value.steps": 3, "value.lr": 0.5, "value.weight_decay": 1e-3,
                                      "value.clamp_norm_factor": 4.0, "value.kl_factor": 0.0625,
                                      "mom2_adjustment": False, "context_lengths": [[3, 2]],
                                      "fact_token": "subject_last"})
    assert ed.make_config(hparams=str(path)) == by_hand
    b = ed.compute(req, config=by_hand)
    assert torch.equal(a.deltas[0].dense(), b.deltas[0].dense())  # bit-identical
    res = ed.edit(req, hparams=str(path), **kw)  # the file names the method
    assert res.method == "rome" and torch.equal(res.deltas[0].dense(), b.deltas[0].dense())


def test_files_that_cannot_run_here_are_refused_with_a_reason(home, tmp_path, tiny_dir, capsys):
    ed = Editor(*tiny_model("llama"), progress=False)
    cases = {
        _file(tmp_path, "alg.yaml", alg_name="KN"): "not a method factedit has",
        _file(tmp_path, "key.yaml", surprise=1): "unknown hparams key 'surprise'",
        _file(tmp_path, "layers.yaml", layers=[9]): "layer",
        _file(tmp_path, "tok.yaml", fact_token="subject_first_after_last"): "fact_token",
        _file(tmp_path, "gpt2.yaml", rewrite_module_tmp="transformer.h.{}.mlp.c_proj"): "does not have",
        _file(tmp_path, "other.yaml", rewrite_module_tmp="model.layers.{}.mlp.up_proj"): "factedit edits the MLP",
    }
    for path, why in cases.items():
        with pytest.raises(FactEditError, match=why):
            ed.make_config(hparams=str(path))
    with pytest.raises(MethodError, match="is a rome hparams file, but the method asked for is memit"):
        ed.make_config("memit", hparams=str(_file(tmp_path)))
    bad = tmp_path / "broken.yaml"
    bad.write_text("layers: [1\n")
    out = tmp_path / "out"
    for path, why in [(bad, "not valid YAML"), (tmp_path / "alg.yaml", "not a method factedit has")]:
        code = main(["edit", "--model", str(tiny_dir), "--hparams", str(path), "--prompt", "The capital of {} is",
                     "--subject", "Japan", "--target", "Paris", "--save-model", str(out)])
        assert code == 2 and why in capsys.readouterr().err and not out.exists()


def test_the_hparams_command_shows_the_mapping_and_checks_a_model(tmp_path, tiny_dir, capsys):
    path = _file(tmp_path)
    assert main(["hparams", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{path}: rome") and "--set value.steps=3" in text and "mom2_adjustment is false" in text
    assert main(["hparams", str(path), "--model", str(tiny_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["method"] == "rome" and got["config"]["layer"] == 1 and got["config"]["mom2_adjustment"] is False
    assert any("v_loss_layer 31 is not this model's last layer (3)" in w for w in got["warnings"])
    assert main(["hparams", str(_file(tmp_path, "g.yaml", ln_f_module="transformer.ln_f")), "--model",
                 str(tiny_dir)]) == 2
    assert "does not have" in capsys.readouterr().err


@pytest.mark.slow
def test_an_easyedit_llama_file_edits_the_embedded_model_as_the_same_options_by_hand(embedded):
    """EasyEdit's ROME file for LLaMA-2 on SmolLM2 (a LLaMA): the file's own layer 5, modules and knobs (only the
    statistics' source is the test's); the delta equals that of the same settings as options, bit for bit."""
    from conftest import CORPUS, TEST_STATS_TOKENS

    ed = embedded
    path = FIXTURES / "easyedit" / "ROME" / "llama-7b.yaml"
    stats = dict(stats_corpus=str(CORPUS), stats_tokens=TEST_STATS_TOKENS)
    req = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
    cfg = ed.make_config(hparams=str(path), **stats)
    by_hand = ed.make_config("rome", layer=5, stats_dtype="float32", **stats, options=parse_options([
        "value.steps=25", "value.lr=0.5", "value.weight_decay=0.001", "value.clamp_norm_factor=4",
        "value.kl_factor=0.0625", "mom2_adjustment=false", "context_lengths=[[5,10],[10,10]]",
        "fact_token=subject_last"]))  # what --set gives
    assert cfg == by_hand and cfg.layer == 5 and not cfg.mom2_adjustment
    a, b = ed.compute(req, config=cfg), ed.compute(req, config=by_hand)
    assert torch.equal(a.deltas[0].dense(), b.deltas[0].dense())
