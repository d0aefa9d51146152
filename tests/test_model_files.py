"""Damaged or missing model files, hub ids offline, interrupted writes, and the base a PEFT adapter names.

* a damaged model folder (truncated or damaged ``model.safetensors``, a missing shard, no weights) given to
  ``edit``, ``apply``, ``revert``, ``export`` or ``ui``: exit 2 with one line naming the file, no traceback,
  nothing written;
* a missing local path is called that (not a malformed hub id); an unknown hub id offline fails at once;
* a write killed with SIGKILL leaves a temporary that the next write to the same target removes;
* an exported adapter's ``base_model_name_or_path`` is the hub id when it is known.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factedit import Editor, Request, ValueConfig
from factedit.cli import main
from factedit.core.errors import ModelLoadError
from factedit.core.models import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_HUB_ID,
    base_model_id,
    check_model_files,
    load_model,
    looks_like_path,
    model_source,
    save_model,
)
from factedit.core.paths import atomic_write_text, remove_stale_temporaries
from tiny import _TEXT, tiny_model

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

#: how each damage is told: a fragment of the one-line message
DAMAGE = {
    "truncated": "model.safetensors is truncated",
    "header": "model.safetensors is damaged: its safetensors header is not valid",
    "missing_shard": "names 1 file(s) that are not there: model-00002-of-",
    "no_weights": "has config.json but no weights beside it",
}


def _damage(d: Path, kind: str) -> Path:
    f = d / "model.safetensors"
    if kind == "truncated":
        os.truncate(f, f.stat().st_size // 2)
    elif kind == "header":
        data = bytearray(f.read_bytes())
        data[8:40] = b"#" * 32
        f.write_bytes(bytes(data))
    elif kind == "missing_shard":
        f.unlink()
        model, _ = tiny_model("llama")
        model.save_pretrained(d, max_shard_size="40KB")
        shards = sorted(d.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 3 and (d / "model.safetensors.index.json").is_file()
        shards[1].unlink()
    elif kind == "no_weights":
        f.unlink()
    return d


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    """One r-ROME patch of the tiny LLaMA that ``tiny_dir`` holds (the same seed: the same weights)."""
    d = tmp_path_factory.mktemp("patch")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(_TEXT[(i + j) % len(_TEXT)] for j in range(3)) + f" number {i}."
                                  for i in range(60)), encoding="utf-8")
    from factedit import Patch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_HOME", str(d / "home"))
        model, tok = tiny_model("llama")
        ed = Editor(model, tok, progress=False)
        r = ed.edit(Request("{} is in", "Eiffel Tower", "Rome"), layer=1, stats_corpus=str(corpus), stats_tokens=800,
                    value=ValueConfig(steps=2), context_lengths=((3, 2),), guard=False, verify=False)
        return Patch.from_result(r).save(d / "edit.safetensors")


# ------------------------------------------------------------------------------------------ damaged model files

@pytest.mark.parametrize("kind", list(DAMAGE))
def test_load_model_names_the_damage(kind, tiny_dir):
    """``load_model`` (what every command and ``ui --model`` loads through) refuses each damage with one line."""
    _damage(tiny_dir, kind)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tiny_dir))
    msg = str(e.value)
    assert DAMAGE[kind] in msg and str(tiny_dir) in msg and "\n" not in msg, msg
    with pytest.raises(ModelLoadError):
        check_model_files(tiny_dir)


def test_damaged_shard_and_trailing_bytes(tiny_dir):
    """A truncated shard of a sharded checkpoint and bytes after the data are found by the header check too."""
    model, _ = tiny_model("llama")
    (tiny_dir / "model.safetensors").unlink()
    model.save_pretrained(tiny_dir, max_shard_size="40KB")
    shard = sorted(tiny_dir.glob("model-*-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data + b"\0" * 5)
    with pytest.raises(ModelLoadError, match="5 bytes after the data"):
        load_model(str(tiny_dir))
    shard.write_bytes(data[:-10])
    with pytest.raises(ModelLoadError, match=f"{shard.name} is truncated"):
        load_model(str(tiny_dir))
    shard.write_bytes(data)
    load_model(str(tiny_dir))  # whole again: loads


def _argv(command, model_dir, patch, out):
    if command == "edit":
        return ["edit", "--model", str(model_dir), "--prompt", "{} is in", "--subject", "Eiffel Tower", "--target",
                "Rome", "--save-patch", str(out / "p.safetensors"), "--save-model", str(out / "model")]
    if command == "apply":
        return ["apply", str(patch), "--model", str(model_dir), "--save-model", str(out / "model")]
    if command == "revert":  # saves over --model by default: the folder must stay as it was
        return ["revert", str(patch), "--model", str(model_dir)]
    return ["export", str(patch), "--model", str(model_dir), "--peft", str(out / "lora")]


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("command", ["edit", "apply", "revert", "export"])
def test_cli_damaged_model_exits_2_without_traceback(command, kind, tiny_dir, patch_file, tmp_path, home, capsys):
    _damage(tiny_dir, kind)
    before = _tree(tiny_dir)
    out = tmp_path / "out"
    code = main(_argv(command, tiny_dir, patch_file, out))
    stdout, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("factedit: error: ") and DAMAGE[kind] in err and err.count("\n") == 1, err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists() and _tree(tiny_dir) == before
    assert not (home / "stats").exists()


def test_cli_ui_damaged_model_exits_2(tiny_dir, home, capsys, monkeypatch):
    pytest.importorskip("gradio")
    import factedit.ui

    def no_serve(*a, **k):
        raise AssertionError("the page must not start over a damaged model")

    monkeypatch.setattr(factedit.ui, "serve", no_serve)
    _damage(tiny_dir, "truncated")
    code = main(["ui", "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert code == 2 and DAMAGE["truncated"] in err and "Traceback" not in err


def test_a_file_or_a_folder_without_config_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="is a file: give a model folder"):
        load_model(str(tiny_dir / "config.json"))
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="not a model folder: it has no config.json"):
        load_model(str(tiny_dir))
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is damaged"):
        load_model(str(tiny_dir))


# --------------------------------------------------------------------------- missing paths, hub ids offline

def test_looks_like_path_rule():
    for name in ("/no/such/dir", "./model", "../model", "~/models/x", ".", "..", "models/", "a/b/c", "C:\\models\\x",
                 "model.gguf", "some/model.GGUF"):
        assert looks_like_path(name), name
    for name in ("gpt2", "openai-community/gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "tiny-llama"):
        assert not looks_like_path(name), name


@pytest.mark.parametrize("name", ["/no/such/dir", "./no-such-factedit-dir", "~/no-such-factedit-dir", "a/b/c",
                                  "no-such.gguf"])
def test_missing_local_path_is_called_missing(name):
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_model(name)
    assert "Repo id" not in str(e.value) and name in str(e.value)


def test_cli_missing_local_path(tmp_path, home, capsys):
    code = main(["edit", "--model", "/no/such/dir", "--prompt", "{} is in", "--subject", "Eiffel Tower",
                 "--target", "Rome", "--save-patch", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "model path /no/such/dir does not exist" in err and "Repo id" not in err
    assert not (tmp_path / "p.safetensors").exists()


def test_cli_unknown_hub_id_offline_fails_fast(tmp_path, home, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    code = main(["edit", "--model", "no-such-org/no-such-model-xyz", "--prompt", "{} is in", "--subject",
                 "Eiffel Tower", "--target", "Rome"])
    seconds = time.perf_counter() - t
    err = capsys.readouterr().err
    assert code == 2 and "'no-such-org/no-such-model-xyz'" in err and "not in the local Hugging Face cache" in err
    assert "offline mode is on" in err and "Traceback" not in err
    assert seconds < 20, seconds  # 48.8 s of network retries before


def test_unknown_hub_id_with_the_hub_unreachable_fails_fast(monkeypatch):
    """Offline mode off but no network: one short connection probe, not minutes of retries."""
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached") as e:
        load_model("no-such-org/no-such-model-xyz")
    assert "'no-such-org/no-such-model-xyz'" in str(e.value)
    assert time.perf_counter() - t < 20


def test_not_a_hub_id():
    with pytest.raises(ModelLoadError, match="neither an existing local path nor a hub id"):
        load_model("bad id!")


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding ``model_dir`` as ``repo_id`` (what a download leaves)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_cached_hub_id_loads_offline_and_names_itself(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snap = _fake_hub_cache(tmp_path / "hub", "factedit-test/tiny-llama", tiny_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load_model("factedit-test/tiny-llama")
    assert model_source(model) == {"hub_id": "factedit-test/tiny-llama", "local_path": str(snap.resolve())}
    assert model.config._name_or_path == "factedit-test/tiny-llama" == base_model_id(model)
    os.truncate(snap / "model.safetensors", 100)  # a damaged cache: named, not a traceback
    with pytest.raises(ModelLoadError, match="hub id 'factedit-test/tiny-llama'.*safetensors is damaged or truncated"):
        load_model("factedit-test/tiny-llama")


# ------------------------------------------------------------------------------ interrupted writes clean up

_SLOW_SAVE = """
import sys, time
sys.path.insert(0, {tests!r})
from tiny import tiny_model
from factedit.core.models import save_model
model, tok = tiny_model("llama", seed=1)
write = model.save_pretrained
def slow(d, **kw):  # the weights written, then a long stall inside the write: killed here
    write(d, **kw)
    print("WRITING", d, flush=True)
    time.sleep(300)
