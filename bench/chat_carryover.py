"""Does an edit made on the raw prompt carry over to the chat-formatted question, and vice versa? (issue 15)

For N CounterFact records (default the first 50) of the embedded SmolLM2-135M-Instruct: edit with r-ROME
once on the raw prompt (read after the prompt prefix, the default) and once on the chat rendering
(`factedit edit --chat`: the prompt as the user's turn, the answer beginning with it; no prefix), each
from the original weights, and score both ways:

* ES raw / ES chat: P(new) > P(true) on the raw prompt / on the chat rendering;
* gen raw: the greedy continuation of the raw prompt (20 tokens) contains the new target;
* gen chat: the chat model's greedy answer to the prompt as a user message (40 tokens, to its end of
  turn) contains the new target (case-insensitive).

    python bench/chat_carryover.py --corpus ../shared/data/corpus/wikitext2_valid.txt --out docs/RESULTS.md
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

HEADING = "## Chat: does an edit carry over between the raw prompt and the chat turn?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default=None)
    args = ap.parse_args()

    from factedit import Editor, GuardConfig, Request, load_model
    from factedit.core.chat import chat_prompt, chat_request
    from factedit.core.lm import greedy_continuation, target_logprobs

    model, tok = load_model()
    raw = Editor(model, tok, progress=False)                        # prompts after the prompt prefix
    chat = Editor(model, tok, progress=False, prompt_prefix="none")  # chat markup starts the text
    cfg = raw.make_config("r-rome", stats_corpus=args.corpus)
    off = GuardConfig(enabled=False)
    recs = [json.loads(l) for l in CF.read_text(encoding="utf-8").splitlines()[: args.limit]]

    def scores(r, c):
        lr = target_logprobs(raw.adapter, [r.text] * 2, [r.target_new, r.target_true])
        lc = target_logprobs(chat.adapter, [c.text] * 2, [c.target_new, c.target_true])
        new = r.target_new.strip().lower()
        g_raw = greedy_continuation(raw.adapter, r.text, 20)
        g_chat = greedy_continuation(chat.adapter, chat_prompt(chat.tokenizer, r.text), 40)
        return {"es_raw": lr[0] > lr[1], "es_chat": lc[0] > lc[1], "gen_raw": new in g_raw.lower(),
                "gen_chat": new in g_chat.lower(), "text_raw": g_raw, "text_chat": g_chat}

    rows, t0 = [], time.perf_counter()
    for rec in recs:
        r = Request.from_filled(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"])
        c = chat_request(chat.tokenizer, r)
        row = {"case_id": rec["case_id"], "unedited": scores(r, c)}
        for where, ed, req in (("raw", raw, r), ("chat", chat, c)):
            ed.edit(req, config=cfg, guard=off, verify=False)
            try:
                row[f"edited_{where}"] = scores(r, c)
            finally:
                ed.revert()
        rows.append(row)
        print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - t0
    write_rows(args.rows, rows)
    n = len(rows)

    def pct(key, col):
        return f"{100 * sum(x[key][col] for x in rows) / n:.1f}"

    lines = [HEADING, "",
             f"Command: `python bench/chat_carryover.py --corpus {args.corpus} --limit {args.limit}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}; {cpu_name()}; torch {torch.__version__}; {seconds:.0f} s.", "",
             f"The first {n} records of `{CF.name}`, embedded SmolLM2-135M-Instruct, r-ROME (raw method, guard "
             "off, WikiText-2 statistics), each edit from the original weights. ES: P(new) > P(true); gen: the "
             "new target appears in the greedy text (raw: 20-token continuation; chat: the answer to the prompt "
             "as a user message, up to 40 tokens).", "",
             "| edited on | ES raw | ES chat | gen raw | gen chat |", "|---|---|---|---|---|"]
    for key, name in (("unedited", "(unedited)"), ("edited_raw", "raw prompt"), ("edited_chat", "chat turn")):
        lines.append(f"| {name} | {pct(key, 'es_raw')} | {pct(key, 'es_chat')} | {pct(key, 'gen_raw')} | "
                     f"{pct(key, 'gen_chat')} |")
    publish(lines, args.out, HEADING, trailing_newline=True)


if __name__ == "__main__":
    main()
