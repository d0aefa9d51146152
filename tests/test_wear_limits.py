"""The collapse guard's wear warnings (issue 32): the calibration from sequential runs, against figures read off
the records by hand here, and the warnings themselves, on hand-built meters and on a real edit of a tiny model
under a limits file the user calibrated (``$FACTEDIT_HOME/wear_limits.json``)."""

import json

import pytest

from factedit import Editor, Request
from factedit.cli import main
from factedit.edit.guard import GuardConfig
from factedit.edit.wear import limit_for, wear_limits, wear_warnings
from factedit.evaluation.wear_limits import calibrate, limits_table
from tiny import tiny_model

ENTRY = {"method": "alphaedit", "settings": {"alpha": None}, "run": "alphaedit", "model": "m", "relative": 0.2,
         "healthy_edits": 300, "onset": 400, "degraded": "known recall 45.0% of the unedited model's",
         "ratio": 1.5, "collapse": "perplexity 2.06× the unedited model's at 500 edits",
         "help": "What helped in our runs: --set alpha=10 stayed healthy to 700 edits."}
LIMITS = {"limits": [ENTRY, {**ENTRY, "settings": {"alpha": 10}, "relative": 0.5, "ratio": None, "help": ""}]}


def _meter(relative, ratio=None):
    return {"4": {"relative": relative[0], "ratio": ratio}, "8": {"relative": relative[1], "ratio": None}}


class Cfg:
    def __init__(self, alpha):
        self.alpha = alpha


def test_warnings_compare_the_largest_layer_with_the_entry_of_the_method_and_its_settings():
    assert limit_for("alphaedit", Cfg(None), LIMITS) is ENTRY
    assert limit_for("alphaedit", Cfg(10.0), LIMITS)["relative"] == 0.5  # 10.0 == 10
    assert limit_for("alphaedit", Cfg(3), LIMITS) is None and limit_for("rome", Cfg(None), LIMITS) is None
    assert wear_warnings(_meter((0.1, 0.2)), "alphaedit", Cfg(None), LIMITS) == []  # at the limit: not past it
    (w,) = wear_warnings(_meter((0.1, 0.21)), "alphaedit", Cfg(None), LIMITS)
    assert w.startswith("wear: layer 8 has moved 21.0% of ‖W‖") and "alphaedit run on m was last healthy at 20.0% " \
        "(300 edits) and at 400 edits had known recall 45.0%" in w and w.endswith("--set alpha=10 stayed healthy to " \
                                                                                 "700 edits.")
    two = wear_warnings(_meter((0.3, 0.1), ratio=1.5), "alphaedit", Cfg(None), LIMITS)
    assert len(two) == 2 and two[1].startswith("wear: this edit's update of layer 4 is 1.50× the median")
    assert "collapse (perplexity 2.06×" in two[1]
    assert wear_warnings(_meter((0.3, 0.1), ratio=1.49), "alphaedit", Cfg(None), LIMITS)[1:] == []
    assert wear_warnings(_meter((0.45, 0.1), ratio=9.0), "alphaedit", Cfg(10), LIMITS) == []  # its own limits
    assert wear_warnings({}, "alphaedit", Cfg(None), LIMITS) == []