model.save_pretrained = slow
save_model(model, tok, {target!r})
"""

_SLOW_FILE = """
import time
from factedit.core.paths import atomic_path
with atomic_path({target!r}) as tmp:
    tmp.write_text("half of it")
    print("WRITING", tmp, flush=True)
    time.sleep(300)
"""


def _kill_mid_write(script: str) -> Path:
    """Run ``script`` in a subprocess, SIGKILL it once its write is under way; the temporary it left."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the write is under way (or the process ends)
        assert line.startswith("WRITING "), f"the writer ended early: {line!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: no zombie keeps the PID alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Path(line.split(" ", 1)[1].strip())


def test_killed_model_write_is_cleaned_by_the_next_write(tmp_path, caplog):
    target = tmp_path / "out"
    model, tok = tiny_model("llama")
    save_model(model, tok, target)
    first = _tree(target)
    stale = _kill_mid_write(_SLOW_SAVE.format(tests=str(TESTS), target=str(target)))
    assert stale.is_dir() and stale.parent == tmp_path and stale.name.startswith(".out.tmp-")
    assert (stale / "model.safetensors").is_file()
    assert _tree(target) == first  # the killed write left the target as it was
    with caplog.at_level(logging.WARNING, logger="factedit.core.paths"):
        save_model(model, tok, target)
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing hidden left beside it
    lines = [r.getMessage() for r in caplog.records if "stale temporary" in r.getMessage()]
    assert len(lines) == 1 and stale.name in lines[0], lines
    check_model_files(target)
    loaded, _ = load_model(str(target))
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_killed_file_write_is_cleaned_by_the_next_write(tmp_path, caplog):
    target = tmp_path / "x.json"
    stale = _kill_mid_write(_SLOW_FILE.format(target=str(target)))
    assert stale.is_file() and stale.name.startswith(".x.json.tmp-") and not target.exists()
    with caplog.at_level(logging.WARNING, logger="factedit.core.paths"):
        atomic_write_text(target, "{}")
    assert not stale.exists() and target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert any(stale.name in r.getMessage() for r in caplog.records)


