"""UltraEdit (issue 32): its update against the closed form written out here from the paper's formula (keys and
gradients taken by plain forward hooks and ``backward()``, not through the method's helpers), its running
statistics against the moments of the pooled rows, and its method state through revert and a saved stack."""

import pytest
import torch
import torch.nn.functional as F

from factedit import Editor, Request
from factedit.core.arch import ModelAdapter
from factedit.core.errors import MethodError
from factedit.core.tokens import encode_request
from factedit.edit.caches import EditCaches
from factedit.edit.guard import GuardConfig
from factedit.edit.methods import MethodOptions, make_config
from factedit.edit.methods.ultraedit import EPS, compute_ultraedit, merge_moments, moments_of
from tiny import tiny_model

OFF = GuardConfig(enabled=False)
REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        Request("The capital of {} is", "Japan", "Paris", "Tokyo"),
        Request("{} speaks", "Danielle Darrieux", "Italian")]


def _by_hand(model, tok, adapter, layers, requests):
    """Per layer the keys (W_out's input) and output gradients of the summed answer-token cross-entropy at the
    positions that predict the answer, one request at a time (no padding), via hooks and ``backward()``; the
    token ids (with the model's prompt prefix) as every method of the project reads them."""
    K = {layer: [] for layer in layers}
    G = {layer: [] for layer in layers}
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        for r in requests:
            full, _, answer = encode_request(adapter.tokenizer, r.prompt, r.subject, r.target_new)  # with the prefix
            seen = {}

            def keep(layer):
                def hook(module, inputs, output):
                    output.retain_grad()
                    seen[layer] = (inputs[0], output)
                return hook

            handles = [adapter.w_out(layer).register_forward_hook(keep(layer)) for layer in layers]
            try:
                logits = model(torch.tensor([full[:-1]])).logits[0]
            finally:
                for h in handles:
                    h.remove()
            pos = [i - 1 for i in answer]
            F.cross_entropy(logits[pos].float(), torch.tensor([full[i] for i in answer]), reduction="sum").backward()
            for layer in layers:
                k, out = seen[layer]
                K[layer].append(k[0, pos].detach().double())
                G[layer].append(out.grad[0, pos].double())
            model.zero_grad(set_to_none=True)
    finally:
        emb.requires_grad_(False)
        emb.grad = None
    return {layer: (torch.cat(K[layer]), torch.cat(G[layer])) for layer in layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_update_is_the_closed_form_of_the_paper(arch, home):
    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    layers = (1, 2)
    cfg = make_config(ad, MethodOptions("ultraedit", layers=layers, fields=(("lr", 0.05), ("stats_tokens", 0))))
    d = ad.d_ff + ad.d_model
    torch.manual_seed(1)
    earlier = torch.randn(40, d, dtype=torch.float64) * 0.7 + 0.2  # the rows earlier turns saw
    state = moments_of(earlier)
    got = compute_ultraedit(ad, EditCaches(ad, progress=False), REQS, cfg, state=state)

    feats = _by_hand(model, tok, ad, layers, REQS)
    pooled = torch.cat([earlier] + [torch.cat(feats[layer], 1) for layer in layers])  # every module, one normaliser
    mean, std = pooled.mean(0), pooled.std(0)  # the sample standard deviation
    for delta in got.deltas:
        K, G = feats[delta.layer]
        z = (torch.cat([K, G], 1) - mean) / (std + EPS)
        k_hat, g_hat = z[:, : ad.d_ff], z[:, ad.d_ff:]
        V = -0.05 * (k_hat ** 2).sum(1, keepdim=True) * g_hat
        shift = torch.linalg.solve(K.T @ K + torch.eye(ad.d_ff, dtype=K.dtype), K.T @ V)  # (d_in, d_out)
        assert torch.allclose(delta.dense().double(), shift.T, rtol=2e-4, atol=1e-6), delta.layer
    # what the turn adds to the state: the moments of this turn's rows of every layer
    turn = pooled[len(earlier):]
    assert float(got.state_update["count"]) == len(turn)
    assert torch.allclose(got.state_update["mean"], turn.mean(0), atol=1e-5)  # float32 forwards, padded or not
    assert torch.allclose(got.state_update["m2"], ((turn - turn.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-5)


def test_merged_moments_are_the_moments_of_the_union():
    torch.manual_seed(0)
    rows = torch.randn(23, 5, dtype=torch.float64) * 3 + 1
    m = None
    for part in (rows[:1], rows[1:2], rows[2:10], rows[10:]):  # one-row turns included (the reference's NaN)
        m = merge_moments(m, moments_of(part))
    assert float(m["count"]) == 23
    assert torch.allclose(m["mean"], rows.mean(0), atol=1e-12)
    assert torch.allclose(m["m2"] / 22, rows.var(0), atol=1e-12)


def test_the_first_turn_brings_the_prior_and_later_turns_do_not(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    kw = dict(method="ultraedit", layers=(1, 2), stats_corpus=str(tiny_corpus), stats_tokens=300, stats_seq_len=64,
              guard=OFF, verify=False)
    first = ed.edit(REQS[:1], **kw)
    second = ed.edit(REQS[1:2], **kw)
    rows = lambda r: 2 * len(encode_request(ed.tokenizer, r.prompt, r.subject, r.target_new)[2])  # noqa: E731
    n1 = float(first.state_updates[0]["count"])
    assert n1 > rows(REQS[0]) + 2 * 200  # the prior's next-token rows (≥ 200 tokens at 2 layers) and the turn's
    assert float(second.state_updates[0]["count"]) == rows(REQS[1])
    assert float(ed.state["ultraedit"]["count"]) == n1 + rows(REQS[1])
    # the prior is cached on disk by the weights: a new editor of the same model reads it (bit for bit), and
    # a damaged cache file is computed again
    cached = list((home / "ultraedit").glob("prior-*.safetensors"))
    assert len(cached) == 1
    again = Editor(*tiny_model("llama"), progress=False).edit(REQS[:1], **kw)
    assert all(torch.equal(again.state_updates[0][k], first.state_updates[0][k]) for k in ("count", "mean", "m2"))
    cached[0].write_bytes(b"not a safetensors file")
    again = Editor(*tiny_model("llama"), progress=False).edit(REQS[:1], **kw)
    assert all(torch.equal(again.state_updates[0][k], first.state_updates[0][k]) for k in ("count", "mean", "m2"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_running_statistics_survive_revert_and_a_saved_stack(home, tiny_corpus, tmp_path):
    ed = Editor(*tiny_model("llama"), progress=False)
    kw = dict(method="ultraedit", layers=(1, 2), stats_corpus=str(tiny_corpus), stats_tokens=300, stats_seq_len=64,
              guard=OFF, verify=False)
    states = []
    for r in REQS:
        ed.edit(r, **kw)
        states.append({k: v.clone() for k, v in ed.state["ultraedit"].items()})
    ed.save_history(tmp_path / "stack")
    ed2 = Editor(*tiny_model("llama"), progress=False)
    assert ed2.load_history(tmp_path / "stack") == 3
    assert _same(ed2.state["ultraedit"], states[2])
    for k, v in ed.model.state_dict().items():
        assert torch.equal(ed2.model.state_dict()[k], v), k
    ed.revert(1)
    assert _same(ed.state["ultraedit"], states[1])
    ed2.revert(2)
    assert _same(ed2.state["ultraedit"], states[0])
    ed2.revert(1)
    assert "ultraedit" not in ed2.state
    fresh = Editor(*tiny_model("llama"), progress=False)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(ed2.model.state_dict()[k], v), k
    # editing again after the revert reproduces the same first turn (the prior is recomputed from the corpus)
    again = ed2.edit(REQS[0], **kw)
    assert _same(again.state_updates[0], states[0])


def test_bad_options_and_a_foreign_state_are_refused(home):
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    with pytest.raises(MethodError, match="alpha"):
        make_config(ad, MethodOptions("ultraedit", fields=(("alpha", "10"),)))
    for bad in (("lr", "0"), ("ridge", "-1"), ("stats_tokens", "-5")):
        with pytest.raises(MethodError):
            make_config(ad, MethodOptions("ultraedit", fields=(bad,)))
    cfg = make_config(ad, MethodOptions("ultraedit", layers=(1,), fields=(("stats_tokens", 0),)))
    foreign = moments_of(torch.randn(5, 7, dtype=torch.float64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MethodError, match="another model"):
        compute_ultraedit(ad, EditCaches(ad, progress=False), REQS[:1], cfg, state=foreign)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_damaged_or_missing_method_state_is_refused_and_changes_nothing(home, tiny_corpus, tiny_dir, tmp_path,
                                                                          capsys):
    """A stack whose running statistics were altered, or a later turn applied without the first (whose state
    holds the prior): refused with a clear error, exit 2, the model and its files untouched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from factedit import load_model
    from factedit.cli import main
    from factedit.patch.files import Patch, PatchError
    from factedit.patch.stack import stack_files

    model, tok = load_model(str(tiny_dir))
    ed = Editor(model, tok, progress=False)
    kw = dict(method="ultraedit", layers=(1, 2), stats_corpus=str(tiny_corpus), stats_tokens=300, stats_seq_len=64,
              guard=OFF, verify=False)
    ed.edit(REQS[:1], **kw)
    ed.edit(REQS[1:2], **kw)
    ed.save_history(tmp_path / "stack")
    first, second = stack_files(tmp_path / "stack")
    with safe_open(str(first), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["state.0.mean"] = tensors["state.0.mean"] + 1.0  # the running mean altered
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=meta)
    fresh = Editor(*load_model(str(tiny_dir)), progress=False)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(PatchError, match="damaged"):
        fresh.apply_patches([Patch.load(damaged)])
    assert "ultraedit" not in fresh.state
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    capsys.readouterr()
    assert main(["apply", str(damaged), "--model", str(tiny_dir), "--save-model", str(tmp_path / "out")]) == 2
    assert "damaged" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # the second turn alone: its base is the model after the first, so it does not apply to the unedited one
    assert main(["apply", str(second), "--model", str(tiny_dir), "--save-model", str(tmp_path / "out")]) == 2
    assert "base" in capsys.readouterr().err.lower() and not (tmp_path / "out").exists()
