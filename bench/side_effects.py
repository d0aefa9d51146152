"""How often does the blast-radius report flag an edit, and do its flags agree with the record's own
neighbourhood prompt? (issues 16, 34)

For N CounterFact records (default the first 50) of the embedded SmolLM2-135M-Instruct: edit with the
defaults of `factedit edit` (r-ROME, guard and verification on) from the original weights, with the
side-effect probes built from the known facts (`--bank`), and read the greedy answer (first sentence)
of the record's neighbourhood prompt before and after. Reported: per kind of probe (ripple: the edited subject
in other relations; collateral: other subjects in the edited relation) the share of edits with a changed
answer and with one naming the new target; the flag rule (collateral changed ≥ c or leaked ≥ l) calibrated on
these edits against the neighbourhood prompt (the rule with the highest balanced accuracy, the fewer flags on
a tie), how often it flags an edit and how well "flagged" agrees with "the neighbourhood answer changed".

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
    ap.add_argument("--from-rows", default=None,
                    help="publish from rows an earlier run wrote (--rows) instead of measuring; --seconds: its time")
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    if args.from_rows:
        from factedit.app.side_effects import load_bank

        rows = [json.loads(l) for l in Path(args.from_rows).read_text(encoding="utf-8").splitlines() if l.strip()]
        return report(rows, args.seconds, load_bank(args.bank), args)

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
        probes = fx["probes"]
        rows.append({"case_id": rec["case_id"], "verified": rep.verified, "probed": fx["probed"],
                     "changed": fx["changed"], "flagged": fx["flagged"],
                     "collateral_changed": fx["collateral"]["changed"], "collateral_leaked": fx["collateral"]["leaked"],
                     "ripple_changed": fx["ripple"]["changed"], "ripple_carried": fx["ripple"]["carried"],
                     "collateral_probed": fx["collateral"]["probed"], "ripple_probed": fx["ripple"]["probed"],
                     "ripple_named_before": sum(mentions(p["before"], [r.target_new]) for p in probes
                                                if p["role"] == "ripple"),
                     "hood_before": before, "hood_after": after,
                     "hood_changed": normalize_answer(before) != normalize_answer(after),
                     "hood_leaked": mentions(after, [r.target_new]) and not mentions(before, [r.target_new])})
        print(json.dumps(rows[-1]), flush=True)
    seconds = time.perf_counter() - t0
    write_rows(args.rows, rows)
    report(rows, seconds, bank, args)


def report(rows, seconds, bank, args) -> None:
    """Publish the section of docs/RESULTS.md (or print it) from the per-edit rows."""
    ok = [x for x in rows if "refused" not in x]
    n = len(ok)

    def pct(k, of=None):
        of = ok if of is None else of
        return f"{100 * sum(1 for x in of if k(x)) / len(of):.1f}" if of else "–"

    from factedit.app.side_effects import COLLATERAL_FLAG

    rule, table = calibrate(ok)
    shipped = (COLLATERAL_FLAG["changed"], COLLATERAL_FLAG["leaked"])
    flag = [x for x in ok if flags(x, rule)]
    hood = [x for x in ok if x["hood_changed"]]
    agree = sum(1 for x in ok if flags(x, rule) == x["hood_changed"])
    probed = sum(x["probed"] for x in ok)
    lines = [HEADING, "",
             f"Command: `python bench/side_effects.py --corpus {args.corpus}"
             + (f" --bank {args.bank}" if args.bank else "") + f" --limit {args.limit}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}; {cpu_name()}; torch {torch.__version__}; "
             + ("" if seconds is None else f"{seconds:.0f} s ") +
             f"({len(rows) - n} edits refused by the guard, left out).", "",
             f"The first {len(rows)} records of `{CF.name}`, embedded SmolLM2-135M-Instruct, `factedit edit`'s "
             f"defaults (r-ROME, guard and verification on), each edit from the original weights; probes from "
             f"{bank.source} ({probed / max(n, 1):.1f} per edit: the request's template with the 6 known subjects "
             "nearest in key space (collateral), the subject in 6 other templates (ripple)), greedy answers to the "
             "first sentence.", "",
             "| measure | ripple (edited subject, other relations) | collateral (other subjects, same relation) |",
             "|---|---|---|",
             f"| edits with ≥ 1 changed answer | {pct(lambda x: x['ripple_changed'])} % | "
             f"{pct(lambda x: x['collateral_changed'])} % |",
             f"| edits with ≥ 1 answer now naming the new target | {pct(lambda x: x['ripple_carried'])} % (carried) | "
             f"{pct(lambda x: x['collateral_leaked'])} % (leaked) |",
             f"| changed answers per edit (mean) | {mean(ok, 'ripple_changed'):.2f} of {mean(ok, 'ripple_probed'):.1f}"
             f" | {mean(ok, 'collateral_changed'):.2f} of {mean(ok, 'collateral_probed'):.1f} |",
             f"| answers naming the new target per edit (mean) | {mean(ok, 'ripple_carried'):.2f} | "
             f"{mean(ok, 'collateral_leaked'):.2f} |", "",
             f"Flag rule chosen: collateral changed ≥ {rule[0]} or collateral leaked ≥ {rule[1]}: among the rules "
             f"within {TOLERANCE:g} point of the best balanced accuracy against the neighbourhood answer, the one "
             "that flags the fewest edits (the rule shipped in `app/side_effects.py` `COLLATERAL_FLAG` "
             f"{'matches it' if shipped == rule else 'DIFFERS: ' + str(shipped)}).", "",
             "| measure | value |", "|---|---|",
             f"| edits flagged | {pct(lambda x: flags(x, rule))} % |",
             f"| record's neighbourhood answer changed | {pct(lambda x: x['hood_changed'])} % |",
             f"| ... of those, flagged | {pct(lambda x: flags(x, rule), hood)} % |",
             f"| flagged edits whose neighbourhood answer changed | {pct(lambda x: x['hood_changed'], flag)} % |",
             f"| agreement (flagged ⇔ neighbourhood changed) | {100 * agree / max(n, 1):.1f} % |",
             f"| neighbourhood answer now names the new target | {pct(lambda x: x['hood_leaked'])} % |", "",
             "Every rule tried (flag rate, agreement, balanced accuracy against the neighbourhood answer):", "",
             "| collateral changed ≥ | or leaked ≥ | flagged | agreement | balanced accuracy |",
             "|---|---|---|---|---|",
             *[f"| {c} | {l} | {f:.1f} % | {a:.1f} % | {b:.1f} % |" for (c, l), f, a, b in table], ""]
    publish(lines, args.out, HEADING, trailing_newline=True)


def flags(x: dict, rule) -> bool:
    return x["collateral_changed"] >= rule[0] or x["collateral_leaked"] >= rule[1]


def mean(rows, key) -> float:
    return sum(x[key] for x in rows) / max(len(rows), 1)


#: rules whose balanced accuracy is within this many points of the best count as equally good (50 edits: one
#: edit moves a rate by 2 points)
TOLERANCE = 1.0


def calibrate(rows):
    """The flag rule (changed ≥ c or leaked ≥ l; 7 = never, with 6 collateral probes) against "the record's
    neighbourhood answer changed": among the rules within :data:`TOLERANCE` points of the highest balanced
    accuracy, the one that flags the fewest edits (then the lower leak count: a leak is damage by itself); and
    every rule's (rule, flag %, agreement %, balanced accuracy %)."""
    pos = [x for x in rows if x["hood_changed"]]
    neg = [x for x in rows if not x["hood_changed"]]
    table = []
    for c in range(1, 8):
        for l in range(1, 8):
            hit = sum(flags(x, (c, l)) for x in pos) / max(len(pos), 1)
            rej = sum(not flags(x, (c, l)) for x in neg) / max(len(neg), 1)
            f = 100 * sum(flags(x, (c, l)) for x in rows) / max(len(rows), 1)
            a = 100 * sum(flags(x, (c, l)) == x["hood_changed"] for x in rows) / max(len(rows), 1)
            table.append(((c, l), f, a, 50 * (hit + rej)))
    top = max(t[3] for t in table)
    best = min((t for t in table if t[3] >= top - TOLERANCE), key=lambda t: (t[1], t[0][1]))
    return best[0], [t for t in table if t[0][1] in (1, 2, 7) or t[0] == best[0]]


if __name__ == "__main__":
    main()
