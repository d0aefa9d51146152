"""The factedit home directory and atomic file writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["factedit_home", "atomic_path", "atomic_write_text"]


def factedit_home() -> Path:
    """``$FACTEDIT_HOME`` or ``~/.cache/factedit`` (created on demand)."""
    env = os.environ.get("FACTEDIT_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "factedit"
    home.mkdir(parents=True, exist_ok=True)
    return home


@contextlib.contextmanager
def atomic_path(target: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    Readers never see a half-written file: either the old content or the new.
    On failure the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(target: os.PathLike | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
