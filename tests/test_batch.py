"""MEMIT / EMMET / AlphaEdit / FT on tiny models: distribution over layers, atomicity, sequences."""

import pytest
import torch

from factedit import Editor, GuardConfig, Request, ValueConfig
from factedit.core.errors import MethodError, RequestError
from factedit.core.hooks import Hook
from factedit.core.tokens import fact_token_index
from reference import alphaedit_update, emmet_update, memit_update, null_space_projector, rel
from tiny import tiny_model

REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome"),
        Request("{} is in", "Space Needle", "Tokyo"),
        Request("The capital of {} is", "Japan", "Paris")]
SPAN = (1, 2, 3)
NO_GUARD = GuardConfig(enabled=False)  # tiny random models are not fluent; the guard is tested in test_guard.py


def _opts(tiny_corpus, **kw):
    base = dict(layers=SPAN, stats_corpus=str(tiny_corpus), stats_tokens=2000, value=ValueConfig(steps=6))
    base.update(kw)
    return base


def _residuals(ed, requests, templates, layer):
    """(n, d_model) float64: per request the mean over ``templates`` of the output of ``layer`` at the fact
    token, one plain unpadded forward per prompt with a hook (not through factedit's key helpers, which the
    methods use: this is what they are checked against)."""
    Z = torch.zeros(len(requests), ed.adapter.d_model, dtype=torch.float64)
    for i, r in enumerate(requests):
        for ctx in templates:
            ids, fact = fact_token_index(ed.tokenizer, ctx.replace("{}", r.prompt), r.subject)  # prefixed, as read
            with Hook(ed.adapter.layers[layer], retain_output=True) as h:
                ed.adapter.body(input_ids=torch.tensor([ids]))
            Z[i] += h.output[0, fact].double() / len(templates)
    return Z


@pytest.mark.parametrize("current", ["bare", "templates"])
def test_memit_spreads_residual_over_span(home, tiny_corpus, monkeypatch, current):
    """R_l = (Z* − Z_cur) / (layers left), with Z_cur measured after the earlier layers' updates, on
    the bare prompts (default) or averaged over the templates (``current_residual="templates"``)."""
    import factedit.edit.methods.batch as B

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    seen = []
    real = B.least_squares

    where = ["{}"] if current == "bare" else ed.templates(0, ((10, 5),))

    def spy(R, K, C, lam):
        # Z_cur at the last span layer on the model as it is right now (earlier layers applied)
        seen.append((R.clone(), _residuals(ed, REQS, where, SPAN[-1])))
        return real(R, K, C, lam)

    monkeypatch.setattr(B, "least_squares", spy)
    # λ small: the tiny model's C is not on the scale MEMIT's 15000 was tuned for
    cfg = ed.make_config("memit", **_opts(tiny_corpus, mom2_update_weight=0.1, current_residual=current))
    Z_target, _ = B.target_residuals(ed.adapter, ed.caches, REQS, cfg, ed.templates(0, ((10, 5),)))
    c = ed.compute(REQS, config=cfg)
    assert len(seen) == 3 and [d.layer for d in c.deltas] == list(SPAN)
    for i, (R, Z_now) in enumerate(seen):
        expected = (Z_target.double() - Z_now) / (len(SPAN) - i)
        assert torch.allclose(R.T.double(), expected, atol=1e-4), i
    # compute() left the model as it was; applying moves the residual towards the targets
    Z0 = _residuals(ed, REQS, where, SPAN[-1])
    assert torch.allclose(Z0, seen[0][1], atol=1e-5)
    Z_target = Z_target.double()
    ed.edit(REQS, config=cfg, guard=NO_GUARD)
    Z1 = _residuals(ed, REQS, where, SPAN[-1])
    # measured where Z_cur is: on the bare prompts the template-averaged keys are not the keys the prompt
    # itself produces, so the bare residual moves a little less (0.62 of the way on this tiny model)
    assert (Z_target - Z1).norm() < {"bare": 0.7, "templates": 0.5}[current] * (Z_target - Z0).norm()