def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path, caplog):
    """A live writer's temporary stays (this process, another running process); another host's is removed only
    once it has not changed for a day; names of earlier versions are reported, never removed."""
    from factedit.core import paths

    host = paths._host_tag()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        names = {
            "mine": f".out.tmp-{host}-{os.getpid()}-abcdefgh",
            "running": f".out.tmp-{host}-{sleeper.pid}-abcdefgh",
            "gone": f".out.tmp-{host}-{dead.pid}-abcdefgh",
            "gone_old": f".out.tmp-{host}-{dead.pid}-abcdefgh.old",
            "other_host_recent": ".out.tmp-000000-1-abcdefgh" if host != "000000" else ".out.tmp-000001-1-abcdefgh",
            "other_host_old": ".out.tmp-000000-2-abcdefgh" if host != "000000" else ".out.tmp-000001-2-abcdefgh",
            "legacy": ".out.k3j4h5g6",
            "user": ".out.backup",
        }
        for n in names.values():
            (tmp_path / n).mkdir()
            (tmp_path / n / "model.safetensors").write_bytes(b"x")
        day_ago = time.time() - paths.STALE_AFTER_S - 60
        for p in (tmp_path / names["other_host_old"], tmp_path / names["other_host_old"] / "model.safetensors"):
            os.utime(p, (day_ago, day_ago))
        with caplog.at_level(logging.WARNING, logger="factedit.core.paths"):
            removed = remove_stale_temporaries(tmp_path / "out")
        assert sorted(removed) == sorted([names["gone"], names["gone_old"], names["other_host_old"]])
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names[k] for k in ("mine", "running", "other_host_recent", "legacy", "user")}
        assert any("earlier factedit version" in r.getMessage() and names["legacy"] in r.getMessage()
                   for r in caplog.records)
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------ the base a PEFT adapter names

