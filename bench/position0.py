"""Subjects at position 0: the CounterFact records whose subject is the first token of the prompt
(issue 18, "{} was founded by" / Microsoft), edited with the prompt read at position 0 and after the
prompt prefix (core/tokens.py), and what an edit made with the prefix does when served without it.

Selects the records of the CounterFact file whose fact token (the subject's last token) is token 0
of the rewrite prompt when read without a prefix, writes them to ``OUT/records.jsonl`` (the run's
input; ``runs/`` is not part of the repository), and runs the same ``factedit eval`` twice on them
(``--prompt-prefix none`` and ``auto``; r-rome by default, raw method, GE off), then re-edits each
record with the prefix and checks the edit on the prompt read *without* it (a serving stack that
sends the bare text).

    python bench/position0.py --out runs/position0 --corpus ../shared/data/corpus/wikitext2_valid.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_knowedit.jsonl"


def select(tok, path: Path) -> list:
    from factedit.core.tokens import fact_token_index

    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompt, subject = r["prompt"], r["subject"]
        if not prompt.startswith(subject):
            continue
        _, fact = fact_token_index(tok, "{}" + prompt[len(subject):], subject)
        if fact == 0:
            out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/position0")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--method", default="r-rome")
    args = ap.parse_args()

    from factedit import Editor, GuardConfig, Request, load_model
    from factedit.cli import build_parser
    from factedit.cli.eval import eval_config
    from factedit.core.arch import ModelAdapter
    from factedit.edit.verify import verify_request
    from factedit.evaluation import run_eval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    records = select(tok, CF)
    data = out / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} records with the subject at position 0 (of {CF.name})", flush=True)
    parser = build_parser()
    summaries = {}
    for prefix in ("none", "auto"):
        argv = ["eval", "--method", args.method, "--dataset", str(data), "--corpus", args.corpus,
                "--ge-length", "0", "--prompt-prefix", prefix, "--out", str(out / f"prefix-{prefix}")]
        ns = parser.parse_args(argv)
        editor = Editor(model, tok, prompt_prefix=prefix, progress=False)
        t = time.perf_counter()
        s = run_eval(editor, eval_config(ns), ns.out)
        cases = [json.loads(l) for l in (out / f"prefix-{prefix}" / "cases.jsonl").read_text().splitlines()]
        s["n_verified"] = sum(c.get("verified") is True for c in cases)
        s["wall_seconds"] = round(time.perf_counter() - t, 1)
        summaries[prefix] = s
        print(json.dumps({"prefix": prefix, **{k: s.get(k) for k in ("n", "errors", "ES", "PS", "NS", "S", "verified",
                                                                      "n_verified", "wall_seconds")}}), flush=True)
    # served without the prefix: edit with it, check on the bare text
    editor = Editor(model, tok, prompt_prefix="auto", progress=False)
    bare = ModelAdapter(model, tok, prompt_prefix="none")
    cfg = editor.make_config(args.method, stats_corpus=args.corpus)
    served = []
    for r in records:
        req = Request(r["prompt"].replace(r["subject"], "{}", 1), r["subject"], r["target_new"], r["ground_truth"])
        editor.edit(req, config=cfg, guard=GuardConfig(enabled=False), verify=False)
        try:
            with_prefix, without = verify_request(editor.adapter, req), verify_request(bare, req)
        finally:
            editor.revert()
        served.append({"case_id": r["case_id"], "with_prefix": with_prefix, "without_prefix": without})
    (out / "served_without_prefix.jsonl").write_text("".join(json.dumps(x) + "\n" for x in served), encoding="utf-8")
    n = len(served)
    report = {
        "records": n,
        "verified_with_prefix": sum(x["with_prefix"]["verified"] for x in served),
        "verified_served_without_prefix": sum(x["without_prefix"]["verified"] for x in served),
        "p_new_gt_p_true_served_without_prefix": sum(x["without_prefix"]["p_new"] > x["without_prefix"]["p_true"]
                                                      for x in served),
        "runs": {k: {m: v.get(m) for m in ("n", "errors", "ES", "PS", "NS", "S", "verified", "n_verified")}
                 for k, v in summaries.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
