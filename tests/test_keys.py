"""Keys over a span edited bottom-up (issue 36): each layer's pass starts where the last pass's key layer begins,
and gives exactly the keys a fresh forward from the embeddings gives on the same weights."""

import pytest
import torch

from factedit import Request
from factedit.core.arch import ModelAdapter
from factedit.edit.keys import TemplateKeys, template_keys
from tiny import tiny_model

REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome"),
        Request("{} is in", "Space Needle", "Tokyo"),
        Request("The capital of {} is", "Japan", "Paris"),
        Request("{} plays the", "Toko Yasuda", "piano")]
TEMPLATES = ["{}", "The weather is nice. {}", "Once upon a time, in a land far away, {}"]


def _nudge(ad, layer, seed):
    """Change W_out of ``layer`` as an edit would (a random rank-one update)."""
    g = torch.Generator().manual_seed(seed)
    W = ad.w_out_weight(layer)
    u, v = torch.randn(W.shape[0], 1, generator=g), torch.randn(1, W.shape[1], generator=g)
    ad.add_to_w_out(layer, 0.05 * u @ v)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("budget", [1 << 30, 1, "half"])
def test_keys_of_a_span_edited_bottom_up_equal_fresh_forwards(arch, budget):
    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    fresh = lambda l, out=None: template_keys(ad, REQS, TEMPLATES, l, out, batch_rows=5)  # noqa: E731
    keys = TemplateKeys(ad, REQS, TEMPLATES, batch_rows=5, budget=0)
    if budget == "half":  # room for some of the chunks' rows only: the others run from the embeddings
        h = keys.chunks[0][0].inputs()["input_ids"].shape
        budget = h[0] * h[1] * ad.d_model * 4 * 2 + 1
    keys = TemplateKeys(ad, REQS, TEMPLATES, batch_rows=5, budget=budget)
    assert len(keys.chunks) == 3  # 12 rows in chunks of 5
    for i, l in enumerate((1, 2, 3)):
        K, Z = keys(l, 3)
        K0, Z0 = fresh(l, 3)
        assert torch.equal(K, K0) and torch.equal(Z, Z0), (arch, l)
        if budget == 1 << 30:
            assert all(r is not None and r[0] == l - 1 for r in keys.resume)
        _nudge(ad, l, seed=i)  # the edit of layer l: the next pass starts below it, on unchanged layers
    _nudge(ad, 1, seed=9)  # a lower layer changed: asked for again, layer 2 runs from the embeddings
    K, _ = keys(2)
    assert torch.equal(K, fresh(2)[0])


def test_the_kept_rows_do_skip_the_layers_below():
    """The pass after the first really starts at the kept layer: a change below it is not seen (which is why
    the caller may change only layers at or above the last key layer)."""
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    keys = TemplateKeys(ad, REQS, TEMPLATES, batch_rows=5, budget=1 << 30)
    keys(2)
    before = template_keys(ad, REQS, TEMPLATES, 3)[0]
    _nudge(ad, 0, seed=3)  # below the kept layer 1: the contract broken on purpose
    fresh = template_keys(ad, REQS, TEMPLATES, 3)[0]
    assert not torch.allclose(fresh, before)
    assert torch.equal(keys(3)[0], before)
