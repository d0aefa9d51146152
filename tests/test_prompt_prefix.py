"""The prompt prefix: no subject is read at position 0 (the attention-sink position), consistently in
keys, values, scoring and generation, and the prefix never reaches a saved tokenizer."""

import torch
from transformers import AutoTokenizer

from factedit import Editor, Request, save_model
from factedit.core.arch import ModelAdapter
from factedit.core.tokens import (
    encode_request,
    fact_token_index,
    prefix_tag,
    prompt_prefix_of,
    source_tokenizer,
    with_prompt_prefix,
)
from factedit.edit.keys import template_keys
from tiny import tiny_model, tiny_tokenizer


def _bos_tokenizer():
    """A tokenizer that starts every text with its own BOS (as Llama's does)."""
    import copy

    from tokenizers import processors

    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    own = copy.deepcopy(tok)
    own.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B:1", special_tokens=[("<|endoftext|>", bos)])
    return own, bos


def test_auto_prefix_is_a_newline_for_a_tokenizer_without_bos():
    tok = tiny_tokenizer()
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1
    p = with_prompt_prefix(tok)
    assert p is not tok and prompt_prefix_of(p) == "\n" and source_tokenizer(p) is tok
    text = "Space Needle is in the city of"
    enc = p(text, return_offsets_mapping=True)
    assert enc["input_ids"] == nl + tok(text)["input_ids"]
    assert (enc["offset_mapping"][0] == (0, 0)
            and enc["offset_mapping"][1:] == tok(text, return_offsets_mapping=True)["offset_mapping"])
    assert p(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"]  # bare text on request
    # the subject that began the prompt is now read at position 1, in keys, values and scoring alike
    n_subject = len(tok("Space Needle")["input_ids"])
    assert tok(text)["input_ids"][:n_subject] == tok("Space Needle")["input_ids"]
    ids, fact = fact_token_index(p, "{} is in the city of", "Space Needle")
    assert fact == n_subject and ids[0] == nl[0]  # without the prefix: n_subject - 1
    ids, fact, tidx = encode_request(p, "{} is in the city of", "Space Needle", "Paris")
    assert fact == n_subject and tok.decode(ids[tidx[0]:]).strip() == "Paris"
    assert with_prompt_prefix(p) is p  # idempotent
    assert with_prompt_prefix(p, "none") is tok and prompt_prefix_of(tok) == "" and prefix_tag(tok) == ""
    assert prefix_tag(p).startswith("-pfx")


def test_no_prefix_where_the_tokenizer_adds_its_own_bos():
    own, bos = _bos_tokenizer()
    assert own("a")["input_ids"][0] == bos
    assert with_prompt_prefix(own) is own and prompt_prefix_of(own) == ""


def test_explicit_prefix():
    tok = tiny_tokenizer()
    p = with_prompt_prefix(tok, "<|endoftext|>")
    assert p("a b")["input_ids"] == [tok.convert_tokens_to_ids("<|endoftext|>")] + tok("a b")["input_ids"]
    assert prompt_prefix_of(p) == "<|endoftext|>"
    q = with_prompt_prefix(p, "The ")  # re-prefixing starts from the source, never stacks
    assert q("a")["input_ids"] == tok("The ", add_special_tokens=False)["input_ids"] + tok("a")["input_ids"]
    assert with_prompt_prefix(tok, "") is tok


def test_model_reads_every_prompt_after_the_prefix(home, tiny_corpus):
    """Keys at the fact token equal a plain forward of prefix + prompt (computed here without the
    helpers), so an edit is computed on the prompt as the model reads it."""
    from factedit.core.hooks import Hook

    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    assert ed.adapter.prompt_prefix == "\n"
    req = Request("{} is located in the city of", "Space Needle", "Rome", "Seattle")
    K, _ = template_keys(ed.adapter, [req], ["{}"], 2, None)
    ids = tok("\n", add_special_tokens=False)["input_ids"] + tok(req.text)["input_ids"]
    fact = len(tok("Space Needle")["input_ids"])  # the subject's last token, one after the prefix
    with Hook(ed.adapter.w_out(2), retain_input=True) as h:
        model(input_ids=torch.tensor([ids]))
    assert torch.allclose(K[0], h.input[0, fact], rtol=1e-5, atol=1e-5)  # float32 rounding of another batch
    bare = ModelAdapter(model, tok, prompt_prefix="none")
    K0, _ = template_keys(bare, [req], ["{}"], 2, None)
    assert not torch.allclose(K0, K, atol=1e-3)  # position 0 reads differently: what the prefix is for


def test_the_prefix_never_reaches_a_saved_tokenizer(tmp_path, home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    out = save_model(ed.model, ed.tokenizer, tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(out)
    assert again("Space Needle")["input_ids"] == tok("Space Needle")["input_ids"]
    result = ed.edit(Request("{} is in", "Space", "Rome"), "r-rome", layer=1, guard=False,
                     stats_corpus=str(tiny_corpus), steps=2)
    assert result.prompt_prefix == "\n"
    from factedit import Patch

    assert Patch.from_result(result).meta["prompt_prefix"] == "\n"
