"""Shared helpers of the benchmark scripts: machine description and markdown sections."""

from __future__ import annotations

import platform
from pathlib import Path

#: the repository and the shared data beside it (read from there, never copied in)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "corpus" / "wikitext2_valid.txt"
CF = DATA / "counterfact" / "counterfact_knowedit.jsonl"

HEAD = "# Benchmarks\n\nEvery figure here comes from a script in `bench/`, with the command that produced it.\n\n"


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def write_rows(path, rows) -> None:
    """Per-record rows of a benchmark as JSON lines (``path`` None: nothing)."""
    import json

    if path:
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_section(path, heading: str, text: str, head: str = HEAD) -> None:
    """Replace (or append) the section starting with ``heading`` in the markdown file ``path``."""
    out = Path(path)
    old = out.read_text(encoding="utf-8") if out.exists() else head
    start = old.find(heading)
    if start >= 0:
        end = old.find("\n## ", start + len(heading))
        old = old[:start] + old[end + 1:] if end >= 0 else old[:start]
    out.write_text(old.rstrip() + "\n\n" + text, encoding="utf-8")


def publish(lines, out, heading: str, head: str = HEAD, trailing_newline: bool = False) -> str:
    """Print a benchmark's markdown section and, with ``out``, replace it in that file."""
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    print(text)
    if out:
        write_section(out, heading, text, head=head)
    return text