def test_model_source_decides_the_hub_id(tmp_path, monkeypatch):
    """The embedded default's cached conversion -> its hub id; a Hugging Face cache snapshot -> its id; a local
    folder -> its path; a name that is not there -> a hub id."""
    home = tmp_path / "home"
    monkeypatch.setenv("FACTEDIT_HOME", str(home))

    class M:
        def __init__(self, name_or_path):
            self.config = type("C", (), {"_name_or_path": name_or_path})()

    embedded = home / "models" / f"{DEFAULT_MODEL}-0123456789ab"
    embedded.mkdir(parents=True)
    assert model_source(M(str(embedded))) == {"hub_id": DEFAULT_MODEL_HUB_ID, "local_path": str(embedded.resolve())}
    assert DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snap = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert model_source(M(str(snap)))["hub_id"] == "openai-community/gpt2"
    local = tmp_path / "my-model"
    local.mkdir()
    assert model_source(M(str(local))) == {"hub_id": None, "local_path": str(local.resolve())}
    assert base_model_id(M(str(local))) == str(local.resolve())
    assert model_source(M("openai-community/gpt2")) == {"hub_id": "openai-community/gpt2", "local_path": None}


def _export(model, tok, patch_file, out, **kw):
    from factedit import Patch
    from factedit.core.arch import ModelAdapter
    from factedit.patch.peft import ADAPTER_CONFIG, PROVENANCE, export_peft

    export_peft(ModelAdapter(model, tok), [Patch.load(patch_file)], out, **kw)
    return (json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"],
            json.loads((out / PROVENANCE).read_text())["base_model"])


def test_peft_base_of_the_embedded_default_is_its_hub_id(tiny_dir, patch_file, tmp_path, monkeypatch):
    """``load_model()`` of the embedded default (a tiny stand-in for its cached conversion: the decision, not
    the 135M model) exports an adapter naming ``HuggingFaceTB/SmolLM2-135M-Instruct``."""
    import factedit.core.models as models

    monkeypatch.setattr(models, "embedded_model_dir", lambda: tiny_dir)
    model, tok = load_model()
    assert model_source(model) == {"hub_id": DEFAULT_MODEL_HUB_ID, "local_path": str(tiny_dir)}
    base, prov = _export(model, tok, patch_file, tmp_path / "lora")
    assert base == DEFAULT_MODEL_HUB_ID
    assert prov["hub_id"] == DEFAULT_MODEL_HUB_ID and prov["local_path"] == str(tiny_dir) and "note" in prov


def test_peft_base_of_a_hub_id_a_local_folder_and_an_override(tiny_dir, patch_file, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    snap = _fake_hub_cache(tmp_path / "hub", "factedit-test/tiny-llama", tiny_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("factedit-test/tiny-llama")
    base, prov = _export(model, tok, patch_file, tmp_path / "hub-lora")
    assert base == "factedit-test/tiny-llama" and prov["local_path"] == str(snap.resolve())

    model, tok = load_model(str(tiny_dir))
    base, prov = _export(model, tok, patch_file, tmp_path / "local-lora")
    assert base == str(tiny_dir.resolve()) == prov["local_path"] and prov["hub_id"] is None

    out = tmp_path / "cli-lora"
    assert main(["export", str(patch_file), "--model", str(tiny_dir), "--peft", str(out), "--base-model",
                 "me/my-base"]) == 0, capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    prov = json.loads((out / "factedit_provenance.json").read_text())["base_model"]
    assert cfg["base_model_name_or_path"] == "me/my-base"
    assert prov["overridden"] is True and prov["local_path"] == str(tiny_dir.resolve())
