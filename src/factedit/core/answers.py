"""What a model answers, as a person reads it: greedy answers cut at their first sentence, and the
normalisation that compares them with a target (generation-based scores, side-effect probes).

    greedy_answers(adapter, ["The Eiffel Tower is located in the city of"])   # ["Paris."]
    mentions("He moved to Rome, Italy.", ["Rome"])                             # True ("Romeo": False)
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence

from .lm import eos_ids, greedy_rows

__all__ = ["GEN_TOKENS", "normalize_answer", "first_sentence", "mentions", "sentence_stop", "answer_text",
           "greedy_answers"]

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


def sentence_stop(tok) -> Callable[[List[int]], bool]:
    """The stopping rule of an answer: the new tokens, decoded with ``tok``, have reached their first
    sentence end or newline (:func:`first_sentence` cuts them there)."""
    def stop(tokens: List[int]) -> bool:
        text = tok.decode(tokens, skip_special_tokens=True)
        return first_sentence(text) != text.lstrip()
    return stop


def answer_text(tok, tokens: Sequence[int], eos: set) -> str:
    """The answer that greedy ``tokens`` give: decoded without EOS, cut at its first sentence."""
    return first_sentence(tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True))


def greedy_answers(adapter, prompts: Sequence[str], max_new_tokens: int = GEN_TOKENS, batch_rows: int = 128,
                   models=None, owners: Optional[Sequence[int]] = None, tokenizer=None) -> List[str]:
    """The greedy answer to each prompt: up to ``max_new_tokens`` new tokens, stopped at EOS and cut at
    the first newline or sentence end (:func:`first_sentence`), never at the target's length.

    ``batch_rows`` prompts run together (:func:`~factedit.core.lm.greedy_rows`: one KV cache, each row's padding
    masked out; a row that has stopped leaves the batch, so the cost follows the answers' lengths, not the
    longest one's).
    With ``models`` (a :class:`~factedit.edit.row_deltas.RowDeltas`), prompt ``i`` runs on edited model
    ``owners[i]``. ``tokenizer``: instead of the adapter's (e.g. one without the prompt prefix, for prompts
    rendered through a chat template)."""
    tok = tokenizer or adapter.tokenizer
    eos = eos_ids(adapter, tok)
    stop = sentence_stop(tok)
    rows = greedy_rows(adapter, [list(tok(p)["input_ids"]) for p in prompts], max_new_tokens, [stop] * len(prompts),
                       eos=eos, batch_rows=batch_rows, models=models,
                       owners=list(owners) if models is not None else None)
    return [answer_text(tok, r, eos) for r in rows]