def test_first_span_layer_residual_is_delta_over_span(home, tiny_corpus, monkeypatch):
    """As in MEMIT's code: before any update the bare prompt's residual at L is z0, the target is
    z0 + δ, so the first span layer is asked for exactly δ / len(span). z0 comes from a plain forward
    of each bare prompt with a hook (not through the key helpers)."""
    import factedit.edit.methods.batch as B

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    seen = []
    real = B.least_squares
    monkeypatch.setattr(B, "least_squares", lambda R, K, C, lam: seen.append(R.clone()) or real(R, K, C, lam))
    cfg = ed.make_config("memit", **_opts(tiny_corpus, mom2_update_weight=0.1))
    Z_target, _ = B.target_residuals(ed.adapter, ed.caches, REQS, cfg, ed.templates(0, ((10, 5),)))
    ed.compute(REQS, config=cfg)
    for i, r in enumerate(REQS):
        ids, fact = fact_token_index(ed.tokenizer, r.prompt, r.subject)  # as the model reads it (prefixed)
        with Hook(ed.adapter.layers[SPAN[-1]], retain_output=True) as h:
            ed.adapter.body(input_ids=torch.tensor([ids]))
        delta = Z_target[i] - h.output[0, fact]
        assert delta.norm() > 0.1
        assert torch.allclose(seen[0][:, i].float(), delta / len(SPAN), atol=1e-5), i


def _one_layer(ed, cfg):
    """A one-layer (3) batch edit's update (float64) and the inputs of its closed form: the residual
    R = Z* − Z_cur (d_model, n), Z_cur measured on the bare prompts by :func:`_residuals`; the keys K
    (d_ff, n) the update was computed for; the statistics C."""
    import factedit.edit.methods.batch as B

    templates = ed.templates(0, ((10, 5),))
    # deterministic: same as inside compute
    Z_target, _ = B.target_residuals(ed.adapter, ed.caches, REQS, cfg, templates)
    Z_cur = _residuals(ed, REQS, ["{}"], 3)
    c = ed.compute(REQS, config=cfg)
    assert [d.layer for d in c.deltas] == [3] and c.deltas[0].rank == len(REQS)
    C = ed.caches.mom2(3, **c.config.stats_args)
    return c.deltas[0].dense().double(), (Z_target.double() - Z_cur).T, c.keys[3].double(), C


