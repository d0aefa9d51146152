"""Calibrate the collapse guard's wear warnings from the 1,000-edit runs (issue 32) and write the limits the
package ships (``src/factedit/edit/wear_limits.json``); the method is :mod:`factedit.evaluation.wear_limits`.

Runs recorded before the wear meter need their wear replayed first (``bench/replay_wear.py RUN``).

    python bench/calibrate_wear.py            # results/long/* -> src/factedit/edit/wear_limits.json, prints the table
    python bench/calibrate_wear.py --table    # the markdown table only (docs/RESULTS.md "Wear limits")
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from factedit.core.paths import atomic_write_text
    from factedit.edit.wear import LIMITS_FILE
    from factedit.evaluation.wear_limits import calibrate, limits_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories (default: results/long/*)")
    p.add_argument("--out", type=Path, default=LIMITS_FILE)
    p.add_argument("--table", action="store_true", help="print the markdown table only; write nothing")
    args = p.parse_args(argv)
    dirs = args.runs or sorted(d for d in (ROOT / "results" / "long").iterdir() if (d / "config.json").exists())
    cal = calibrate(dirs)
    if not args.table:
        atomic_write_text(args.out, json.dumps(cal, indent=1) + "\n")
    print(limits_table(cal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
