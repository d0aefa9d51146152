"""The factedit home directory and atomic file writes.

Every atomic write goes through a hidden temporary beside its target, named for the writer:
``.<target>.tmp-<host>-<pid>-<random>`` (a folder, or a file ending in ``.tmp``), where ``<host>`` is six hex
digits of the SHA-256 of the host name and ``<pid>`` the writing process. A write that is killed (SIGKILL,
power loss) leaves that temporary behind; the next write to the same target removes the ones that are
stale (:func:`remove_stale_temporaries`):

* written on this host by a process that is no longer running (a PID that is running, whatever it now is,
  keeps its temporary: never a live write's);
* written on another host (a shared file system): when nothing in it has changed for
  :data:`STALE_AFTER_S` (a day); a running write keeps changing its files.

Temporaries of factedit versions before this naming (``.<target>.XXXXXXXX``, ``.<target>.old``) do not say
who wrote them: they are reported in a warning, never removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

__all__ = ["factedit_home", "atomic_path", "atomic_dir", "atomic_write_text", "apply_umask",
           "remove_stale_temporaries", "STALE_AFTER_S"]

log = logging.getLogger(__name__)

#: A temporary written on another host is stale when nothing in it changed for this long (seconds).
STALE_AFTER_S = 24 * 3600


def factedit_home(create: bool = True) -> Path:
    """``$FACTEDIT_HOME`` or ``~/.cache/factedit`` (created on demand unless ``create`` is false)."""
    env = os.environ.get("FACTEDIT_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "factedit"
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return home


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _tmp_prefix(target: Path) -> str:
    """The name a temporary of ``target`` starts with: it says which host and process write it."""
    return f".{target.name}.tmp-{_host_tag()}-{os.getpid()}-"


def _pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (when unsure: yes). A zombie counts as running."""
    if pid == os.getpid():
        return True
    if os.name == "nt" or pid <= 0:  # Windows' os.kill(pid, 0) would terminate the process: assume running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
    return newest


def remove_stale_temporaries(target: os.PathLike | str) -> List[str]:
    """Remove the temporaries that killed atomic writes to ``target`` left beside it; returns their names.

    A temporary is stale when its writer is gone: written on this host by a process that no longer runs,
    or on another host and unchanged for :data:`STALE_AFTER_S` (see the module docstring). Says what it
    removed in one log line; never fails (a write goes on whatever happens here)."""
    target = Path(target)
    parent = target.parent
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-([0-9a-f]{{6}})-(\d+)-[a-z0-9_]{{8}}(?:\.old|.*\.tmp)?$")
    legacy = re.compile(rf"^\.{re.escape(target.name)}\.(?:[a-z0-9_]{{8}}(?:.*\.tmp)?|old)$")
    removed: List[str] = []
    unknown: List[str] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(f".{target.name}.")]
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        path = Path(entry.path)
        m = pattern.match(entry.name)
        try:
            if m is None:
                if legacy.match(entry.name) and (entry.is_dir(follow_symlinks=False) or entry.name.endswith(".tmp")):
                    unknown.append(entry.name)
                continue
            if m.group(1) == host:
                if _pid_running(int(m.group(2))):
                    continue
            elif now - _newest_mtime(path) < STALE_AFTER_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if not path.exists():
                removed.append(entry.name)
        except OSError:
            continue
    if removed:
        log.warning("removed %d stale temporary item(s) that interrupted writes to %s left in %s: %s",
                    len(removed), target.name, parent, ", ".join(sorted(removed)))
    if unknown:
        log.warning("%s holds %s, which look(s) like the leftovers of writes to %s interrupted under an earlier "
                    "factedit version; they are not removed automatically (no record of their writer): delete "
                    "them if no other factedit process is writing %s", parent, ", ".join(sorted(unknown)),
                    target.name, target.name)
    return removed


@contextlib.contextmanager
def atomic_path(target: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    Readers never see a half-written file: either the old content or the new.
    On failure the temporary file is removed and ``target`` is untouched; temporaries that killed
    writes to ``target`` left are removed first (:func:`remove_stale_temporaries`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=suffix + ".tmp", dir=target.parent)
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
    some writers 0600 files). Temporary folders that killed writes to ``target`` left are removed first
    (:func:`remove_stale_temporaries`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp, directory=True)
        for p in tmp.rglob("*"):
            apply_umask(p, directory=p.is_dir())
        if target.exists():
            old = tmp.with_name(tmp.name + ".old")  # this write's own name: stale ones never block it
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
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