def _run(directory, method, size, checkpoints, edits, settings=None):
    """A sequential run's records as `factedit eval` writes them: checkpoints (n, ppl, recall, wear) and per edit
    (group) the largest layer's relative wear and ratio."""
    directory.mkdir(parents=True)
    compare = {"method": method, "sequential": True, "cases_per_edit": size, "method_config": settings or {}}
    (directory / "config.json").write_text(json.dumps({"model": "tiny", "compare": compare}))
    (directory / "downstream.jsonl").write_text("".join(
        json.dumps({"n_edits": n, "ability": {"perplexity": p, "known_recall": r},
                    "wear": {"1": w / 2, "2": w} if n else {}}) + "\n" for n, p, r, w in checkpoints))
    rows = []
    for g, (rel, ratio) in enumerate(edits):
        meter = {"1": {"relative": rel / 3, "ratio": None}, "2": {"relative": rel, "ratio": ratio}}
        rows += [{"group": g, "case_id": g * size + i, "n_edits_before": g * size, "wear": meter} for i in range(size)]
    (directory / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_calibration_from_the_runs_records(tmp_path):
    # batches of 2: healthy at 2 and 4 edits, recall below half at 6 (onset), perplexity 2.5x at 8 (collapse)
    a = _run(tmp_path / "a", "alphaedit", 2, [(0, 10, 1.0, 0), (2, 11, 0.9, 0.1), (4, 12, 0.6, 0.2),
                                             (6, 12, 0.45, 0.3), (8, 25, 0.1, 0.5)],
             [(0.1, None), (0.2, 1.2), (0.3, 1.1), (0.5, 1.8)], {"alpha": None, "alpha_scale": 0.02})
    # the same method at alpha=10: never degraded; its wear passes a's limit at its third edit
    b = _run(tmp_path / "b", "alphaedit", 2, [(0, 10, 1.0, 0), (2, 10, 0.95, 0.1), (4, 10.5, 0.9, 0.15),
                                             (6, 11, 0.8, 0.25), (8, 11, 0.8, 0.3)],
             [(0.1, None), (0.15, 1.0), (0.25, 1.9), (0.3, 1.0)], {"alpha": 10})
    cal = calibrate([a, b])
    ra, rb = cal["runs"]["a"], cal["runs"]["b"]
    assert (ra["healthy"], ra["onset"], ra["collapse"]) == (4, 6, 8) and "known recall 45.0%" in ra["degraded"]
    assert (rb["healthy"], rb["onset"], rb["collapse"]) == (8, None, None)
    assert ra["settings"] == {"alpha": None, "norm_anchor": False}  # a run before norm anchoring did not anchor
    (e,) = cal["limits"]  # b never degraded: nothing to calibrate on it
    assert e["run"] == "a" and e["relative"] == 0.2  # the largest layer at the last healthy checkpoint
    # the edit that led into collapse (6 -> 8 edits) had ratio 1.8, above every ratio while healthy (1.2)
    assert e["ratio"] == 1.8 and "2.50×" in e["collapse"]
    fa = e["false_alarms"]  # healthy edits counted in requests: a's first two edits, all four of b's
    assert (fa["runs"]["a"]["warned"], fa["runs"]["a"]["healthy_edits"]) == (0, 4)
    assert (fa["runs"]["b"]["warned"], fa["runs"]["b"]["healthy_edits"], fa["runs"]["b"]["first_warning"]) == (4, 8, 6)
    assert (fa["warned"], fa["healthy_edits"]) == (4, 12) and fa["rate"] == pytest.approx(4 / 12)
    assert e["help"] == "What helped in our runs: --set alpha=10 stayed healthy for all 8 edits in our b run."
    table = limits_table(cal).splitlines()
    # another method that degraded sooner is pointed to the method, with the settings it was measured with
    c = _run(tmp_path / "c", "emmet", 2, [(0, 10, 1.0, 0), (2, 11, 0.9, 0.1), (4, 14, 0.4, 0.2)],
             [(0.1, None), (0.2, 1.0)], {"norm_anchor": False})
    (_, ec) = calibrate([a, b, c])["limits"]
    assert ec["run"] == "c" and ec["help"] == ("What helped in our runs: --method alphaedit --set alpha=10 stayed "
                                               "healthy for all 8 edits.")
    assert table[2].startswith("| a | alphaedit (alpha=None, norm_anchor=False) | 4 | 6 (known recall 45.0%")
    assert table[2].endswith("| 20.0% | 1.80× | 4 of 12 |") and table[3].endswith("| not degraded | – | – | – |")


def test_summarize_writes_limits_the_guard_then_warns_with(home, tiny_corpus, tmp_path, capsys):
    a = _run(tmp_path / "memit-run", "memit", 1, [(0, 10, 1.0, 0), (1, 10, 0.9, 1e-9), (2, 30, 0.2, 0.5)],
             [(1e-9, None), (0.5, 1.0)], {"norm_anchor": False})
    out = home / "wear_limits.json"
    assert main(["summarize", str(a), "--wear-limits", str(out)]) == 0
    assert "| memit-run | memit (norm_anchor=False) | 1 | 2 (" in capsys.readouterr().out
    assert wear_limits()["limits"][0]["relative"] == 1e-9  # the user's calibration replaces the shipped one
    ed = Editor(*tiny_model("llama"), progress=False)
    res = ed.edit([Request("The capital of {} is", "Japan", "Paris", "Tokyo")], method="memit", layers=(2,),
                  steps=3, stats_corpus=str(tiny_corpus), stats_tokens=800)
    (w,) = res.guard["warnings"]  # kept, and warned: any edit moves layer 2 past 1e-9 of its norm
    assert w.startswith("wear: layer 2 has moved") and "memit-run run on tiny" in w and ed.history
    off = ed.edit([Request("{} speaks", "Danielle Darrieux", "Italian")], method="memit", layers=(2,), steps=3,
                  stats_corpus=str(tiny_corpus), stats_tokens=800, guard=GuardConfig(enabled=False))
    assert off.guard is None  # the warnings are the guard's: off, none


def test_summarize_wear_limits_refuses_runs_it_cannot_calibrate_on(home, tmp_path, capsys):
    healthy = _run(tmp_path / "ok", "memit", 1, [(0, 10, 1.0, 0), (1, 10, 1.0, 0.1)], [(0.1, None)])
    out = tmp_path / "limits.json"
    assert main(["summarize", str(healthy), "--wear-limits", str(out)]) == 2
    assert "no run to calibrate from" in capsys.readouterr().err and not out.exists()
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps({"compare": {"method": "rome", "sequential": False}}))
    assert main(["summarize", str(single), "--wear-limits", str(out)]) == 2
    assert "not a sequential run" in capsys.readouterr().err and not out.exists()
