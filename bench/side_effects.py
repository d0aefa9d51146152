"""How often does the blast-radius report flag a change, and do its flags agree with the record's own
neighbourhood prompt? (issue 16)

For N CounterFact records (default the first 50) of the embedded SmolLM2-135M-Instruct: edit with the
defaults of `factedit edit` (r-ROME, guard and verification on) from the original weights, with the
side-effect probes built from the known facts (`--bank`), and read the greedy answer (first sentence)
of the record's neighbourhood prompt before and after. Reported: the share of edits whose report
flags at least one changed answer (and one that names the new target), and the agreement between
"the report flags a change" and "the neighbourhood prompt's answer changed".

    python bench/side_effects.py --corpus ../shared/data/corpus/wikitext2_valid.txt \\
        --bank ../shared/data/knowns/known_1000.json --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, cpu_name, publish, write_rows  # noqa: E402

HEADING = "## Side effects: what the blast-radius report flags"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--bank", default=None, help="known facts for the probes (default: the built-in lists)")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default=None)
    args = ap.parse_args()

    from factedit import Editor, Request, load_model
    from factedit.app.edit import edit_fact
    from factedit.app.settings import EditSettings
    from factedit.app.side_effects import load_bank
    from factedit.core.answers import greedy_answers, mentions, normalize_answer
    from factedit.edit.guard import CollapseError

    model, tok = load_model()
    ed = Editor(model, tok, progress=False)
    bank = load_bank(args.bank)
    cfg = ed.make_config("r-rome", stats_corpus=args.corpus)
    recs = [json.loads(l) for l in CF.read_text(encoding="utf-8").splitlines()[: args.limit]]
    rows, t0 = [], time.perf_counter()
    for rec in recs:
        r = Request.from_filled(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
        hood = rec["locality_prompt"]
        before = greedy_answers(ed.adapter, [hood])[0]
        try:
            es = EditSettings(prompt=r.prompt, subject=r.subject, target=r.target_new, true=r.target_true)
            result, rep = edit_fact(ed, None, es, config=cfg, bank=bank)
        except CollapseError as e:  # refused by the guard: nothing applied, nothing to probe
            rows.append({"case_id": rec["case_id"], "refused": str(e)})
            continue
        try:
            after = greedy_answers(ed.adapter, [hood])[0]
        finally:
            ed.revert()
        fx = rep.side_effects
        rows.append({"case_id": rec["case_id"], "verified": rep.verified, "probed": fx["probed"],
                     "changed": fx["changed"], "leaked": fx["leaked_target"],
                     "changed_same_relation": sum(p["changed"] for p in fx["probes"] if p["kind"] == "same relation"),
                     "changed_same_subject": sum(p["changed"] for p in fx["probes"] if p["kind"] == "same subject"),
                     "hood_before": before, "hood_after": after,
                     "hood_changed": normalize_answer(before) != normalize_answer(after),
                     "hood_leaked": mentions(after, [r.target_new]) and not mentions(before, [r.target_new])})
        print(json.dumps(rows[-1]), flush=True)
    seconds = time.perf_counter() - t0
    write_rows(args.rows, rows)
    ok = [x for x in rows if "refused" not in x]
    n = len(ok)

    def pct(k, of=None):
        of = ok if of is None else of
        return f"{100 * sum(1 for x in of if k(x)) / len(of):.1f}" if of else "–"

    flagged = [x for x in ok if x["changed"]]
    hood = [x for x in ok if x["hood_changed"]]
    agree = sum(1 for x in ok if bool(x["changed"]) == x["hood_changed"])
    probed = sum(x["probed"] for x in ok)
    lines = [HEADING, "",
             f"Command: `python bench/side_effects.py --corpus {args.corpus}"
             + (f" --bank {args.bank}" if args.bank else "") + f" --limit {args.limit}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}; {cpu_name()}; torch {torch.__version__}; {seconds:.0f} s "
             f"({len(rows) - n} edits refused by the guard, left out).", "",
             f"The first {len(rows)} records of `{CF.name}`, embedded SmolLM2-135M-Instruct, `factedit edit`'s "
             f"defaults (r-ROME, guard and verification on), each edit from the original weights; probes from "
             f"{bank.source} ({probed / max(n, 1):.1f} per edit: the request's template with the 6 known subjects "
             "nearest in key space, the subject in 6 other templates), greedy answers to the first sentence.", "",
             "| measure | value |", "|---|---|",
             f"| edits whose report flags ≥ 1 changed answer | {pct(lambda x: x['changed'])} % |",
             f"| ... a changed answer with the same relation (other subject) | "
             f"{pct(lambda x: x['changed_same_relation'])} % |",
             f"| ... a changed answer with the same subject (other relation) | "
             f"{pct(lambda x: x['changed_same_subject'])} % |",
             f"| edits whose report flags ≥ 1 answer now naming the new target | {pct(lambda x: x['leaked'])} % |",
             f"| changed answers among all probes | {100 * sum(x['changed'] for x in ok) / max(probed, 1):.1f} % |",
             f"| record's neighbourhood answer changed | {pct(lambda x: x['hood_changed'])} % |",
             f"| ... of those, flagged by the report | {pct(lambda x: x['changed'], hood)} % |",
             f"| flagged edits whose neighbourhood answer changed | {pct(lambda x: x['hood_changed'], flagged)} % |",
             f"| agreement (flag ⇔ neighbourhood changed) | {100 * agree / max(n, 1):.1f} % |",
             f"| neighbourhood answer now names the new target | {pct(lambda x: x['hood_leaked'])} % |", ""]
    publish(lines, args.out, HEADING, trailing_newline=True)


if __name__ == "__main__":
    main()
