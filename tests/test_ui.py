"""`factedit ui` in a real browser: the server runs as its own process on a free localhost port, headless
Chromium (the distribution's package) is driven by Playwright. Tiny random LLaMA for the page's
workings; one slow test on the embedded model."""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the ui extra (Gradio) is not installed: pip install 'factedit[ui]'")
pytest.importorskip("playwright", reason="Playwright is not installed (the test extra installs it)")

from browser import chromium_page, find_chromium, running_ui  # noqa: E402
from conftest import CORPUS, COUNTERFACT, STATS_ARGS, TEST_HOME  # noqa: E402

if find_chromium() is None:
    pytest.skip("no Chromium on this machine and no package manager installed one (scripts/test.sh runs "
                "apt-get install chromium)", allow_module_level=True)

TIMEOUT = 180_000  # ms: an edit on a busy 2-core machine


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    """A tiny random LLaMA folder, a corpus for its statistics, an empty FACTEDIT_HOME."""
    from tiny import _TEXT, tiny_model

    root = tmp_path_factory.mktemp("ui")
    model, tok = tiny_model("llama")
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    lines = []
    for i in range(60):
        lines += [" ".join(_TEXT[(i + j) % len(_TEXT)] for j in range(3)) + f" number {i}.", ""]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_ui(tiny_env):
    args = ["--model", str(tiny_env / "tiny"), "--stats-corpus", str(tiny_env / "corpus.txt"), "--stats-tokens", "600",
            "--workdir", str(tiny_env / "work")]
    with open(tiny_env / "server.log", "w") as log, \
            running_ui(args, env={"FACTEDIT_HOME": str(tiny_env / "home")}, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def page(tiny_ui):
    with chromium_page() as p:
        p.set_default_timeout(TIMEOUT)
        p.goto(tiny_ui)
        p.wait_for_selector("#trace-button")
        yield p


def tab(page, name: str) -> None:
    page.click(f"button[data-tab-id={name}]")


def fill(page, elem_id: str, text: str) -> None:
    """Type ``text`` into a field; again if the page re-mounted the field meanwhile (a tab's first showing
    can render its components after the click that showed it, dropping what was typed)."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    for _ in range(5):
        box.fill(text)
        page.wait_for_timeout(150)
        if box.input_value() == text:
            return
    raise AssertionError(f"#{elem_id} did not keep {text!r}")


def seq(page, result: str) -> str:
    """The sequence number of what ``result`` shows now ("" before anything was rendered)."""
    out = page.locator(f"#{result} .fe-out")
    return out.first.get_attribute("data-seq") if out.count() else ""


def click_and_wait(page, button: str, result: str) -> str:
    """Click ``button`` and return the text of ``result`` once the page rendered a new output there."""
    old = seq(page, result)
    page.click(f"#{button}")
    page.wait_for_function("([sel, old]) => { const e = document.querySelector(sel + ' .fe-out'); "
                           "return e && e.dataset.seq !== old; }", arg=[f"#{result}", old])
    return page.inner_text(f"#{result} .fe-out")


def edit_form(page, prompt="{} is located in the city of", subject="Eiffel Tower", target="Rome", true="Paris",
              layer="1", keep=True) -> None:
    tab(page, "edit")
    fill(page, "edit-prompt", prompt)
    fill(page, "edit-subject", subject)
    fill(page, "edit-target", target)
    fill(page, "edit-true", true)
    fill(page, "edit-layer", layer)
    box = page.locator("#edit-keep input")
    box.check() if keep else box.uncheck()


def do_edit(page, **form) -> dict:
    """Fill the form, click Edit, and read the numbers the page shows."""
    edit_form(page, **form)
    text = click_and_wait(page, "edit-button", "edit-result")
    if "Error" in text:
        return {"error": text}
    page.wait_for_selector("#p-new-after")
    num = lambda i: float(page.inner_text(f"#{i}"))  # noqa: E731
    return {"p_new_before": num("p-new-before"), "p_new_after": num("p-new-after"),
            "p_true_after": num("p-true-after"), "delta_norm": num("delta-norm"),
            "after": page.locator("#edit-continuations td.gen-after").first.inner_text(),
            "decision": page.inner_text("#edit-decision"), "text": text}


def history_text(page) -> str:
    """The stack as the page shows it, freshly rendered (opening the tab re-reads the session)."""
    tab(page, "locate")
    old = seq(page, "history")
    tab(page, "history")
    page.wait_for_function("(old) => { const e = document.querySelector('#history .fe-out'); "
                           "return e && e.dataset.seq !== old; }", arg=old)
    return page.inner_text("#history")


def revert_all(page) -> None:
    history_text(page)
    rows = page.locator("#history-table tbody tr").count()
    if rows:
        fill(page, "revert-n", str(rows))
        click_and_wait(page, "revert-button", "history-status")
    assert "No edits applied" in history_text(page)


def test_edit_in_the_browser_equals_the_cli_and_reverts(page, tiny_env, monkeypatch, capsys):
    shown = do_edit(page)
    assert "error" not in shown, shown
    assert shown["after"] and "P(new) 'Rome'" in shown["text"]
    # the same request through `factedit edit --json` (same model files, statistics and seed)
    from factedit.cli import main

    monkeypatch.setenv("FACTEDIT_HOME", str(tiny_env / "home"))
    code = main(["edit", "--model", str(tiny_env / "tiny"), "--prompt", "{} is located in the city of", "--subject",
                 "Eiffel Tower", "--target", "Rome", "--true", "Paris", "--layer", "1", "--stats-corpus",
                 str(tiny_env / "corpus.txt"), "--stats-tokens", "600", "--json", "--allow-unverified"])
    cli = json.loads(capsys.readouterr().out)
    assert code == 0
    assert shown["p_new_before"] == pytest.approx(cli["before"]["p_new"], abs=1e-4)
    assert shown["p_new_after"] == pytest.approx(cli["after"]["p_new"], abs=1e-4)
    assert shown["p_true_after"] == pytest.approx(cli["after"]["p_true"], abs=1e-4)
    assert shown["delta_norm"] == pytest.approx(cli["delta_norm"], abs=1e-4)
    assert shown["after"] == cli["after"]["generation"].strip()
    assert ("did NOT take" in shown["decision"]) == (not cli["verified"])
    # the stack shows the edit; reverting brings the before-state back (a second edit starts from it)
    assert "r-rome" in history_text(page) and "Eiffel Tower is located in the city of -> Rome" in history_text(page)
    revert_all(page)
    again = do_edit(page)
    assert again["p_new_before"] == shown["p_new_before"]
    revert_all(page)


def test_errors_are_shown_and_leave_the_model_unchanged(page, tiny_env):
    from factedit import Editor, Patch, Request
    from tiny import tiny_model

    revert_all(page)
    for form, message in ((dict(prompt="The Eiffel Tower is in", subject="Louvre"), "does not occur in prompt"),
                          (dict(target=" "), "target_new is empty"),
                          (dict(layer="99"), "out of range"),
                          (dict(prompt="{} is in {}"), "exactly one")):
        got = do_edit(page, **form)
        assert "error" in got and message in got["error"], (form, got)
    assert "No edits applied" in history_text(page)
    # a corrupt patch file and a patch made for another model: refused, shown, nothing applied
    bad = tiny_env / "bad.safetensors"
    bad.write_bytes(b"this is not a patch")
    other, tok = tiny_model("llama", seed=1)
    ed = Editor(other, tok, progress=False)
    res = ed.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"), layer=1, steps=2,
                  stats_corpus=str(tiny_env / "corpus.txt"), stats_tokens=600, verify=False)
    foreign = Patch.from_result(res).save(tiny_env / "foreign.safetensors")
    for path, message in ((bad, "not a readable patch file"), (foreign, "different base model")):
        upload_patch(page, path)
        text = click_and_wait(page, "apply-patch-button", "history-status")
        assert message in text, text
        assert "No edits applied" in history_text(page)


def upload_patch(page, path) -> None:
    tab(page, "history")
    page.set_input_files("#upload-patch input[type=file]", str(path))
    page.wait_for_function("(name) => document.querySelector('#upload-patch').innerText.includes(name)",
                           arg=Path(path).name)


def test_locate_batch_download_upload_and_evaluate(page, tiny_env):
    revert_all(page)
    # Locate: three heatmaps and a recommended layer
    tab(page, "locate")
    fill(page, "trace-prompt", "The Eiffel Tower is located in the city of")
    fill(page, "trace-subject", "Eiffel Tower")
    text = click_and_wait(page, "trace-button", "trace-status")
    assert "Error" not in text, text
    assert re.fullmatch(r"[0-3]", page.inner_text("#trace-layer").strip())
    for kind in ("hidden", "mlp", "attn"):
        assert page.locator(f"#trace-{kind} img").count() == 1
    # Batch: a JSONL of three requests, one MEMIT edit; a table row per request
    reqs = tiny_env / "requests.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
         "target_true": "Paris"},
        {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris", "target_true": "Tokyo"},
        {"prompt": "{} speaks", "subject": "Danielle Darrieux", "target_new": "Italian"})) + "\n", encoding="utf-8")
    tab(page, "batch")
    page.set_input_files("#batch-file input[type=file]", str(reqs))
    page.wait_for_function("() => document.querySelector('#batch-file').innerText.includes('requests.jsonl')")
    text = click_and_wait(page, "batch-button", "batch-result")
    assert "Error" not in text, text
    assert page.locator("#batch-table tbody tr").count() == 3 and "3 requests, memit" in text
    assert "Wear of the edited matrices" in text and page.locator("#wear tbody tr").count() >= 1  # per layer
    # the stack: download the edit as a patch and all as a PEFT adapter, revert, upload the patch back
    assert "memit" in history_text(page)
    click_and_wait(page, "download-patch-button", "history-status")
    page.wait_for_function("() => document.querySelector('#history-download').innerText.includes('.safetensors')")
    with page.expect_download() as dl:
        page.locator("#history-download a").first.click()
    patch_file = tiny_env / "downloaded.safetensors"
    dl.value.save_as(patch_file)
    click_and_wait(page, "download-peft-button", "history-status")
    page.wait_for_function("() => document.querySelector('#history-download').innerText.includes('.zip')")
    revert_all(page)
    upload_patch(page, patch_file)
    text = click_and_wait(page, "apply-patch-button", "history-status")
    assert "applied a memit patch" in text, text
    assert "memit" in history_text(page)
    # Evaluate refuses while edits are applied (readable), then runs on two CounterFact records
    if not COUNTERFACT.is_file():
        pytest.skip(f"shared data not found ({COUNTERFACT})")
    data = tiny_env / "cf.jsonl"
    data.write_text("\n".join(COUNTERFACT.read_text(encoding="utf-8").splitlines()[:2]) + "\n", encoding="utf-8")
    tab(page, "evaluate")
    fill(page, "eval-path", str(data))
    fill(page, "eval-n", "2")
    text = click_and_wait(page, "eval-button", "eval-result")
    page.wait_for_function("() => document.querySelector('#eval-result').innerText.includes('Error')")
    assert "revert them first" in page.inner_text("#eval-result")
    revert_all(page)
    tab(page, "evaluate")
    page.click("#eval-button")
    page.wait_for_function("() => document.querySelector('#eval-result').innerText.includes('(complete)')")
    assert page.locator("#eval-cases tbody tr").count() == 2
    assert re.search(r"\b2\b", page.inner_text("#eval-summary"))


def test_audit_tab_finds_explains_and_offers_the_edit(page, tiny_env):
    """The Audit tab against the page's own model: a suspect folder with a rank-one update of layer 1's W_out is
    "edited" there, with subjects ranked and the patch to download; a missing suspect is a readable error; the
    suspect's weights uploaded as one .safetensors file are audited the same."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    revert_all(page)
    suspect = tiny_env / "suspect"
    if not suspect.exists():
        shutil.copytree(tiny_env / "tiny", suspect)
        w = load_file(str(suspect / "model.safetensors"))
        g = torch.Generator().manual_seed(0)
        name = "model.layers.1.mlp.down_proj.weight"
        w[name] = w[name] + 0.05 * torch.randn(w[name].shape[0], 1, generator=g) @ torch.randn(
            1, w[name].shape[1], generator=g)
        save_file(w, str(suspect / "model.safetensors"), metadata={"format": "pt"})
    tab(page, "audit")
    fill(page, "audit-suspect", str(tiny_env / "nowhere"))
    text = click_and_wait(page, "audit-button", "audit-result")
    assert "Error" in text and "does not exist" in text, text
    fill(page, "audit-suspect", str(suspect))
    text = click_and_wait(page, "audit-button", "audit-result")
    assert "Error" not in text, text
    assert page.inner_text("#audit-verdict").strip() == "edited"
    assert "Edit 1: W_out of layer 1, rank 1" in text and page.locator("#audit-subjects-1 tbody tr").count() >= 1
    page.wait_for_function("() => document.querySelector('#audit-download').innerText.includes('.safetensors')")
    with page.expect_download() as dl:
        page.locator("#audit-download a").first.click()
    found = tiny_env / "audit-found.safetensors"
    dl.value.save_as(found)
    from factedit.patch.files import Patch

    got = Patch.load(found)
    assert got.meta["method"] == "audit-extract" and got.meta["layers"] == [1]
    bare = tiny_env / "upload" / "edited.safetensors"  # the suspect's weights alone, uploaded: replaces the path
    bare.parent.mkdir(exist_ok=True)
    shutil.copyfile(suspect / "model.safetensors", bare)
    fill(page, "audit-suspect", str(tiny_env / "nowhere"))
    page.set_input_files("#audit-suspect-file input[type=file]", str(bare))
    page.wait_for_function("() => document.querySelector('#audit-suspect-file').innerText.includes('edited')")
    text = click_and_wait(page, "audit-button", "audit-result")
    assert "Error" not in text, text
    assert page.inner_text("#audit-verdict").strip() == "edited" and "Edit 1: W_out of layer 1, rank 1" in text


@pytest.mark.slow
def test_embedded_model_edit_in_the_browser(page, tmp_path):
    if not CORPUS.is_file():
        pytest.skip("shared data not found")
    with open(tmp_path / "server.log", "w") as log, \
            running_ui([*STATS_ARGS, "--workdir", str(tmp_path / "work")], env={"FACTEDIT_HOME": str(TEST_HOME)},
                       log=log) as url:
        p = page.context.browser.new_page()  # the module's browser (one Playwright per process)
        p.set_default_timeout(TIMEOUT)
        p.goto(url)
        p.wait_for_selector("#trace-button")
        got = do_edit(p, layer="", keep=False)  # the demo edit with the defaults
        assert "error" not in got, got
        assert got["p_new_after"] > got["p_true_after"] and got["p_new_after"] > got["p_new_before"]
        assert "The edit took" in got["decision"] and "Rome" in got["after"]
        assert "as a chat turn" in got["text"]  # SmolLM2-Instruct has a chat template: its answer is shown
        assert "Side effects" in got["text"] and p.locator("#side-effects tbody tr").count() > 0
        p.close()


def read_edit(page) -> dict:
    num = lambda i: float(page.inner_text(f"#{i}"))  # noqa: E731
    return {"before": num("p-new-before"), "after": num("p-new-after")}


def test_two_tabs_editing_at_once_are_serialised(page, tiny_ui):
    revert_all(page)
    other = page.context.new_page()
    try:
        other.set_default_timeout(TIMEOUT)
        other.goto(tiny_ui)
        other.wait_for_selector("#trace-button")
        for p in (page, other):
            edit_form(p)
        olds = [seq(p, "edit-result") for p in (page, other)]
        page.click("#edit-button")
        other.click("#edit-button")
        for p, old in zip((page, other), olds):
            p.wait_for_function("(old) => { const e = document.querySelector('#edit-result .fe-out'); "
                                "return e && e.dataset.seq !== old && document.querySelector('#p-new-after'); }",
                                arg=old)
        a, b = read_edit(page), read_edit(other)
        # one edit ran on the weights the other left (never on a half-applied edit)
        assert a["before"] == b["after"] or b["before"] == a["after"], (a, b)
        assert a["before"] != b["before"]
        assert history_text(page).count("Eiffel Tower is located in the city of -> Rome") == 2
    finally:
        other.close()
        revert_all(page)


def test_session_chat_edit_joins_the_history_and_reverts(home, tiny_corpus, tmp_path):
    """A chat-turn edit goes through the session's second editor (no prompt prefix) and is adopted by the
    session's history: listed, reverted bit for bit; the chat editor keeps nothing (no browser needed)."""
    import copy

    import torch

    from factedit import Editor
    from factedit.app.session import Session
    from factedit.app.settings import Settings
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    tok = copy.deepcopy(tok)  # the tiny tokenizer is shared between tests: only this one gets a template
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ed = Editor(model, tok, progress=False)
    ui = Settings("ui", {"stats_corpus": str(tiny_corpus), "stats_tokens": 600, "workdir": str(tmp_path / "ui")})
    s = Session(ed, ui)
    w0 = ed.adapter.w_out_stored(1).clone()
    s.edit(dict(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target="Rome", layer=1,
                chat=True, allow_unverified=True, guard=False, side_effects=False))
    assert [h["edit"] for h in s.history()] == [1] and s._chat.history == ()
    assert not torch.equal(ed.adapter.w_out_stored(1), w0)
    assert s.revert(1) == 0
    assert torch.equal(ed.adapter.w_out_stored(1), w0)
