"""Edit-layer sweep on the embedded model: r-ROME at each layer, CounterFact scores by layer.

For each layer, the same CounterFact records are edited one at a time (then reverted) and scored
as in the ROME paper, as the fraction of records where
  * efficacy:     P(new) > P(true) after the prompt,
  * paraphrase:   P(new) > P(true) after the rephrased prompt,
  * neighborhood: P(neighbour's answer) > P(new) after an unrelated prompt (higher is better).
The collapse guard is off, so every layer's raw behaviour is seen. The table marks the depth-rule
layer and the causal-trace recommendation (if `factedit trace --dataset` has cached one).

    python bench/layer_sweep.py --records 20 --layers 1,2,3,4,5,6,8,10,12,15,20 --out docs/TRACING.md
    python bench/layer_sweep.py --records 1 --layers 5          # quick check that it runs

Statistics C are computed (and cached) per layer on first use: minutes per new layer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, publish  # noqa: E402

HEAD = "# Locating facts: causal tracing\n\n"


def records(n: int) -> List[dict]:
    with open(CF, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def scores(editor, recs, layer: int) -> dict:
    from factedit import GuardConfig, Request
    from factedit.core.lm import target_logprobs

    ad = editor.adapter
    eff = para = neigh = 0
    t = time.perf_counter()
    for r in recs:
        req = Request.from_filled(r["prompt"], r["subject"], r["target_new"], r["ground_truth"])
        editor.edit(req, layer=layer, stats_corpus=str(CORPUS), guard=GuardConfig(enabled=False))
        try:
            lp = target_logprobs(ad, [r["prompt"], r["prompt"], r["rephrase_prompt"], r["rephrase_prompt"],
                                      r["locality_prompt"], r["locality_prompt"]],
                                 [r["target_new"], r["ground_truth"], r["target_new"], r["ground_truth"],
                                  r["locality_ground_truth"], r["target_new"]])
        finally:
            editor.revert()
        eff += lp[0] > lp[1]
        para += lp[2] > lp[3]
        neigh += lp[4] > lp[5]
    n = len(recs)
    return {"layer": layer, "efficacy": eff / n, "paraphrase": para / n, "neighborhood": neigh / n,
            "seconds": time.perf_counter() - t}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--layers", default="1,2,3,4,5,6,8,10,12,15,20")
    ap.add_argument("--out", default=None, help="markdown file to (re)write the section into (e.g. docs/TRACING.md)")
    args = ap.parse_args(argv)

    from factedit import Editor, load_model
    from factedit.edit.methods.rome import default_layer
    from factedit.trace.cache import load_recommendation

    model, tok = load_model()
    editor = Editor(model, tok, progress=False)
    depth_rule = default_layer(editor.adapter.n_layers)
    rec = load_recommendation(editor.adapter)
    layers = sorted({int(x) for x in args.layers.split(",")} | {depth_rule} | ({rec.layer} if rec else set()))
    recs = records(args.records)
    rows = []
    for layer in layers:
        rows.append(scores(editor, recs, layer))
        print(rows[-1], flush=True)

    lines = ["## Edit-layer sweep (r-ROME, embedded model)", "",
             f"Command: `python bench/layer_sweep.py --records {args.records} --layers {args.layers}`  ",
             f"Date: {datetime.date.today()}; first {args.records} CounterFact records (KnowEdit layout), "
             "one edit at a time, reverted after scoring; guard off.", "",
             "| layer | efficacy | paraphrase | neighborhood | seconds | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = ", ".join(n for n, hit in (("depth rule (default without a trace)", r["layer"] == depth_rule),
                                          ("causal-trace recommendation", rec is not None and r["layer"] == rec.layer))
                         if hit)
        lines.append(f"| {r['layer']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | {r['neighborhood']:.2f} | "
                     f"{r['seconds']:.0f} | {note} |")
    publish(lines, args.out, "## Edit-layer sweep", head=HEAD, trailing_newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
