"""What a model answers, as a person reads it: greedy answers cut at their first sentence, and the
normalisation that compares them with a target (generation-based scores, side-effect probes).

    greedy_answers(adapter, ["The Eiffel Tower is located in the city of"])   # ["Paris."]
    mentions("He moved to Rome, Italy.", ["Rome"])                             # True ("Romeo": False)
"""

from __future__ import annotations

import contextlib
import re
from typing import List, Optional, Sequence

import torch

from .batching import pad_id, pad_rows
from .kv import cache_of, past
from .lm import eos_ids, rows_on

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
def greedy_answers(adapter, prompts: Sequence[str], max_new_tokens: int = GEN_TOKENS, batch_rows: int = 128,
                   models=None, owners: Optional[Sequence[int]] = None, tokenizer=None) -> List[str]:
    """The greedy answer to each prompt: up to ``max_new_tokens`` new tokens, stopped at EOS and cut at
    the first newline or sentence end (:func:`first_sentence`), never at the target's length.

    ``batch_rows`` prompts run together (left-padded, KV cache); a row that has stopped leaves the batch
    (its cache rows are dropped), so the cost follows the answers' lengths, not the longest one's. With
    ``models`` (a :class:`~factedit.edit.row_deltas.RowDeltas`), prompt ``i`` runs on edited model
    ``owners[i]``. ``tokenizer``: instead of the adapter's (e.g. one without the prompt prefix, for prompts
    rendered through a chat template)."""
    tok, body, dev = tokenizer or adapter.tokenizer, adapter.body, adapter.input_device
    eos = eos_ids(adapter, tok)
    out: List[str] = []
    for a in range(0, len(prompts), max(1, batch_rows)):
        part = list(prompts[a: a + batch_rows])
        own = list(owners[a: a + batch_rows]) if models is not None else None
        batch = pad_rows([list(tok(p)["input_ids"]) for p in part], pad_id(tok), side="left", device=dev)
        mask, pos = batch.attention_mask, batch.position_ids
        new: List[List[int]] = [[] for _ in part]
        live = list(range(len(part)))  # rows still answering, in batch order
        with contextlib.ExitStack() as stack:
            stack.enter_context(rows_on(models, own))
            res = body(input_ids=batch.input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for step in range(max_new_tokens):
                nxt = adapter.logits(res.last_hidden_state[:, -1, :]).argmax(-1).tolist()
                keep = []
                for j, (i, t) in enumerate(zip(live, nxt)):
                    if t in eos:
                        continue
                    new[i].append(t)
                    text = tok.decode(new[i], skip_special_tokens=True)
                    if first_sentence(text) == text.lstrip():  # no stop reached yet
                        keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                cache = cache_of(res)
                if len(keep) < len(live):  # drop the rows that stopped
                    idx = torch.tensor(keep)  # CPU indices select rows on any device (cache layers may differ)
                    cache.batch_select_indices(idx)
                    mask, pos = mask[idx.to(dev)], pos[idx.to(dev)]
                    live = [live[j] for j in keep]
                    if models is not None:
                        stack.enter_context(rows_on(models, [own[i] for i in live]))
                ids = torch.tensor([[new[i][-1]] for i in live], device=dev)
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                pos = pos[:, -1:] + 1
                res = body(input_ids=ids, attention_mask=mask, position_ids=pos, **past(body, cache))
        out += [first_sentence(tok.decode(n, skip_special_tokens=True)) for n in new]
    return out
