"""The factedit home directory and atomic file writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["factedit_home", "atomic_path", "atomic_dir", "atomic_write_text", "apply_umask"]


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
        apply_umask(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` (a folder) whole.

    Readers see the old folder or the new one, never a half-written one; on failure ``target`` is
    untouched. What was written gets the modes the user's umask gives (mkdtemp makes a 0700 folder,
    some writers 0600 files)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp, directory=True)
        for p in tmp.rglob("*"):
            apply_umask(p, directory=p.is_dir())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: os.PathLike | str, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` (or ``mkdir``) would under the user's umask.

    Temporary files and folders are created private (0600 / 0700) and that mode would survive the
    rename into place; the files factedit writes are meant to be shared like any other file."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(target: os.PathLike | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
