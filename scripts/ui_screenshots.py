"""Screenshots of every tab of `factedit ui` on the embedded model, for the README (docs/img/ui-*.png).

Starts the server, drives headless Chromium through each tab (a trace, the demo edit, a batch of five
CounterFact requests with MEMIT, the session's stack, an evaluation of five records after reverting),
and saves one full-page screenshot per tab.

    python scripts/ui_screenshots.py --corpus ../shared/data/corpus/wikitext2_valid.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_knowedit.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="statistics corpus (as factedit edit --corpus)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--samples", type=int, default=10, help="noise samples of the trace")
    args = ap.parse_args()

    from factedit.ui.browser import chromium_page, running_ui

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="factedit-shots-"))
    reqs = work / "requests.jsonl"
    reqs.write_text("\n".join(CF.read_text(encoding="utf-8").splitlines()[:5]) + "\n", encoding="utf-8")
    data = work / "counterfact5.jsonl"
    data.write_text(reqs.read_text(encoding="utf-8"), encoding="utf-8")

    def fill(page, elem_id, text):
        page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)

    def run(page, button, result, until=None):
        old = page.locator(f"#{result} .fe-out")
        old = old.first.get_attribute("data-seq") if old.count() else ""
        page.click(f"#{button}")
        page.wait_for_function("([sel, old, until]) => { const e = document.querySelector(sel + ' .fe-out'); "
                               "return e && e.dataset.seq !== old && (!until || e.innerText.includes(until)); }",
                               arg=[f"#{result}", old, until])
        text = page.inner_text(f"#{result} .fe-out")
        if "Error" in text:
            raise SystemExit(f"{button}: {text}")
        return text

    def shot(page, name):
        path = out / f"ui-{name}.png"
        page.wait_for_timeout(500)
        page.screenshot(path=str(path), full_page=True)
        print(f"wrote {path}")

    with open(work / "server.log", "w") as log, \
            running_ui(["--corpus", args.corpus, "--workdir", str(work / "ui")], log=log) as url, \
            chromium_page(width=1400, height=900) as page:
        page.set_default_timeout(900_000)
        page.goto(url)
        page.wait_for_selector("#trace-button")
        # Locate
        fill(page, "trace-prompt", "The Space Needle is located in the city of")
        fill(page, "trace-subject", "Space Needle")
        print(run(page, "trace-button", "trace-status"))
        shot(page, "locate")
        # Edit: the demo
        page.click("button[data-tab-id=edit]")
        print(run(page, "edit-button", "edit-result"))
        shot(page, "edit")
        # Batch: five CounterFact requests with MEMIT
        page.click("button[data-tab-id=batch]")
        page.set_input_files("#batch-file input[type=file]", str(reqs))
        page.wait_for_function("() => document.querySelector('#batch-file').innerText.includes('requests.jsonl')")
        print(run(page, "batch-button", "batch-result"))
        shot(page, "batch")
        # the stack: inspect the first edit, download it as a patch
        page.click("button[data-tab-id=history]")
        run(page, "download-patch-button", "history-status")
        page.click("#inspect-button")
        page.wait_for_timeout(1500)
        shot(page, "history")
        # Evaluate: revert both edits, then five records with r-ROME
        fill(page, "revert-n", "2")
        run(page, "revert-button", "history-status")
        page.click("button[data-tab-id=evaluate]")
        fill(page, "eval-path", str(data))
        fill(page, "eval-n", "5")
        print(run(page, "eval-button", "eval-result", until="(complete)"))
        shot(page, "evaluate")
    print(json.dumps({"screenshots": sorted(str(p) for p in out.glob("ui-*.png"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
