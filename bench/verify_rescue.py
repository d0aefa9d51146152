"""How many edits the verification's retry rescues, and what it costs (issue 18).

Reads a finished single-edit `factedit eval` run (raw method: each case records whether its edit took on
its own prompt, from the scores on its own edited model), re-edits the cases that did not take through
`Editor.edit(verify=True)` (the edit is identical until the check fails; then one retry with twice the
steps and half of the rewrite loss on the bare prompt), and reports how many now take and the time.

    python bench/verify_rescue.py runs/verify-raw --corpus ../shared/data/corpus/wikitext2_valid.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished single-edit eval run directory (r-rome)")
    ap.add_argument("--corpus", required=True)
    args = ap.parse_args()

    from factedit import Editor, GuardConfig, Request, load_model

    run = Path(args.run)
    recs = [json.loads(l) for l in (run / "cases.jsonl").read_text().splitlines()]
    cfg = json.loads((run / "config.json").read_text())["compare"]
    failed = [r for r in recs if r.get("verified") is False]
    model, tok = load_model()
    ed = Editor(model, tok, progress=False)
    mcfg = ed.make_config(cfg["method"], stats_corpus=args.corpus)
    off = GuardConfig(enabled=False)
    rows = []
    for r in failed:
        req = Request(**r["request"])
        t = time.perf_counter()
        res = ed.edit(req, config=mcfg, guard=off, verify=True)
        rows.append({"case_id": r["case_id"], "verified": bool(res.verified), "retried": res.retried,
                     "seconds": time.perf_counter() - t, "p_new": res.verification[0]["p_new"],
                     "p_true": res.verification[0]["p_true"]})
        ed.revert()
        print(json.dumps(rows[-1]), flush=True)
    ok_edit = [r["edit_seconds"] for r in recs if "error" not in r]
    n_rescued = sum(r["verified"] for r in rows)
    print(json.dumps({"cases": len(recs), "raw_verified": sum(r.get("verified") is True for r in recs),
                      "raw_not_verified": len(failed), "rescued": n_rescued,
                      "median_seconds_raw_edit": statistics.median(ok_edit) if ok_edit else None,
                      "median_seconds_with_retry": statistics.median(r["seconds"] for r in rows) if rows else None,
                      "es_raw": 100 * sum(r.get("ES", 0) or 0 for r in recs) / len(recs)}))


if __name__ == "__main__":
    main()
