"""``factedit shell``: one loaded model, commands line by line, through the page's Session. In process on a tiny
model (what each command does to the weights, bit for bit), and as a real process reading a script on stdin."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import torch

from factedit import Editor
from factedit.app.session import Session
from factedit.cli import parse
from factedit.cli.shell import Shell
from tiny import tiny_model

EDIT = 'edit --prompt "{} is located in the city of" --subject "Eiffel Tower" --target Rome --true Paris ' \
       "--layer 1 --steps 3 --allow-unverified --no-side-effects"
EDIT2 = 'edit --prompt "The capital of {} is" --subject Japan --target Seoul --layer 2 --steps 3 --allow-unverified ' \
        "--no-side-effects"


def _shell(tiny_corpus, *flags):
    model, tok = tiny_model("llama")
    settings = parse(["shell", "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", *flags])
    out, err = io.StringIO(), io.StringIO()
    return Shell(Session(Editor(model, tok, progress=False), settings), settings, out, err), out, err


def _weights(shell):
    return {k: v.clone() for k, v in shell.session.editor.model.state_dict().items()}


def test_edit_history_save_revert_apply_on_one_model(home, tiny_corpus, tmp_path):
    sh, out, err = _shell(tiny_corpus)
    base = _weights(sh)
    stack = tmp_path / "stack"
    failed = sh.run([EDIT, EDIT2, "history", "inspect 2", f"save {stack}", "# a comment", ""])
    assert failed == 0, err.getvalue()
    text = out.getvalue()
    assert "1. r-rome layer(s) 1: Eiffel Tower is located in the city of -> Rome" in text
    assert "2. r-rome layer(s) 2: The capital of Japan is -> Seoul" in text
    assert "edit 2: r-rome" in text and "'The capital of Japan is' -> 'Seoul'" in text
    edited = _weights(sh)
    assert any(not torch.equal(base[k], edited[k]) for k in base)
    assert sorted(p.name for p in stack.iterdir()) == ["00000-r-rome.safetensors", "00001-r-rome.safetensors",
                                                      "stack.json"]
    assert sh.run(["revert 2", "history"]) == 0
    assert all(torch.equal(base[k], v) for k, v in _weights(sh).items())  # bit for bit
    assert out.getvalue().rstrip().endswith("no edits yet")
    assert sh.run([f"apply {stack}", "history"]) == 0, err.getvalue()
    assert all(torch.equal(edited[k], v) for k, v in _weights(sh).items())  # the stack gives the same model
    assert "2 edit(s) in the session" in out.getvalue()


def test_a_failing_command_says_why_changes_nothing_and_the_shell_goes_on(home, tiny_corpus, tmp_path):
    sh, out, err = _shell(tiny_corpus)
    base = _weights(sh)
    lines = ["bogus", "edit --layer 99", "edit --no-such-option", 'edit --prompt "unclosed', "revert",
             "inspect 1", f"apply {tmp_path / 'missing.safetensors'}", "save", "edit --help", "history", "quit",
             EDIT]  # after quit: not run
    assert sh.run(lines) == 8
    msgs = err.getvalue()
    for want in ("unknown command 'bogus'", "out of range", "unrecognized arguments: --no-such-option",
                 "cannot read the line", "cannot revert 1 edits", "the session holds no edits",
                 "patch file not found", "save takes one folder"):
        assert want in msgs, (want, msgs)
    assert all(torch.equal(base[k], v) for k, v in _weights(sh).items())
    assert "no edits yet" in out.getvalue()


def test_json_lines_and_an_edit_saved_as_a_patch(home, tiny_corpus, tmp_path):
    sh, out, err = _shell(tiny_corpus, "--json")
    patch = tmp_path / "p.safetensors"
    assert sh.run([EDIT + f" --save-patch {patch}", "history", "revert"]) == 0, err.getvalue()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0]["method"] == "r-rome" and rows[0]["kept"] and rows[0]["patch"] == str(patch)
    assert patch.is_file()
    assert [e["edit"] for e in rows[1]["edits"]] == [1] and rows[2] == {"reverted": 1, "edits": 0}


def test_the_command_reads_a_script_on_stdin(tiny_dir, tiny_corpus, tmp_path):
    """A real process: the model loads once, lines run in order, the exit status says whether all succeeded."""
    env = {**os.environ, "FACTEDIT_HOME": str(tmp_path / "home")}
    argv = [sys.executable, "-m", "factedit", "shell", "--model", str(tiny_dir), "--stats-corpus", str(tiny_corpus),
            "--stats-tokens", "600"]
    script = "\n".join([EDIT, "history", "revert", "history"]) + "\n"
    done = subprocess.run(argv, input=script, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "factedit r-rome on" in done.stdout and "reverted; 0 edit(s) remain" in done.stdout
    assert done.stdout.rstrip().endswith("no edits yet")
    bad = subprocess.run(argv, input="edit --layer 99\nhistory\n", capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "out of range" in bad.stderr and "no edits yet" in bad.stdout


def test_a_requests_file_is_one_batch_edit_in_the_history(home, tiny_corpus, tmp_path):
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"},
        {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Seoul"}]) + "\n", encoding="utf-8")
    sh, out, err = _shell(tiny_corpus)
    base = _weights(sh)
    assert sh.run([f"edit --requests {reqs} --method memit --layers 1,2 --steps 3 --allow-unverified",
                   "history", "revert"]) == 0, err.getvalue()
    text = out.getvalue()
    assert "memit" in text and "1. memit layer(s) 1,2:" in text and "(2 requests)" not in text
    assert all(torch.equal(base[k], v) for k, v in _weights(sh).items())
