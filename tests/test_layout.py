"""The package layout holds: lower packages never import higher ones, no import cycles, the front ends reach
methods only through the registry and options only through the application layer, the package never
imports the tests' helpers, and the public API (``factedit.__all__``) is importable."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "factedit"

#: the data flow, bottom to top; packages of one rank do not import each other
RANKS = {"core": 0, "stats": 1, "edit": 2, "patch": 3, "trace": 3, "editor": 4, "audit": 4, "evaluation": 5,
         "app": 6, "ui": 7, "cli": 8, "__main__": 9}
#: the modules of edit/methods that are not a method: what everything above may import
METHOD_SEAM = {"factedit.edit.methods", "factedit.edit.methods.registry", "factedit.edit.methods.options",
               "factedit.edit.methods.hparams", "factedit.edit.methods.base"}
#: the tests' own modules (helpers no module of the package may import)
TEST_HELPERS = {p.stem for p in Path(__file__).parent.glob("*.py")}


def _modules():
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules) -> set:
    """Every factedit module that ``name`` imports (at module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t.startswith("factedit") and t in modules and t != name:
                found.add(t)
    return found


def _rank(module: str):
    parts = module.split(".")
    return RANKS.get(parts[1]) if len(parts) > 1 else None  # the root package re-exports everything


def test_no_upward_or_sideways_imports():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        r = _rank(name)
        if r is None:
            continue
        for target in _imports(name, path, modules):
            t = _rank(target)
            same_pkg = name.split(".")[1] == target.split(".")[1]
            if t is None or t > r or (t == r and not same_pkg):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages export names
            if node != "factedit" and nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open" and nxt != "factedit":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walker resolves relative imports (a check that cannot fail would prove nothing)."""
    modules = _modules()
    fake = tmp_path / "x.py"
    fake.write_text("from ..editor import Editor\nfrom ..stats.layer import layer_stats\n", encoding="utf-8")
    found = _imports("factedit.core.x", fake, modules)
    assert found == {"factedit.editor", "factedit.stats.layer"}
    assert _rank("factedit.editor") > _rank("factedit.core.x")


def test_every_public_name_imports():
    import factedit

    missing = [n for n in factedit.__all__ if not hasattr(factedit, n)]
    assert not missing
    for name in factedit.__all__:
        assert getattr(factedit, name) is not None, name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports_alone(module):
    import importlib

    if module.endswith("__main__"):
        return  # runs the CLI on import
    importlib.import_module(module)


def test_python_dash_m_factedit_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "factedit", "edit", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--method METHOD" in out.stdout and "r-rome (default)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "factedit", "inspect", "/nonexistent.safetensors"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "factedit: error:" in bad.stderr


def _is_method_module(module: str) -> bool:
    return module.startswith("factedit.edit.methods.") and module not in METHOD_SEAM


def test_every_command_prints_its_help(capsys):
    """``factedit COMMAND --help`` for every command (argparse formats help texts with %: a literal one in an
    option's help, as "% of the unedited model's", crashed ``capacity --help``)."""
    from factedit.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.startswith("usage: factedit " + name), name
    with pytest.raises(SystemExit):
        main(["capacity", "--help"])
    assert "% of the unedited model's" in capsys.readouterr().out


def test_front_ends_editor_and_history_import_no_method_module():
    """The CLI, the evaluation, the application layer, the page, the Editor and its history learn about methods
    from the registry only: no import of a method's own module (rome, batch, ft, ...)."""
    modules = _modules()
    watched = [m for m in modules if m.split(".")[1:2] in (["cli"], ["evaluation"], ["app"], ["ui"])
               or m in ("factedit.editor", "factedit.edit.history")]
    assert "factedit.editor" in watched and "factedit.cli.edit" in watched
    bad = [f"{m} imports {t}" for m in watched for t in _imports(m, modules[m], modules) if _is_method_module(t)]
    assert not bad, "\n".join(sorted(bad))
    assert _is_method_module("factedit.edit.methods.rome") and not _is_method_module("factedit.edit.methods.registry")


def test_options_are_declared_in_the_application_layer_only():
    """Every command-line option is added by app/options.py (from its declarations): no other module of the
    package calls ``add_argument``; what an edit shows is typed there too."""
    modules = _modules()
    callers = sorted(m for m, p in modules.items() if "add_argument(" in p.read_text(encoding="utf-8"))
    assert callers == ["factedit.app.options"], callers
    from factedit.app import reports

    assert {"EditReport", "BatchReport"} <= set(reports.__all__)
    assert "factedit.report" not in modules and "factedit.side_effects" not in modules


def test_the_package_imports_no_test_helper():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{name} imports {n}" for n in names if n.split(".")[0] in TEST_HELPERS | {"tests"}]
    assert not bad, "\n".join(bad)
    assert "browser" in TEST_HELPERS and not (SRC / "ui" / "browser.py").exists()