def test_emmet_last_layer_is_exact(home, tiny_corpus):
    """With a one-layer span, EMMET's equality solve gives Δ K = Z* − Z_cur on the averaged keys, and Δ is
    the closed form R (KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ (explicit inverses, reference.py)."""
    model, tok = tiny_model("gpt2")
    ed = Editor(model, tok, progress=False)
    D, R, K, C = _one_layer(ed, ed.make_config("emmet", **_opts(tiny_corpus, layers=(3,))))
    assert rel(D @ K, R) < 1e-3
    # float32 forwards (R) and float32 factors (Δ): measured ~1e-5
    assert rel(D, emmet_update(R, K, C)) < 1e-4


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_one_layer_update_is_the_closed_form(method, home, tiny_corpus):
    """A one-layer MEMIT / AlphaEdit edit is its formula on the edit's keys, residuals and statistics, computed
    with explicit inverses (reference.py): MEMIT R Kᵀ (λC + K Kᵀ)⁻¹; AlphaEdit ΔP with
    Δ = R Kᵀ P (K Kᵀ P + αI)⁻¹, P from numpy.linalg.eigh of C and α the paper's 10 (the default) or
    alpha_scale · tr(P C) when that is given."""
    import numpy as np

    model, tok = tiny_model("gpt2")
    ed = Editor(model, tok, progress=False)
    kw = _opts(tiny_corpus, layers=(3,))
    if method == "alphaedit":
        # a threshold in the widest (relative) gap of the middle of C's spectrum: P neither 0 nor I, and well
        # defined (no eigenvalue near the threshold)
        probe = ed.make_config("memit", **kw)
        ev = np.linalg.eigvalsh(ed.caches.mom2(3, **probe.stats_args).double().numpy())
        d = len(ev)
        i = max(range(d // 4, 3 * d // 4), key=lambda j: ev[j] / ev[j - 1])
        kw["nullspace_threshold"] = float(np.sqrt(ev[i - 1] * ev[i]))
    for extra in ({}, {"alpha_scale": 0.02}) if method == "alphaedit" else ({},):
        cfg = ed.make_config(method, **kw, **extra)
        D, R, K, C = _one_layer(ed, cfg)
        if method == "memit":
            ref = memit_update(R, K, C, cfg.mom2_update_weight)
        else:
            P = null_space_projector(C, cfg.nullspace_threshold)
            assert 0 < round(float(P.trace())) < C.shape[0]
            alpha = 10.0 if not extra else 0.02 * float((P * C.double()).sum())
            assert (cfg.alpha == 10.0) == (not extra)
            ref = alphaedit_update(R, K, P, None, alpha)
        assert rel(D, ref) < 1e-4  # float32 forwards (R) and float32 factors (Δ): measured ~1e-5


def test_emmet_past_the_key_dimensions_is_memit_with_its_weight(home, tiny_corpus):
    """A batch with more requests than the keys have dimensions (44 > the tiny LLaMA's 40): EMMET's equalities
    cannot all hold, and the edit is MEMIT's with λ = mom2_update_weight (the weight recorded as each layer's
    ridge), not a least-squares fit that drops the preserved keys."""
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    assert ed.adapter.d_ff == 40
    reqs = [Request("{} is located in", f"Entity {i}", f"city {i % 7}") for i in range(44)]
    kw = _opts(tiny_corpus, layers=(1, 2), value=ValueConfig(steps=2), mom2_update_weight=0.5)
    emmet, memit = (ed.compute(reqs, method=m, **kw) for m in ("emmet", "memit"))
    assert all(x["ridge"] == {"1": 0.5, "2": 0.5} for x in emmet.info)
    for a, b in zip(emmet.deltas, memit.deltas):
        assert a.layer == b.layer and rel(a.dense().double(), b.dense().double()) < 1e-6


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit", "ft"])
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "gemma2"])
def test_methods_run_and_revert_on_architectures(method, arch, home, tiny_corpus):
    model, tok = tiny_model(arch)
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = ({} if method == "ft" else _opts(tiny_corpus, nullspace_threshold=1e9) if method == "alphaedit"
          else _opts(tiny_corpus))
    if method == "ft":
        kw = dict(layers=(2,), steps=5, lr=1e-2, norm_constraint=1e-2)
    r = ed.edit(REQS, method=method, guard=NO_GUARD, **kw)
    assert r.delta_norm > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    ed.revert()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_duplicate_and_contradictory_requests_named(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    bad = REQS + [Request("{} is in", "Space Needle", "Berlin")]
    with pytest.raises(RequestError, match=r"contradictory.*#1 and #3.*Space Needle"):
        ed.edit(bad, "memit", **_opts(tiny_corpus))
    with pytest.raises(RequestError, match="duplicate"):
        ed.edit(REQS + [REQS[0]], "emmet", **_opts(tiny_corpus))


def test_failure_in_the_middle_of_multilayer_update_restores_all(home, tiny_corpus, monkeypatch):
    import factedit.edit.methods.batch as B

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = B.least_squares

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure at the third layer")
        return real(*a, **k)

    monkeypatch.setattr(B, "least_squares", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        ed.edit(REQS, "memit", **_opts(tiny_corpus))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ed.history == ()


def test_alphaedit_sequence_state_and_revert(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    kw = _opts(tiny_corpus, nullspace_threshold=1e9, layers=(2, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed.edit(REQS[:1], "alphaedit", guard=NO_GUARD, **kw)
    G1 = {l: g.clone() for l, g in ed.state["alphaedit"].items()}
    ed.edit(REQS[1:2], "alphaedit", guard=NO_GUARD, **kw)
    ed.edit(REQS[2:], "alphaedit", guard=NO_GUARD, **kw)
    assert set(ed.state["alphaedit"]) == {2, 3}
    assert not torch.allclose(ed.state["alphaedit"][2], G1[2])
    ed.revert(2)  # the last two batches
    assert torch.equal(ed.state["alphaedit"][2], G1[2])
    ed.revert(1)
    assert "alphaedit" not in ed.state
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_alphaedit_without_null_space_is_refused(home, tiny_corpus):
    """A layer whose key statistics have no eigenvalue below the threshold leaves AlphaEdit nothing
    to edit with: a clear error naming the layer, not a silent zero update; weights unchanged."""
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MethodError, match="no eigenvalue .* below nullspace_threshold=1e-12"):
        ed.edit(REQS[:1], "alphaedit", guard=NO_GUARD, **_opts(tiny_corpus, nullspace_threshold=1e-12))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ed.history == () and "alphaedit" not in ed.state


def test_ft_records_the_loss_of_the_weights_it_ends_with(home, tiny_corpus):
    """loss_after is the loss of the final (clamped) weights, not the loss before the last step."""
    import torch.nn.functional as F

    from factedit.core.tokens import encode_request

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    req = REQS[0]
    r = ed.edit([req], method="ft", layers=(2,), steps=3, lr=0.05, norm_constraint=1.0, guard=NO_GUARD)
    ids, _, tidx = encode_request(ed.tokenizer, req.prompt, req.subject, req.target_new)
    logp = F.log_softmax(model(torch.tensor([ids[: tidx[-1] + 1]])).logits[0].float(), -1)
    want = -sum(float(logp[i - 1, ids[i]]) for i in tidx) / len(tidx)
    assert r.info[0]["loss_after"] == pytest.approx(want, rel=1e-4)
    assert r.info[0]["loss_after"] < r.info[0]["loss_before"]
    ed.revert()


def test_an_editor_adopts_another_editors_alphaedit_edit_with_its_state(home, tiny_corpus):
    """An edit made through a second Editor over the same model (the web page's chat editor reads prompts
    without the prefix) joins the first one's history with AlphaEdit's key memory; reverting it there
    restores the weights bit for bit and both states."""
    from factedit.core.tokens import source_tokenizer

    model, tok = tiny_model("llama")
    main_ed = Editor(model, tok, progress=False)
    chat_ed = Editor(model, source_tokenizer(main_ed.tokenizer), progress=False, prompt_prefix="none")
    kw = _opts(tiny_corpus, nullspace_threshold=1e9)
    w0 = {l: main_ed.adapter.w_out_stored(l).clone() for l in SPAN}
    main_ed.edit(REQS[:1], "alphaedit", guard=NO_GUARD, **kw)
    before = {l: v.clone() for l, v in main_ed.state["alphaedit"].items()}
    r = chat_ed.edit(REQS[1:2], "alphaedit", guard=NO_GUARD, **kw)
    main_ed.adopt(chat_ed)
    assert chat_ed.history == () and "alphaedit" not in chat_ed.state
    assert main_ed.history[-1] is r
    for l in SPAN:  # the adopted batch's keys are in the main editor's memory now
        assert torch.allclose(main_ed.state["alphaedit"][l],
                              before[l] + r.state_updates[0][l] @ r.state_updates[0][l].T)
    main_ed.revert()
    for l in SPAN:
        assert torch.equal(main_ed.state["alphaedit"][l], before[l])
    main_ed.revert()
    assert "alphaedit" not in main_ed.state
    for l in SPAN:
        assert torch.equal(main_ed.adapter.w_out_stored(l), w0[l])
    with pytest.raises(MethodError, match="no edit to adopt"):
        main_ed.adopt(chat_ed)


_LARGE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from tiny import tiny_model
from factedit import Editor, Request, ValueConfig
n, corpus, compare = int(sys.argv[2]), sys.argv[3], sys.argv[4] == "compare"
ed = Editor(*tiny_model("llama"), progress=False)

def deltas(n, target_batch):
    reqs = [Request("{} is located in", f"Entity {i}", f"city {i % 97}") for i in range(n)]
    got = ed.compute(reqs, method="memit", layers=(1, 2), stats_corpus=corpus, stats_tokens=2000,
                     value=ValueConfig(steps=2), batch_size=target_batch)
    return {d.layer: d.dense() for d in got.deltas}

finite = all(bool(torch.isfinite(d).all()) for d in deltas(n, 16).values())
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
out = {"peak_kib": hwm, "finite": finite}
if compare:  # after the peak was read: the targets of 64 requests in chunks of 16, and all at once
    chunked, whole = deltas(64, 16), deltas(64, 64)
    out["rel"] = max(float((chunked[l] - whole[l]).norm() / whole[l].norm()) for l in whole)
print(json.dumps(out))
"""


def _large_batch(n, tiny_corpus, home, compare=False) -> dict:
    """A MEMIT batch of ``n`` distinct requests on the tiny LLaMA (targets 16 at a time) in a fresh process: its
    peak RSS in KiB, whether the update is finite, and with ``compare`` the relative difference between the
    updates of 64 requests with targets optimised in chunks of 16 and all together."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-c", _LARGE, str(Path(__file__).parent), str(n), str(tiny_corpus),
                        "compare" if compare else "-"], capture_output=True, text=True,
                       env={**os.environ, "FACTEDIT_HOME": str(home)}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_batch_of_2000_requests_stays_in_bounded_memory_and_chunking_changes_nothing(home, tiny_corpus):
    """Issue 36: 2,000 requests in one MEMIT batch (more than the layer's 40 key dimensions) run with the targets
    optimised 16 at a time, and the process's peak memory stays within 150 MiB of a 100-request batch's (keys,
    targets and residuals are linear in n and small; nothing n × n); on 64 requests, the targets optimised in
    chunks of 16 give the update of all 64 optimised together."""
    small = _large_batch(100, tiny_corpus, home, compare=True)
    large = _large_batch(2000, tiny_corpus, home)
    grew = (large["peak_kib"] - small["peak_kib"]) / 1024
    assert grew <= 150, f"peak RSS grew by {grew:.0f} MiB from 100 to 2,000 requests"
    assert small["finite"] and large["finite"]
    assert small["rel"] < 1e-4
