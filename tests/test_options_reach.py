"""Every option that the command line or the web page accepts reaches what its command builds: given a value
other than its default, the command's settings, model options, method config (made by the same calls the
command makes), edit settings, evaluation config or page session differ. A front end that accepts an option
and drops it (``factedit ui --stats-seq-len`` before the application layer) fails here.

Options are taken from the declarations (:data:`factedit.app.options.OPTIONS`): a new option is checked
without touching this file."""

import json
from pathlib import Path

import pytest

from factedit import Editor
from factedit.app.options import COMMANDS, FORMS, OPTIONS, options_of
from factedit.app.settings import Settings
from factedit.cli import parse
from factedit.edit.methods.options import to_jsonable
from tiny import tiny_model

#: what a command needs besides the option under test (its required options and positionals)
BASE = {"eval": {"dataset": "base.jsonl", "out": "base"}, "trace": {"out": "base"},
        "import": {"peft": "base", "out": "base"}, "apply": {"patches": ["base"]}, "revert": {"patches": ["base"]},
        "export": {"patches": ["base"]}, "inspect": {"patch": "base"}, "summarize": {"runs": ["base"]},
        "capacity": {"runs": ["base"]}, "keygen": {"key_path": "base.key"},
        "audit": {"suspect": "base"}, "hparams": {"hparams_file": "base.yaml"},
        "sign": {"target": "base", "key": "base.key"}, "verify": {"target": "base"}}
#: options whose example needs another option set (in both runs): a batch method has targets to batch
CONTEXT = {("edit", "target_batch"): {"method": "memit"}, ("edit", "layers"): {"method": "memit"},
           ("eval", "layers"): {"method": "memit"}, ("eval", "target_batch"): {"method": "memit"}}
#: what each option's value is compared through, beyond the settings themselves: the method config
METHOD_OPTIONS = {"method", "layer", "layers", "steps", "target_batch", "seed", "fields", "stats_corpus",
                  "stats_tokens", "stats_seq_len", "stats_dtype", "hparams"}
#: commands with options of the same names that make no method config (statistics; trace's seed is its noise's;
#: audit's statistics are those it reads the subjects' keys against)
NO_CONFIG = {"stats", "trace", "audit"}


