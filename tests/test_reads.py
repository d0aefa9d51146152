"""The report's batched reads (factedit.app.reads) give exactly what one-prompt-at-a-time greedy decoding gives:
continuations, first-sentence answers and the guard's probe tokens, before and after a weight change, whatever
drafts they verify. The references are computed here with model.generate, one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from factedit.app.reads import Asks, read
from factedit.core.answers import first_sentence
from factedit.core.arch import ModelAdapter
from factedit.core.lm import target_probabilities
from factedit.edit.guard import GuardConfig, probe_tokens
from tiny import ARCHS, tiny_model

PROMPTS = ["The Eiffel Tower is located in the city of", "Rome is in", "a b c d e f g h i j k l m n o p q r s",
           "The capital of Japan is"]
PROBES = ["Paris is in", "The language of France is", "x y", "Tokyo was founded by somebody who lived in"]


def _generate(model, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, top_p=None,
                         top_k=None, temperature=None)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _answer(tok, tokens, eos):
    """The greedy answer rule, step by step: stop at EOS or once the text so far has a sentence end."""
    kept = []
    for t in tokens:
        if t in eos:
            break
        kept.append(t)
        text = tok.decode(kept, skip_special_tokens=True)
        if first_sentence(text) != text.lstrip():
            break
    return first_sentence(tok.decode(kept, skip_special_tokens=True))


def _asks(guard):
    asks = Asks(pairs=[(PROMPTS[0], "Rome"), (PROMPTS[0], "Paris")])
    asks.continuations = [(f"c{i}", p, 5 + 3 * i, None) for i, p in enumerate(PROMPTS)]
    asks.answers = [(f"a{i}", p, 12) for i, p in enumerate(PROBES)]
    asks.tokens = [("guard", guard.prompts, guard.max_new_tokens)]
    return asks


def _check(ad, asks, got):
    model, tok = ad.model, ad.tokenizer
    eos = {tok.eos_token_id}
    for name, p, n, _ in asks.continuations:
        assert got.texts[name] == tok.decode(_generate(model, tok, p, n), skip_special_tokens=True), name
    for name, p, n in asks.answers:
        assert got.texts[name] == _answer(tok, _generate(model, tok, p, n), eos), name
    for name, prompts, n in asks.tokens:
        assert got.tokens[name] == probe_tokens(ad, GuardConfig(prompts=tuple(prompts), max_new_tokens=n))
    want = target_probabilities(ad, [p for p, _ in asks.pairs], [t for _, t in asks.pairs])
    assert got.probabilities == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reads_are_one_at_a_time_greedy_decoding_before_and_after_a_change(arch):
    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    guard = GuardConfig(max_new_tokens=10)
    asks = _asks(guard)
    before = read(ad, asks)
    _check(ad, asks, before)
    # a change of one layer's W_out: some continuations change, the drafts of the others hold
    with torch.no_grad():
        w = ad.w_out_parameter(1)
        w.add_(0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    after = read(ad, asks, drafts=before)
    _check(ad, asks, after)
    assert read(ad, asks, drafts=before.only("answers")).rows == after.rows  # the others decoded afresh
    assert set(before.only("answers").rows) == {k for k in before.rows if k[0] == "a"}
    changed = [k for k in before.rows if before.rows[k] != after.rows[k]]
    assert changed and len(changed) < len(before.rows)  # both kinds of rows were exercised


def test_reads_hold_with_any_draft():
    """Wrong, short, empty and EOS-only drafts: the same tokens as without a draft."""
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    asks = _asks(GuardConfig(max_new_tokens=8))
    ref = read(ad, asks)
    eos = tok.eos_token_id
    for make in (lambda r: [5] * 12, lambda r: r[:2], lambda r: [], lambda r: [eos], lambda r: r[:3] + [7] + r[4:]):
        fake = type(ref)(ref.probabilities, ref.texts, ref.tokens, {k: make(list(v)) for k, v in ref.rows.items()})
        got = read(ad, asks, drafts=fake)
        assert got.rows == ref.rows and got.texts == ref.texts and got.tokens == ref.tokens


def test_given_probabilities_are_used_and_nothing_is_decoded_for_an_empty_ask():
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    calls = []
    handle = ad.body.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = read(ad, Asks(pairs=[("a b", "c")]), probabilities=[0.25])
    finally:
        handle.remove()
    assert got.probabilities == [0.25] and got.texts == {} and got.tokens == {} and not calls


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_different_lengths_decode_as_one_at_a_time_on_every_architecture(arch):
    """Right-padded rows whose padding and rejected drafts are masked out of the cache, on every supported
    architecture: the tokens of model.generate for each prompt alone, with and without drafts."""
    from factedit.core.lm import greedy_rows

    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    starts = [list(ad.tokenizer(p)["input_ids"]) for p in PROMPTS + PROBES]
    want = [_generate(model, ad.tokenizer, p, 9) for p in PROMPTS + PROBES]
    assert greedy_rows(ad, starts, 9) == want
    drafts = [w[:3] + [5] + w[4:] if i % 2 else w[:2] for i, w in enumerate(want)]
    assert greedy_rows(ad, starts, 9, drafts=drafts) == want
