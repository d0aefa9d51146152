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


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def run(page, button: str, result: str, until: str = "") -> str:
    """Click ``button``; the text of the new output in ``result`` (containing ``until``)."""
    old = page.locator(f"#{result} .fe-out")
    old = old.first.get_attribute("data-seq") if old.count() else ""
    page.click(f"#{button}")
    page.wait_for_function("([sel, old, until]) => { const e = document.querySelector(sel + ' .fe-out'); "
                           "return e && e.dataset.seq !== old && (!until || e.innerText.includes(until)); }",
                           arg=[f"#{result}", old, until], timeout=900_000)
    text = page.inner_text(f"#{result} .fe-out")
    if "Error" in text:
        raise SystemExit(f"{button}: {text}")
    return text


def shot(page, out: Path, name: str) -> None:
    path = out / f"ui-{name}.png"
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def upload(page, elem_id: str, path: Path) -> None:
    page.set_input_files(f"#{elem_id} input[type=file]", str(path))
    page.wait_for_function("([sel, name]) => document.querySelector(sel).innerText.includes(name)",
                           arg=[f"#{elem_id}", path.name])


def tour(page, out: Path, reqs: Path, data: Path) -> None:
    """Each tab in turn, with one screenshot each."""
    page.wait_for_selector("#trace-button")
    fill(page, "trace-prompt", "The Space Needle is located in the city of")
    fill(page, "trace-subject", "Space Needle")
    print(run(page, "trace-button", "trace-status"))
    shot(page, out, "locate")
    page.click("button[data-tab-id=edit]")  # the demo edit
    print(run(page, "edit-button", "edit-result"))
    shot(page, out, "edit")
    page.click("button[data-tab-id=batch]")  # five CounterFact requests with MEMIT
    upload(page, "batch-file", reqs)
    print(run(page, "batch-button", "batch-result"))
    shot(page, out, "batch")
    page.click("button[data-tab-id=history]")  # the stack: the first edit inspected and downloaded
    run(page, "download-patch-button", "history-status")
    page.click("#inspect-button")
    page.wait_for_timeout(1500)
    shot(page, out, "history")
    fill(page, "revert-n", "2")  # both edits reverted, then five records evaluated with r-ROME
    run(page, "revert-button", "history-status")
    page.click("button[data-tab-id=evaluate]")
    fill(page, "eval-path", str(data))
    fill(page, "eval-n", "5")
    print(run(page, "eval-button", "eval-result", until="(complete)"))
    shot(page, out, "evaluate")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="statistics corpus (as factedit edit --stats-corpus)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))  # the browser harness lives with the tests
    from browser import chromium_page, running_ui

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="factedit-shots-"))
    reqs = work / "requests.jsonl"
    reqs.write_text("\n".join(CF.read_text(encoding="utf-8").splitlines()[:5]) + "\n", encoding="utf-8")
    data = work / "counterfact5.jsonl"
    data.write_text(reqs.read_text(encoding="utf-8"), encoding="utf-8")
    with open(work / "server.log", "w") as log, \
            running_ui(["--stats-corpus", args.corpus, "--workdir", str(work / "ui")], log=log) as url, \
            chromium_page(width=1400, height=900) as page:
        page.set_default_timeout(60_000)
        page.goto(url)
        try:
            tour(page, out, reqs, data)
        except Exception:
            page.screenshot(path=str(work / "failure.png"), full_page=True)
            print(f"failed; the page as it was: {work / 'failure.png'}", file=sys.stderr)
            raise
    print(json.dumps({"screenshots": sorted(str(p) for p in out.glob("ui-*.png"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