@pytest.fixture(scope="module")
def editor():
    return Editor(*tiny_model("llama"), progress=False)  # 4 layers


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory):
    from dataclasses import asdict

    from factedit.core.arch import ARCH_SPECS

    path = tmp_path_factory.mktemp("arch") / "spec.json"
    path.write_text(json.dumps(asdict(ARCH_SPECS["llama"])), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hparams_file(tmp_path_factory):
    """An EasyEdit ROME file for the tiny LLaMA (layer 1 of its 4)."""
    import yaml

    src = Path(__file__).parent / "fixtures" / "hparams" / "easyedit" / "ROME" / "llama-7b.yaml"
    data = {**yaml.safe_load(src.read_text()), "layers": [1]}
    path = tmp_path_factory.mktemp("hparams") / "rome.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def knowns(tmp_path_factory):
    path = tmp_path_factory.mktemp("knowns") / "knowns.json"
    path.write_text(json.dumps([{"known_id": 0, "subject": "Japan", "attribute": "Tokyo",
                                 "prompt": "The capital of Japan is"}]), encoding="utf-8")
    return path


def _argv(command: str, values: dict) -> list:
    """A command line giving ``values`` (option name -> the value as text, a list for repeatable options)."""
    argv, positional = [command], []
    for name, value in values.items():
        o = next(x for x in options_of(command) if x.name == name)
        if o.kind == "positional":
            positional += list(value) if isinstance(value, list) else [value]
        elif o.kind == "flag":
            argv += [o.flags[0]] if value else []
        elif o.kind == "switch":
            argv += [o.flags[0] if value else "--no-" + o.flags[0][2:]]
        elif o.kind == "append":
            for v in (value if isinstance(value, list) else [value]):
                argv += [o.flags[0], v]
        else:
            argv += [o.flags[0], str(value)]
    return argv + positional


def _example(o, where: str):
    """The option's example value (switches and flags: the opposite of their default; a method: another one)."""
    if o.kind in ("flag", "switch"):
        return not o.default_for(where)
    if o.name == "method":
        return next(m for m in o.choices_list() if m != o.default_for(where))
    if o.name == "layers":
        return "2,3"
    if o.name == "side_effects_bank":
        return None  # a real file, set by the caller
    return o.example


def _views(settings: Settings, editor) -> dict:
    """What the command builds from its settings, as comparable JSON."""
    views = {"settings": settings.values, "model": to_jsonable(settings.model)}
    where = settings.where
    if where in ("edit", "eval") or where.startswith("page."):
        if where in ("eval", "page.evaluate"):
            cfg = settings.eval
            views["eval"] = to_jsonable(cfg)
            opts = cfg.options
        else:
            opts = settings.method
        if where in ("edit", "page.edit", "page.batch"):
            views["edit"] = to_jsonable(settings.edit)
        if opts.method != "none" and where != "page.locate":
            views["config"] = to_jsonable(editor.make_config(opts))
    if where == "stats":
        views["method"] = to_jsonable(settings.method)
    return views


def _ui_views(settings: Settings, editor, tmp_path) -> dict:
    """``factedit ui``: the session the command makes (cli/ui.py), and the configs its forms make."""
    from factedit.cli.ui import make_session

    session = make_session(settings, editor.model, editor.tokenizer)
    return {"settings": settings.values, "model": to_jsonable(settings.model),
            "config": to_jsonable(session.config("r-rome")), "bank": session.bank.source,
            "workdir": str(session.workdir), "dataset": session.dataset}


def _shell_views(settings: Settings, editor) -> dict:
    """``factedit shell``: the session the command makes (cli/shell.py) and what an ``edit`` line builds there."""
    from factedit.cli.shell import make_shell

    shell = make_shell(settings, editor.model, editor.tokenizer)
    line = shell.line_settings([])
    return {"settings": settings.values, "model": to_jsonable(settings.model), "bank": shell.session.bank.source,
            "config": to_jsonable(shell.session.editor.make_config(line.method)), "edit": to_jsonable(line.edit),
            "trust": shell.session.settings.get("trust"), "signature": shell.session.settings.get("require_signature")}


CASES = [(c, o.name) for c in COMMANDS for o in options_of(c)]


@pytest.mark.parametrize("command,name", CASES, ids=[f"{c}:{n}" for c, n in CASES])
def test_every_command_line_option_reaches_what_the_command_builds(command, name, editor, knowns, arch_file,
                                                                    hparams_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    o = next(x for x in options_of(command) if x.name == name)
    value = {"side_effects_bank": str(knowns), "arch_spec": str(arch_file), "hparams": str(hparams_file)}.get(
        name, _example(o, command))
    assert value is not None, f"{command} --{name}: the declaration needs an example"
    base = {**BASE.get(command, {}), **CONTEXT.get((command, name), {})}
    plain, given = parse(_argv(command, base)), parse(_argv(command, {**base, name: value}))
    assert given.get(name) != plain.get(name), f"{command}: {o.flags} was parsed but not kept"
    if command == "ui":
        monkeypatch.chdir(tmp_path)
        a, b = _ui_views(plain, editor, tmp_path), _ui_views(given, editor, tmp_path)
    elif command == "shell":
        a, b = _shell_views(plain, editor), _shell_views(given, editor)
    else:
        a, b = _views(plain, editor), _views(given, editor)
    changed = sorted(k for k in a if a[k] != b[k])
    assert changed, f"{command} {o.flags[0] if o.flags else name}: accepted, reaches nothing the command builds"
    if name in METHOD_OPTIONS and command not in NO_CONFIG:
        assert "config" in changed, f"{command} {o.flags[0]}: accepted, but the method config is the same"


PAGE = [(f, o.name) for f in FORMS for o in options_of(f)]
#: what a page control holds for each option (the text or number the browser sends)
PAGE_EXAMPLES = {"layer": "3", "limit": 7, "samples": 3, "ge_length": 20, "paraphrases": "Fact: {} is in\nQ: {}?",
                 "requests": "r.jsonl", "dataset": "d.jsonl"}


@pytest.mark.parametrize("form,name", PAGE, ids=[f"{f}:{n}" for f, n in PAGE])
def test_every_page_control_reaches_what_the_session_builds(form, name, editor, tmp_path):
    from factedit.app.session import Session
    from factedit.ui.controls import form_values

    session = Session(editor, Settings("ui", {"stats_seq_len": 128, "workdir": str(tmp_path / "w")}))
    o = next(x for x in options_of(form) if x.name == name)
    value = PAGE_EXAMPLES.get(name, _example(o, form))
    plain = session.form(form, {})
    given = session.form(form, form_values(form, [name], [value]))
    a, b = _views(plain, editor), _views(given, editor)
    assert sorted(k for k in a if a[k] != b[k]), f"page {form}: control {name!r} reaches nothing the session builds"
    if name in METHOD_OPTIONS:
        assert a["config"] != b["config"], f"page {form}: control {name!r} does not reach the method config"
    if "config" in b:  # the ui command's statistics reach every form's method config
        assert b["config"]["stats_seq_len"] == 128


def test_the_checks_catch_a_dropped_option(editor, tmp_path, monkeypatch):
    """A session that ignored the command's statistics options (as `factedit ui` did) fails the check above."""
    from factedit.app.session import Session

    monkeypatch.setattr(Session, "form", lambda self, name, values: Settings(name, values))  # base dropped
    plain, given = parse(["ui"]), parse(["ui", "--stats-seq-len", "128"])
    a, b = _ui_views(plain, editor, tmp_path), _ui_views(given, editor, tmp_path)
    assert a["config"] == b["config"]  # the loss is visible: what the session builds did not change


def test_every_declared_option_has_an_example_and_help():
    for o in OPTIONS:
        assert o.help_text(o.on[0]), o.name
        assert o.example is not None or o.kind in ("flag", "switch") or o.name == "side_effects_bank", o.name
        assert o.on and set(o.on) <= set(COMMANDS) | set(FORMS), o.name


def test_old_spellings_still_work_and_say_so(capsys):
    cases = [(["edit", "--batch-size", "4"], "target_batch", 4), (["eval", "--batch-size", "4", "--dataset", "d",
             "--out", "o"], "cases_per_edit", 4), (["edit", "--corpus", "model"], "stats_corpus", "model"),
             (["eval", "--prefetch-batch", "3", "--dataset", "d", "--out", "o"], "target_batch", 3),
             (["eval", "--chat", "--dataset", "d", "--out", "o"], "gen_chat", True)]
    for argv, name, want in cases:
        settings = parse(argv)
        assert settings.get(name) == want, argv
        err = capsys.readouterr().err
        assert f"note: {argv[1]} is deprecated; use" in err and err.count("\n") == 1, err
    # a ROME variant's targets of several single edits (the run's prefetch); a batch method's own batch size
    assert parse(["eval", "--target-batch", "3", "--dataset", "d", "--out", "o"]).eval.prefetch_batch == 3
    memit = parse(["eval", "--method", "memit", "--target-batch", "3", "--dataset", "d", "--out", "o"]).eval
    assert memit.prefetch_batch == 1 and dict(memit.method_options)["target_batch"] == 3
    out = parse(["eval", "--guard", "--dataset", "d", "--out", "o"])
    assert out.eval.guard is True and parse(["eval", "--dataset", "d", "--out", "o"]).eval.guard is False
    assert parse(["edit", "--no-guard"]).edit.guard is False and parse(["edit"]).edit.guard is True
    assert capsys.readouterr().err == ""  # the current spellings say nothing
