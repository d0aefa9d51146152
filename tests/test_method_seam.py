"""Adding a method is one module plus one registration: a method defined and registered here, outside
``factedit.edit.methods`` and without touching any other module, works from ``Editor.edit``, the command
line (``edit`` and ``eval``) and the web page (a real browser on a page served in this process).

The method is ROME's ablation without key statistics ("C = I"): the rank-one update
``Δ = δ k*ᵀ / (k*ᵀ k*)``, so that ``(W + Δ) k* = W k* + δ`` exactly.
"""

import json
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import pytest
import torch

from conftest import COUNTERFACT
from factedit import Editor, MethodSpec, Request, register
from factedit.core.errors import MethodError
from factedit.edit.deltas import LayerDelta
from factedit.edit.methods.base import DEPTH_RULE, GIVEN, default_layer
from factedit.edit.methods.registry import REGISTRY, unregister
from factedit.edit.results import Computed
from factedit.edit.values import ValueConfig, ValueProblem, optimize_values
from tiny import tiny_model

NAME = "identity-rome"
REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")


@dataclass(frozen=True)
class IdentityROMEConfig:
    """ROME without key statistics. Attributes: method, layer, value, context_lengths, essence_prompts,
    fact_token, seed, layer_rule (as ROME's)."""

    method: str = NAME
    layer: Optional[int] = None
    value: ValueConfig = field(default_factory=lambda: ValueConfig(steps=15))
    context_lengths: Tuple[Tuple[int, int], ...] = ((5, 2),)
    essence_prompts: Tuple[str, ...] = ("{} is a",)
    fact_token: str = "subject_last"
    seed: int = 0
    layer_rule: str = ""

    def resolved(self, adapter):
        layer = default_layer(adapter.n_layers) if self.layer is None else adapter.check_layer(self.layer)
        return replace(self, layer=layer, layer_rule=self.layer_rule or (DEPTH_RULE if self.layer is None else GIVEN))

    @property
    def layers(self):
        return (self.layer,)


def compute_identity_rome(adapter, caches, requests, cfg, state=None) -> Computed:
    if len(requests) != 1:
        raise MethodError(f"{NAME} edits one request at a time")
    templates = caches.templates(cfg.seed, cfg.context_lengths)
    problem = ValueProblem(adapter, cfg.layer, list(requests), templates, cfg.essence_prompts, cfg.fact_token)
    values = optimize_values(problem, cfg.value)
    k, d = values.k_star[0].float(), values.delta[0].float()
    delta = LayerDelta(cfg.layer, d[:, None].clone(), (k / (k @ k))[:, None].clone())
    info = [{"steps": values.steps_each[0]}]
    return Computed([delta], values, info, {}, cfg, keys={cfg.layer: k[:, None]})


@pytest.fixture
def registered():
    spec = register(MethodSpec(NAME, IdentityROMEConfig, compute_identity_rome, single_request=True))
    try:
        yield spec
    finally:
        unregister(NAME)
    assert NAME not in REGISTRY


def test_a_registered_method_edits_through_the_editor(registered, home):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    W0 = ed.adapter.w_out_weight(1).detach().clone().double()
    result = ed.edit(REQ, method=NAME, layer=1)
    assert result.method == NAME and result.config.layer == 1 and result.config.layer_rule == GIVEN
    # the algebra of the method: Δ's right factor is k*/(k*ᵀk*), so k* = r/(rᵀr), and (W + Δ) k* = W k* + δ
    d = result.deltas[0]
    r = d.right[:, 0].double()
    k = r / (r @ r)
    W1 = ed.adapter.w_out_weight(1).detach().double()
    torch.testing.assert_close((W1 - W0) @ k, d.left[:, 0].double(), rtol=1e-5, atol=1e-6)
    assert result.verification and "p_new" in result.verification[0]
    ed.revert()
    assert torch.equal(ed.adapter.w_out_weight(1).detach().double(), W0)


def test_a_registered_method_works_from_the_command_line(registered, tiny_dir, home, tmp_path, capsys):
    from factedit.cli import main

    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert NAME in capsys.readouterr().out
    code = main(["edit", "--model", str(tiny_dir), "--method", NAME, "--layer", "1", "--prompt", REQ.prompt,
                 "--subject", REQ.subject, "--target", "Rome", "--true", "Paris", "--json", "--allow-unverified",
                 "--save-patch", str(tmp_path / "p.safetensors")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["method"] == NAME and out["layers"] == [1] and out["after"]["p_new"] > 0
    from factedit.patch.files import Patch

    patch = Patch.load(tmp_path / "p.safetensors")
    assert patch.meta["method"] == NAME and patch.meta["config"]["method"] == NAME
    if COUNTERFACT.is_file():
        code = main(["eval", "--model", str(tiny_dir), "--method", NAME, "--layer", "1", "--dataset", str(COUNTERFACT),
                     "--limit", "2", "--ge-length", "0", "--gen-tokens", "0", "--out", str(tmp_path / "run"), "--json"])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0 and summary["method"] == NAME and summary["n"] == 2


def test_a_registered_method_works_from_the_web_page(registered, home, tmp_path):
    pytest.importorskip("gradio", reason="the ui extra (Gradio) is not installed")
    pytest.importorskip("playwright", reason="Playwright is not installed (the test extra installs it)")
    from browser import chromium_page, find_chromium, free_port

    if find_chromium() is None:
        pytest.skip("no Chromium on this machine")
    from factedit.app.session import Session
    from factedit.app.settings import Settings
    from factedit.ui.app import serve

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    session = Session(ed, Settings("ui", {"workdir": str(tmp_path / "work")}))
    port = free_port()
    app = serve(session, "127.0.0.1", port, block=False)
    try:
        with chromium_page() as page:
            page.set_default_timeout(180_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#trace-button")
            page.click("button[data-tab-id=edit]")
            page.locator("#edit-method input").click()
            assert NAME in page.get_by_role("option").all_inner_texts()
            page.get_by_role("option", name=NAME).click()
            page.locator("#edit-layer input, #edit-layer textarea").first.fill("1")
            page.locator("#edit-keep input").check()
            page.click("#edit-button")
            page.wait_for_selector("#edit-result .fe-out")
            text = page.inner_text("#edit-result")
            assert "Error" not in text, text
            assert NAME in text and "P(new) 'Rome'" in text
    finally:
        app.close()
    assert [r.method for r in ed.history] == [NAME]
