"""The package layout holds: lower packages never import higher ones, no import cycles, and the
public API (``factedit.__all__``) is importable."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "factedit"

#: the data flow, bottom to top; packages of one rank do not import each other
RANKS = {"core": 0, "stats": 1, "edit": 2, "patch": 3, "trace": 3, "editor": 4, "side_effects": 4, "report": 5,
         "evaluation": 5,
         "ui": 6, "cli": 7, "__main__": 8}


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
