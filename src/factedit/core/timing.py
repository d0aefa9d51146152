"""Where a command's time goes: named, nested phases, recorded only while a profile is active
(``factedit edit --profile``, bench/profile_edit.py); otherwise :func:`phase` costs a context-variable read.

    with profiling() as prof:
        with phase("load model"):
            ...
    print(prof.table())
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

__all__ = ["Profile", "phase", "record", "profiling", "peak_rss_mb", "reset_peak_rss", "PeakWindow",
           "seconds_since_process_start"]

_current: contextvars.ContextVar = contextvars.ContextVar("factedit_profile", default=None)


def peak_rss_mb() -> Optional[float]:
    """The process's peak resident memory so far, in MiB (None where the platform does not say): Linux's
    VmHWM (the ``getrusage`` figure would include what a parent held before it started this process)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_mb` afresh from the current resident memory (Linux ≥ 4.0: ``/proc/self/clear_refs``),
    so that the peak of one stretch of a long process can be read; False where the platform cannot. The open
    :class:`PeakWindow` stretches keep the peak it clears."""
    before = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    for w in _windows:
        w._seen = max(w._seen, before or 0.0)
    return True


_windows: List["PeakWindow"] = []


class PeakWindow:
    """The peak resident memory (MiB) of the stretch of the process inside ``with PeakWindow() as w:`` — ``w.peak``
    after it, None where the platform cannot reset the peak. Windows nest: an inner one (an edit inside a run)
    resets the process's peak, and the outer ones keep what it cleared."""

    def __enter__(self) -> "PeakWindow":
        self._seen, self.peak = 0.0, None
        self._ok = reset_peak_rss()
        _windows.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _windows.remove(self)
        now = peak_rss_mb()
        if self._ok and now is not None:  # (an outer window reads this one's peak later: nothing resets it here)
            self.peak = max(self._seen, now)
        return False


@dataclass
class Profile:
    """Phases in the order they began: ``[depth, name, seconds, peak RSS in MiB at its end]``."""

    rows: List[list] = field(default_factory=list)
    depth: int = 0

    def add(self, name: str, seconds: float, depth: Optional[int] = None) -> None:
        """A phase measured elsewhere (e.g. before the profile began)."""
        self.rows.append([self.depth if depth is None else depth, name, float(seconds), peak_rss_mb()])

    def to_dict(self) -> List[dict]:
        return [{"phase": n, "depth": d, "seconds": round(s, 4), "peak_rss_mb": None if m is None else round(m)}
                for d, n, s, m in self.rows]

    def render(self, as_json: bool = False) -> str:
        """What ``--profile`` prints: one JSON line ``{"profile": [...]}`` (``as_json``, beside ``--json``
        output), else :meth:`table`."""
        return json.dumps({"profile": self.to_dict()}) if as_json else self.table()

    def table(self) -> str:
        """The phases as an indented table, each with its share of the top-level phases' sum."""
        total = sum(r[2] for r in self.rows if r[0] == 0)
        width = max([len("  " * r[0] + r[1]) for r in self.rows] + [5])
        lines = [f"{'phase':<{width}}  seconds   share  peak RSS"]
        for d, n, s, m in self.rows:
            share = f"{100 * s / total:5.1f}%" if total else "      "
            lines.append(f"{'  ' * d + n:<{width}}  {s:7.3f}  {share}  " + ("" if m is None else f"{m:5.0f} MiB"))
        lines.append(f"{'total':<{width}}  {total:7.3f}")
        return "\n".join(lines)


@contextlib.contextmanager
def profiling() -> Iterator[Profile]:
    """Record the :func:`phase` calls made inside (this thread or task) into a new :class:`Profile`."""
    prof = Profile()
    token = _current.set(prof)
    try:
        yield prof
    finally:
        _current.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` of the active profile (nested phases indent); a no-op without one."""
    prof = _current.get()
    if prof is None:
        yield
        return
    row = [prof.depth, name, 0.0, None]
    prof.rows.append(row)
    prof.depth += 1
    t = time.perf_counter()
    try:
        yield
    finally:
        row[2], row[3] = time.perf_counter() - t, peak_rss_mb()
        prof.depth -= 1


def record(name: str, seconds: float, deeper: int = 0) -> None:
    """A phase timed by the caller (e.g. a method's own ``timings``), ``deeper`` levels below the current one;
    a no-op without an active profile."""
    prof = _current.get()
    if prof is not None:
        prof.add(name, seconds, prof.depth + deeper)


def seconds_since_process_start() -> Optional[float]:
    """Wall seconds since this process started (Linux ``/proc``; None elsewhere): the interpreter's start-up
    and imports, when asked first thing in ``main``."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None
