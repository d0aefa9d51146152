"""What a model answers, as a person reads it: greedy answers cut at their first sentence, and the
normalisation that compares them with a target (generation-based scores, side-effect probes).

    greedy_answers(adapter, ["The Eiffel Tower is located in the city of"])   # ["Paris."]
    mentions("He moved to Rome, Italy.", ["Rome"])                             # True ("Romeo": False)
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

import torch

from .batching import pad_id, pad_rows
from .kv import cache_of, past
from .lm import rows_on

__all__ = ["GEN_TOKENS", "normalize_answer", "first_sentence", "mentions", "greedy_answers"]

#: new tokens of a greedy answer (at most; it stops at its first sentence)
GEN_TOKENS = 50

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NON_WORD = re.compile(r"[^\w\s]|_")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation → spaces, articles (a, an, the) removed, whitespace collapsed (the
    SQuAD-style normalisation of answers)."""
    text = _NON_WORD.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_sentence(text: str) -> str:
    """A greedy continuation up to its stopping point: leading whitespace dropped, then cut at the first
    newline or at the first sentence end (``.``, ``!`` or ``?`` followed by whitespace or the end),
    whichever comes first (the mark is kept)."""
    text = text.lstrip()
    cut = text.find("\n")
    text = text if cut < 0 else text[:cut]
    m = _SENTENCE_END.search(text)
    return text if m is None else text[: m.end()]


def mentions(text: str, answers: Sequence[str]) -> bool:
    """Whether the normalised ``text`` contains one of the normalised ``answers`` as whole words
    ("Rome" is not mentioned by "Romeo"; "the United States" is by "United States")."""
    hay = f" {normalize_answer(text)} "
    return any(f" {a} " in hay for a in (normalize_answer(x) for x in answers) if a)


@torch.no_grad()
def greedy_answers(adapter, prompts: Sequence[str], max_new_tokens: int = GEN_TOKENS, batch_rows: int = 64,
                   models=None, owners: Optional[Sequence[int]] = None) -> List[str]:
    """The greedy answer to each prompt: up to ``max_new_tokens`` new tokens, stopped at EOS and cut at
    the first newline or sentence end (:func:`first_sentence`), never at
    the target's length. ``batch_rows`` prompts run together (left-padded, KV cache; a batch stops as
    soon as every row has stopped); with ``models``, prompt ``i`` runs on edited model ``owners[i]``."""
    tok, body, dev = adapter.tokenizer, adapter.body, adapter.device
    eos = {t for t in (tok.eos_token_id, getattr(adapter.model.generation_config, "eos_token_id", None))
           if isinstance(t, int)}
    out: List[str] = []
    for a in range(0, len(prompts), max(1, batch_rows)):
        part = list(prompts[a: a + batch_rows])
        own = list(owners[a: a + batch_rows]) if models is not None else None
        enc = [list(tok(p)["input_ids"]) for p in part]
        batch = pad_rows(enc, pad_id(tok), side="left", device=dev)
        ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
        new: List[List[int]] = [[] for _ in part]
        done = [False] * len(part)
        with rows_on(models, own):
            out_ = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for _ in range(max_new_tokens):
                nxt = adapter.logits(out_.last_hidden_state[:, -1, :]).argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if done[i]:
                        continue
                    if t in eos:
                        done[i] = True
                        continue
                    new[i].append(t)
                    text = tok.decode(new[i], skip_special_tokens=True)
                    done[i] = first_sentence(text) != text.lstrip()  # a stop was reached
                if all(done):
                    break
                step = nxt.view(-1, 1).to(dev)
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
                pos = pos[:, -1:] + 1
                out_ = body(input_ids=step, attention_mask=mask, position_ids=pos, **past(body, cache_of(out_)))
        out += [first_sentence(tok.decode(n, skip_special_tokens=True)) for n in new]
    return out
