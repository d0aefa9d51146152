"""Progress of long steps for whoever is listening (the web page's progress bars), without threading a
callback through every call: ``with reporting(cb): editor.edit(...)`` makes the steps inside call
``cb(stage, done, total)``. Nothing listens by default (the command line shows tqdm bars instead).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

__all__ = ["reporting", "report"]

Callback = Callable[[str, int, int], None]
_LISTENER: contextvars.ContextVar[Optional[Callback]] = contextvars.ContextVar("factedit_progress", default=None)


@contextlib.contextmanager
def reporting(callback: Optional[Callback]):
    """Within the block (and this thread), :func:`report` calls ``callback``."""
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def report(stage: str, done: int, total: int) -> None:
    cb = _LISTENER.get()
    if cb is not None:
        cb(stage, done, total)
