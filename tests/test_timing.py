"""--profile: named, nested phases recorded only while a profile is active, and the edit command's table."""

from __future__ import annotations

import json
import time

import pytest

from factedit.cli import main
from factedit.core.timing import phase, profiling, record


def test_phases_nest_and_cost_nothing_without_a_profile():
    with phase("outside"):  # no profile: nothing recorded, nothing raised
        record("ignored", 1.0)
    with profiling() as prof:
        with phase("outer"):
            time.sleep(0.01)
            with phase("inner"):
                time.sleep(0.02)
            record("measured elsewhere", 0.5)  # inside "outer": one level down
        with phase("second"):
            pass
        record("after second, as its part", 0.25, deeper=1)
    rows = prof.to_dict()
    assert [(r["phase"], r["depth"]) for r in rows] == [("outer", 0), ("inner", 1), ("measured elsewhere", 1),
                                                         ("second", 0), ("after second, as its part", 1)]
    assert rows[0]["seconds"] >= rows[1]["seconds"] >= 0.02 and rows[2]["seconds"] == 0.5
    table = prof.table()
    assert "  inner" in table and table.splitlines()[-1].startswith("total")


def test_edit_profile_names_the_phases_on_stderr(tiny_dir, tiny_corpus, home, capsys):
    code = main(["edit", "--model", str(tiny_dir), "--prompt", "{} is located in the city of", "--subject",
                 "Eiffel Tower", "--target", "Rome", "--layer", "1", "--stats-corpus", str(tiny_corpus),
                 "--stats-tokens", "600", "--steps", "3", "--json", "--profile", "--allow-unverified"])
    out, err = capsys.readouterr()
    assert code == 0, err
    json.loads(out)  # stdout still holds exactly the report
    profile = json.loads(next(line for line in err.splitlines() if line.startswith('{"profile"')))["profile"]
    names = [r["phase"] for r in profile]
    for want in ("load the model", "read before (continuations, probes, guard probe)", "edit (Editor.edit)",
                 "compute the update", "values", "verify", "save outputs"):
        assert want in names, (want, names)
    assert all(r["seconds"] >= 0 for r in profile)


def test_the_peak_of_a_stretch_is_read_after_a_reset():
    """A 200 MiB block held and freed before the reset is in the process's peak, not in the stretch's after it."""
    import subprocess
    import sys

    code = ("from factedit.core.timing import peak_rss_mb, reset_peak_rss\n"
            "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); del x\n"
            "before = peak_rss_mb(); ok = reset_peak_rss(); after = peak_rss_mb()\n"
            "y = bytearray(50 * 2**20); y[::4096] = b'1' * len(y[::4096]); del y\n"
            "print(before, ok, after, peak_rss_mb())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, ok, after, later = out.stdout.split()
    if ok != "True":
        pytest.skip("this kernel cannot reset the peak (/proc/self/clear_refs)")
    before, after, later = float(before), float(after), float(later)
    assert before - after > 150  # the freed block left the peak
    assert 40 < later - after < 70  # the stretch's own 50 MiB block is its peak


def test_peak_windows_nest():
    """A window inside another (an edit inside a run) reads its own peak; the outer one still reads the blocks
    held before the inner one reset the process's peak, and those held inside it."""
    import subprocess
    import sys

    code = ("from factedit.core.timing import PeakWindow\n"
            "def hold(mib):\n"
            "    x = bytearray(mib * 2**20); x[::4096] = b'1' * len(x[::4096])\n"
            "with PeakWindow() as outer:\n"
            "    hold(200)\n"
            "    with PeakWindow() as inner:\n"
            "        hold(50)\n"
            "    with PeakWindow() as after:\n"
            "        pass\n"
            "print(outer.peak, inner.peak, after.peak)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    outer, inner, after = out.stdout.split()
    if inner == "None":
        pytest.skip("this kernel cannot reset the peak (/proc/self/clear_refs)")
    outer, inner, after = float(outer), float(inner), float(after)
    assert 40 < inner - after < 70  # the inner window's 50 MiB block, not the 200 before it
    assert outer - after > 150  # the outer one kept the 200 MiB block the inner reset cleared
