"""Edit locality with key statistics C from model-sampled text vs. a real corpus.

For each statistics source, edits the first N CounterFact (KnowEdit layout) records one at a
time with the default method (r-rome), measuring before/after each edit and reverting it:

* efficacy (ES): P(target_new) > P(ground_truth) on the edit prompt after the edit;
* generalization (PS): the same on the rephrase prompt;
* locality: |ΔP(locality_ground_truth)| on the locality prompt, and whether the greedy
  continuation (3 tokens) of the locality prompt keeps its first token;
* ‖Δ‖ of the update and the edit time.

Uses ``$FACTEDIT_HOME`` from the environment (statistics and sampled corpora are cached there).

    FACTEDIT_HOME=/tmp/fh python bench/stats_source_locality.py --n-records 10 --out-md /tmp/t.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED / "counterfact" / "counterfact_knowedit.jsonl"
SOURCES = ["model", str(SHARED / "corpus" / "wikitext2_valid.txt")]
STATS_TOKENS = 100_000


def read_records(path: Path, n: int, offset: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset or not line.strip():
                continue
            if len(out) >= n:
                break
            rec = json.loads(line)
            for k in ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                      "locality_prompt", "locality_ground_truth"):
                if not isinstance(rec.get(k), str):
                    raise SystemExit(f"record {rec.get('case_id')}: field {k!r} is "
                                     f"{type(rec.get(k)).__name__}, expected str")
            out.append(rec)
    return out


def first_token(adapter, text: str):
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if ids else None


def measure(editor, rec: dict) -> dict:
    from factedit.core.lm import greedy_continuation, target_probabilities

    a = editor.adapter
    p_new, p_true, r_new, r_true, p_loc = target_probabilities(
        a,
        [rec["prompt"], rec["prompt"], rec["rephrase_prompt"], rec["rephrase_prompt"], rec["locality_prompt"]],
        [rec["target_new"], rec["ground_truth"], rec["target_new"], rec["ground_truth"],
         rec["locality_ground_truth"]],
    )
    greedy = greedy_continuation(a, rec["locality_prompt"], max_new_tokens=3)
    return {"p_new": p_new, "p_true": p_true, "r_new": r_new, "r_true": r_true, "p_loc": p_loc,
            "greedy": greedy}


def run_source(editor, source: str, records: list[dict], log) -> dict:
    from factedit import Request

    rows = []
    stats_seconds = 0.0
    layer = None
    for rec in records:
        req = Request.from_filled(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
        before = measure(editor, rec)
        res = editor.edit(req, stats_corpus=source, stats_tokens=STATS_TOKENS)
        try:
            after = measure(editor, rec)
        finally:
            editor.revert()
        layer = res.layers[0]
        t_stats = res.timings.get("stats", 0.0)
        stats_seconds += t_stats
        row = {
            "case_id": rec["case_id"],
            "es": after["p_new"] > after["p_true"],
            "ps": after["r_new"] > after["r_true"],
            "es_before": before["p_new"] > before["p_true"],
            "dp_loc": abs(after["p_loc"] - before["p_loc"]),
            "p_loc_before": before["p_loc"],
            "p_loc_after": after["p_loc"],
            "greedy_before": before["greedy"],
            "greedy_after": after["greedy"],
            "greedy_same": (first_token(editor.adapter, before["greedy"])
                            == first_token(editor.adapter, after["greedy"])),
            "greedy3_same": before["greedy"] == after["greedy"],
            "delta_norm": res.delta_norm,
            "seconds": res.seconds,
            "seconds_excl_stats": res.seconds - t_stats,
        }
        rows.append(row)
        log(f"[{Path(source).name}] case {rec['case_id']}: ES={row['es']} PS={row['ps']} "
            f"|dP_loc|={row['dp_loc']:.4f} greedy {before['greedy']!r}->{after['greedy']!r} "
            f"||D||={row['delta_norm']:.3f} t={row['seconds']:.1f}s (stats {t_stats:.1f}s)")
    st = editor.stats(layer, source, STATS_TOKENS)  # in-memory cached: reports the token count used
    return summarize({"source": source, "layer": layer, "stats_count": st.count,
                      "stats_corpus": st.meta.get("corpus"), "stats_seconds": stats_seconds, "rows": rows})


def summarize(res: dict) -> dict:
    """Add the aggregate columns to one source's result (from its per-record rows)."""
    rows = res["rows"]
    for row in rows:  # results saved before this column existed
        row.setdefault("greedy3_same", row["greedy_before"] == row["greedy_after"])

    def mean(key):
        return statistics.fmean(float(row[key]) for row in rows)

    return {
        **res,
        "n": len(rows),
        "es": mean("es"),
        "ps": mean("ps"),
        "dp_loc": mean("dp_loc"),
        "greedy_same": mean("greedy_same"),
        "greedy3_same": mean("greedy3_same"),
        "delta_norm": mean("delta_norm"),
        "seconds": mean("seconds_excl_stats"),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| stats source | C tokens | ES | PS | mean \\|ΔP_loc\\| | loc. greedy 1st token unchanged "
        "| loc. greedy 3 tokens unchanged | mean ‖Δ‖ | mean edit s | one-time C s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = "model (sampled text)" if r["source"] == "model" else Path(r["source"]).name
        lines.append(
            f"| {name} | {r['stats_count']:,} | {r['es']:.2f} | {r['ps']:.2f} | {r['dp_loc']:.4f} | "
            f"{r['greedy_same']:.2f} | {r['greedy3_same']:.2f} | {r['delta_norm']:.3f} | {r['seconds']:.1f} | "
            f"{r['stats_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-records", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None, help="also write per-record results here")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-render the table from a previous --out-json file instead of editing")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        saved = json.loads(args.from_json.read_text(encoding="utf-8"))
        results = [summarize(r) for r in saved["results"]]
        n, offset = saved.get("n_records", results[0]["n"]), saved.get("offset", args.offset)
    else:
        from factedit import Editor, load_model

        t0 = time.perf_counter()
        model, tok = load_model()
        editor = Editor(model, tok, progress=False)
        log(f"model loaded in {time.perf_counter() - t0:.1f}s")
        records = read_records(DATA, args.n_records, args.offset)
        n, offset = len(records), args.offset
        results = [run_source(editor, s, records, log) for s in SOURCES]

    md = table(results)
    notes = (f"\nn = {n} CounterFact records (offset {offset}), method r-rome, layer "
             f"{results[0]['layer']}, stats_tokens={STATS_TOKENS:,} requested; "
             f"'mean edit s' excludes the one-time computation of C; "
             f"locality greedy = 3-token greedy continuation of the locality prompt.\n")
    print(md + "\n" + notes)
    if args.out_md:
        args.out_md.write_text(md + "\n" + notes, encoding="utf-8")
    if args.out_json:
        args.out_json.write_text(json.dumps({"platform": platform.platform(), "n_records": n, "offset": offset,
                                             "results": results}, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
