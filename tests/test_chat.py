"""Chat models: the fact as the deployed chat model sees it (a tiny model with a chat template)."""

import json

import pytest

from factedit import Editor, Request, ValueConfig
from factedit.cli import main
from factedit.core.chat import chat_prompt, chat_request
from factedit.core.errors import RequestError
from factedit.core.lm import target_probabilities
from factedit.core.tokens import fact_token_index
from tiny import tiny_model, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<pad>\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")


def _chat_tok():
    import copy

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = TEMPLATE
    return tok


def test_the_fact_token_is_the_subject_in_the_answer():
    tok = _chat_tok()
    creq = chat_request(tok, REQ)
    head = chat_prompt(tok, REQ.text)
    assert head == "<|endoftext|>user\nEiffel Tower is located in the city of<pad>\n<|endoftext|>assistant\n"
    assert creq.prompt == head + REQ.prompt and creq.text.count("Eiffel Tower") == 2
    ids, fact = fact_token_index(tok, creq.prompt, creq.subject)
    upto = tok.decode(ids[: fact + 1])
    assert upto.endswith("assistant\nEiffel Tower")  # the second occurrence, right before the target
    with pytest.raises(RequestError, match="no chat template"):
        chat_request(tiny_tokenizer(), REQ)


def test_an_edit_of_the_chat_turn_changes_the_chat_answer(home, tiny_corpus):
    model, tok = tiny_model("llama")
    tok = _chat_tok()
    ed = Editor(model, tok, progress=False, prompt_prefix="none")  # the chat markup starts the text
    creq = chat_request(ed.tokenizer, REQ)
    before = target_probabilities(ed.adapter, [creq.text], ["Rome"])[0]
    res = ed.edit(creq, "r-rome", layer=1, stats_corpus=str(tiny_corpus), stats_tokens=800, guard=False,
                  value=ValueConfig(steps=15), context_lengths=((3, 2),))
    after = target_probabilities(ed.adapter, [creq.text], ["Rome"])[0]
    assert after > 2 * before, (before, after)  # a tiny random model: the clamp keeps δ small (0.0008 -> 0.0026)
    assert res.verification[0]["p_new"] == pytest.approx(after, rel=1e-4)


def test_cli_edit_chat(tiny_dir, tiny_corpus, home, capsys):
    tok = _chat_tok()
    tok.save_pretrained(tiny_dir)
    code = main(["edit", "--model", str(tiny_dir), "--prompt", REQ.prompt, "--subject", REQ.subject, "--target", "Rome",
                 "--layer", "1", "--steps", "15", "--stats-corpus", str(tiny_corpus), "--stats-tokens", "800", "--chat",
                 "--no-guard", "--allow-unverified", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    obj = json.loads(out.out)
    assert obj["chat"] is True and obj["prompt_prefix"] == "" and obj["request"]["prompt"] == REQ.prompt
    assert obj["chat_request"]["prompt"].startswith("<|endoftext|>user\n")
    assert obj["after"]["p_new"] > obj["before"]["p_new"]
