"""How well does ``factedit audit`` find and explain edits on the embedded model? (issue 33)

For each method, edits of CounterFact records (single requests; ``memit`` in batches of ``--batch``) are made on
the embedded model in memory, audited against the base's safetensors folder (``LoadedTensors``: the model is
not saved), explained on the base weights (the edit is reverted first; the found update is applied for the
suspect's answers), and scored:

* **layers**: the edits found are exactly the layers the method wrote, one edit per call;
* **new object first**: the top-ranked new object names the request's ``target_new`` (``mentions``);
* **subject top-10**: the request's subject is among the 10 best of the candidate pool (the subjects of the
  first ``--pool`` CounterFact records, each with its own prompt; the edited records are in it).

Negatives: the unedited model re-saved in bfloat16 and float16 (``LoadedTensors`` of a converted copy) must be
"not edited". Writes the "Audit" section of docs/BENCHMARKS.md with ``--out``.

    FACTEDIT_HOME=runs/home python bench/audit_eval.py --records 10 --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, cpu_name, publish, write_rows  # noqa: E402

METHODS = ("r-rome", "rome", "memit", "emmet", "alphaedit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--records", type=int, default=20, help="records per method (edits, or requests of batches)")
    ap.add_argument("--batch", type=int, default=10, help="requests per memit edit")
    ap.add_argument("--pool", type=int, default=1000, help="candidate subjects (the first records of CounterFact)")
    ap.add_argument("--rows", default=None, help="per-edit rows as JSON lines")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import copy

    import torch

    from factedit import Editor, GuardConfig, load_model
    from factedit.audit import LoadedTensors, TensorFiles, audit_files
    from factedit.audit.anomaly import spectral_scores
    from factedit.audit.explain import explain_report, load_candidates
    from factedit.core.answers import mentions
    from factedit.core.models import embedded_model_dir
    from factedit.evaluation import load_cases

    base_files = TensorFiles(embedded_model_dir(), "the embedded model")
    model, tok = load_model()
    ed = Editor(model, tok, progress=False)
    pool = load_candidates(CF)[: args.pool]
    names = {c.subject for c in pool}
    stats = {"corpus": str(CORPUS), "n_tokens": None}
    rows, off = [], GuardConfig(enabled=False)
    for method in args.methods.split(","):
        size = args.batch if method == "memit" else 1
        cases = [c for c in load_cases(CF, limit=args.pool) if c.request.subject in names][: args.records]
        for i in range(0, len(cases), size):
            group = cases[i:i + size]
            reqs = [c.request for c in group]
            res = ed.edit(reqs, method=method, guard=off, verify=False, stats_corpus=str(CORPUS))
            t0 = time.perf_counter()
            report = audit_files(base_files, LoadedTensors(model, "edited"))
            t_compare = time.perf_counter() - t0
            z = {s.layer: s.z for s in spectral_scores(LoadedTensors(model, "edited"))}
            ed.revert()
            t1 = time.perf_counter()
            explain_report(report, model, tok, pool, stats)
            t_explain = time.perf_counter() - t1
            found = [e.layers for e in report.edits]
            row = {"method": method, "n": len(reqs), "layers": sorted(res.layers), "found": found,
                   "verdict": report.verdict, "compare_s": round(t_compare, 2), "explain_s": round(t_explain, 2),
                   "z_edited": [z[l] for l in sorted(res.layers)],
                   "z_other": [v for l, v in z.items() if l not in res.layers]}
            if len(report.edits) == 1:
                x = report.edits[0].explanation
                top = [s["text"] for s in x.subjects]
                row["subject_rank"] = [top.index(r.subject) + 1 if r.subject in top else None for r in reqs]
                row["new_rank"] = [next((j + 1 for j, o in enumerate(x.new_objects)
                                         if mentions(o["text"], [r.target_new])), None) for r in reqs]
                row["new_objects"] = [o["text"] for o in x.new_objects[:3]]
                row["hypothesis"] = x.hypothesis
            rows.append(row)
            print(json.dumps(row), flush=True)
    clean_z = [s.z for s in spectral_scores(LoadedTensors(model, "unedited"))]
    neg = {}
    for dtype in (torch.bfloat16, torch.float16):
        copy_ = copy.deepcopy(model).to(dtype)
        neg[str(dtype).split(".")[-1]] = audit_files(base_files, LoadedTensors(copy_, str(dtype))).verdict
        del copy_
    write_rows(args.rows, rows)

    lines = ["## Audit: finding and explaining edits (issue 33)", "",
             f"`python bench/audit_eval.py --records {args.records} --pool {args.pool}` ({datetime.date.today()}, "
             f"{cpu_name()}, torch {torch.__version__}): edits of the first CounterFact records whose subject is in a "
             f"pool of {len(pool)} candidate subjects (the first {args.pool} records' subjects, each with its prompt), "
             "audited against the embedded model's safetensors folder and explained on its weights.", "",
             "| method | edits (requests) | layers found exactly | new object named (first; batches: among them) | "
             "subject in top 10 | "
             "subject first | compare s | explain s |", "|---|---|---|---|---|---|---|---|"]
    for method in args.methods.split(","):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        n_req = sum(r["n"] for r in mine)
        exact = sum(r["found"] == [r["layers"]] for r in mine)
        ranks = [k for r in mine for k in r.get("subject_rank", [None] * r["n"])]
        new = sum(k == 1 if r["n"] == 1 else k is not None for r in mine for k in r.get("new_rank", [None] * r["n"]))
        top10 = sum(k is not None and k <= 10 for k in ranks)
        first = sum(k == 1 for k in ranks)
        lines.append(f"| {method} | {len(mine)} ({n_req}) | {exact} of {len(mine)} | {new} of {n_req} | "
                     f"{top10} of {n_req} | {first} of {n_req} | "
                     f"{statistics.median(r['compare_s'] for r in mine):.1f} | "
                     f"{statistics.median(r['explain_s'] for r in mine):.1f} |")
    lines += ["", "Negatives (the unedited model converted in memory): "
              + ", ".join(f"{k}: {v}" for k, v in neg.items()) + ".", ""]
    pos = [v for r in rows for v in r["z_edited"]]
    negs = clean_z + [v for r in rows for v in r["z_other"]]
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in negs) / max(1, len(pos) * len(negs))
    from factedit.audit.anomaly import DEFAULT_THRESHOLD as T

    lines += [f"**Without a base** (`anomaly.py`, W_out spectra only): over the {len(pos)} edited matrices and "
              f"{len(negs)} unedited ones (the {len(clean_z)} layers of the unedited model and the other layers of "
              f"each edited one), ROC AUC {auc:.3f}; at z > {T:g}, {sum(v > T for v in pos)} of {len(pos)} edited "
              f"matrices flagged, {sum(v > T for v in negs)} of {len(negs)} unedited ones.", ""]
    publish(lines, args.out, "## Audit: finding and explaining edits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
