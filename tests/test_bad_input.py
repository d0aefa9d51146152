"""Bad input: a clear error, a non-zero CLI exit, weights and caches unchanged."""

import json

import pytest
import torch

from factedit import Editor, Request, ValueConfig
from factedit.cli import main
from factedit.core.errors import FactEditError, LayerError, MethodError, RequestError, StatsError
from tiny import tiny_model


@pytest.mark.parametrize("args,match", [
    (("{} is in {}", "Paris", "Rome"), "exactly one"),
    (("is in", "Paris", "Rome"), "exactly one"),
    (("{} is in", "", "Rome"), "subject is empty"),
    (("{} is in", "Paris", "  "), "target_new is empty"),
    (("{} is in", "Paris", "Rome", "Rome"), "the same"),
])
def test_request_validation(args, match):
    with pytest.raises(RequestError, match=match):
        Request(*args)


def test_subject_not_in_filled_prompt():
    with pytest.raises(RequestError, match="does not occur"):
        Request.from_filled("The Louvre is in", "Eiffel Tower", "Rome")
    r = Request.from_filled("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    assert r.prompt == "The {} is in"



def _weights(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_edit_json_on_tiny_model(tiny_dir, tiny_corpus, home, capsys):
    code, out, err = _run(capsys, "edit", "--model", str(tiny_dir), "--prompt", "{} is located in the city of",
                          "--subject", "Eiffel Tower", "--target", "Rome", "--true", "Paris", "--layer", "1",
                          "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "3", "--json",
                          "--allow-unverified")  # a tiny random model: whether the edit takes is not tested here
    assert code == 0, err
    obj = json.loads(out)  # exactly one JSON object on stdout
    for key in ("method", "model", "layers", "before", "after", "delta_norm", "seconds"):
        assert key in obj
    for side in ("before", "after"):
        assert {"p_new", "p_true", "generation"} <= set(obj[side])
    assert obj["layers"] == [1] and obj["method"] == "r-rome"
    # the wear meter of the one edited layer: the first edit of a fresh model, so the update so far is this one
    w = obj["wear"]["1"]
    assert w["edits"] == 1 and w["ratio"] is None and w["relative"] > 0 and w["edit_norm"] > 0
    code, text, err = _run(capsys, "edit", "--model", str(tiny_dir), "--prompt", "{} is located in the city of",
                           "--subject", "Eiffel Tower", "--target", "Rome", "--true", "Paris", "--layer", "1",
                           "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "3",
                           "--allow-unverified")
    assert code == 0, err
    assert "wear (update of the edited matrices" in text and "layer 1: " in text and "its first edit" in text


@pytest.mark.parametrize("extra,match", [
    (["--prompt", "is located in", "--subject", "Eiffel Tower", "--target", "Rome"], "does not occur"),
    (["--prompt", "{} is located in", "--subject", "Eiffel Tower", "--target", ""], "target_new is empty"),
    (["--prompt", "{} is in {}", "--subject", "Eiffel Tower", "--target", "Rome"], "exactly one"),
    (["--layer", "99"], "out of range"),
    (["--method", "romeo"], "unknown method"),
    (["--stats-corpus", "/nonexistent/corpus.txt"], "not found"),
    (["--set", "value.learning_rate=0.1"], "has no option 'learning_rate'"),
    (["--set", "value.lr=fast"], "not a valid float"),
    (["--set", "lr"], "KEY=VALUE"),
])
def test_cli_bad_input_exits_nonzero_and_leaves_weights(extra, match, tiny_dir, tiny_corpus, home, capsys):
    before = _weights(tiny_dir)
    base = ["edit", "--model", str(tiny_dir), "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600",
            "--steps", "2"]
    if "--prompt" not in extra:
        base += ["--prompt", "{} is in", "--subject", "Eiffel Tower", "--target", "Rome"]
    code, out, err = _run(capsys, *base, *extra)
    assert code == 2
    assert match in err and "factedit: error:" in err
    assert out == ""
    after = _weights(tiny_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_empty_corpus(tiny_dir, tmp_path, home, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = _run(capsys, "stats", "--model", str(tiny_dir), "--layers", "1", "--stats-corpus", str(empty))
    assert code == 2 and "empty" in err


def test_editor_leaves_model_untouched_on_errors(home, tiny_corpus, tmp_path):
    model, tok = tiny_model("gpt2")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = Request("{} is in", "Eiffel Tower", "Rome")
    with pytest.raises(LayerError):
        ed.edit(req, layer=7)
    with pytest.raises(MethodError):
        ed.edit(req, method="nope")
    with pytest.raises(FactEditError):
        ed.edit(req, layer=1, stats_corpus=str(tmp_path / "missing.txt"))
    # NaN statistics: poison the cache, the edit must refuse
    ed.stats(1, str(tiny_corpus), 600)
    ed.caches.clear_stats()
    from conftest import poison_stats_file

    path = next((home / "stats").rglob("*.safetensors"))
    poison_stats_file(path, float("inf"), (3, 3))
    poisoned = path.read_bytes()
    with pytest.raises(StatsError, match="NaN or Inf"):
        ed.edit(req, layer=1, stats_corpus=str(tiny_corpus), stats_tokens=600, value=ValueConfig(steps=2))
    assert path.read_bytes() == poisoned  # cache untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ed.history == ()


def test_failure_during_apply_restores(home, tiny_corpus, monkeypatch):
    from factedit.edit.deltas import LayerDelta, apply_deltas

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ad = ed.adapter
    good = LayerDelta(1, torch.randn(ad.d_model), torch.randn(ad.d_ff))
    bad = LayerDelta(2, torch.full((ad.d_model,), float("nan")), torch.randn(ad.d_ff))
    with pytest.raises(FactEditError, match="NaN"):
        apply_deltas(ad, [good, bad])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_requests_file_that_is_not_utf8(tiny_dir, tmp_path, home, capsys):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}),
             json.dumps({"prompt": "{} is in", "subject": "Zürich", "target_new": "Rome"}, ensure_ascii=False)]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    code, out, err = _run(capsys, "edit", "--model", str(tiny_dir), "--requests", str(path), "--method", "memit")
    assert code == 2 and "latin1.jsonl:2: not valid UTF-8" in err and "Traceback" not in err
    from factedit.evaluation import DatasetError, load_cases

    with pytest.raises(DatasetError, match="latin1.jsonl:2: not valid UTF-8"):
        load_cases(path)


def test_written_files_follow_the_umask(home, tiny_corpus, tmp_path):
    """Patches, saved models and caches get the mode any file gets under the user's umask (the
    temporary file's private 0600 / 0700 must not survive the atomic rename)."""
    import os
    import stat

    from factedit import Patch, save_model
    from factedit.core.paths import atomic_write_text

    old = os.umask(0o022)
    try:
        model, tok = tiny_model("llama")
        ed = Editor(model, tok, progress=False)
        r = ed.edit(Request("{} is in", "Paris", "Rome"), layer=2, stats_corpus=str(tiny_corpus), stats_tokens=800,
                    value=ValueConfig(steps=2), context_lengths=((3, 2),))
        patch = Patch.from_result(r).save(tmp_path / "p.safetensors")
        saved = save_model(model, tok, tmp_path / "saved")
        atomic_write_text(tmp_path / "x.json", "{}")
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (patch, tmp_path / "x.json", saved / "model.safetensors")}
        assert all(m == 0o644 for m in modes.values()), modes
        assert stat.S_IMODE(saved.stat().st_mode) == 0o755
        stats_files = list((home / "stats").rglob("*.safetensors"))
        assert stats_files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in stats_files)
    finally:
        os.umask(old)
