"""Tokenization helpers: subject (fact-token) positions and target token positions.

Positions are found from character offsets (fast tokenizers), so a subject that merges
with its neighbours (``"Tower's"``) still maps to the right token.
"""

from __future__ import annotations

from typing import List, Tuple

from .errors import RequestError

__all__ = ["encode", "token_at_char", "fact_token_index", "encode_with_target", "encode_request"]


def encode(tok, text: str) -> Tuple[List[int], List[Tuple[int, int]] | None]:
    """Token ids of ``text`` (with the tokenizer's usual special tokens) and char offsets."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tok(text)["input_ids"]), None


def token_at_char(offsets, char: int) -> int:
    """Index of the token whose span contains character ``char``."""
    for i, (s, e) in enumerate(offsets):
        if s <= char < e:
            return i
    # some tokenizers leave gaps (e.g. a leading space belongs to no token); take the last before
    best = None
    for i, (s, e) in enumerate(offsets):
        if e > s and s <= char:
            best = i
    if best is None:
        raise RequestError(f"no token covers character {char}")
    return best


def fact_token_index(tok, template: str, subject: str, strategy: str = "subject_last") -> Tuple[List[int], int]:
    """Token ids of ``template`` filled with ``subject`` and the index of the fact token.

    ``strategy`` is ``"subject_last"`` (last token of the subject, ROME's default),
    ``"subject_first"`` or ``"last"`` (last token of the prompt).
    """
    if template.count("{}") != 1:
        raise RequestError(f"template must contain exactly one '{{}}': {template!r}")
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2:]
    ids, offsets = encode(tok, text)
    if strategy == "last":
        return ids, len(ids) - 1
    if strategy not in ("subject_last", "subject_first"):
        raise RequestError(f"unknown fact-token strategy {strategy!r}")
    if offsets is not None:
        char = start if strategy == "subject_first" else start + len(subject) - 1
        return ids, token_at_char(offsets, char)
    # slow tokenizer: count the tokens of the prefix that ends with the subject
    before = list(tok(text[:start])["input_ids"])
    upto = list(tok(text[: start + len(subject)])["input_ids"])
    return ids, (len(before) if strategy == "subject_first" else len(upto) - 1)


def encode_with_target(tok, prompt_text: str, target: str) -> Tuple[List[int], List[int]]:
    """Ids of ``prompt_text + " " + target`` and the indices of the target's tokens.

    The target is space-prefixed (CounterFact convention). Raises if it yields no token.
    """
    target = target.strip()
    full = prompt_text + " " + target
    ids, offsets = encode(tok, full)
    if offsets is not None:
        n = len(prompt_text)
        idx = [i for i, (s, e) in enumerate(offsets) if s >= n and e > s]
        # a token that straddles the boundary (prompt ends mid-word) counts as target
        if idx and idx[0] > 0 and offsets[idx[0] - 1][1] > n:
            idx = [idx[0] - 1] + idx
    else:
        n_prompt = len(tok(prompt_text)["input_ids"])
        idx = list(range(n_prompt, len(ids)))
    if not idx:
        raise RequestError(f"target {target!r} produces no tokens after prompt {prompt_text!r}")
    if idx[0] == 0:
        raise RequestError("the prompt must produce at least one token before the target")
    # drop trailing special tokens (e.g. an EOS appended by the tokenizer)
    return ids[: idx[-1] + 1], idx


def encode_request(tok, template: str, subject: str, target: str | None, strategy: str = "subject_last"):
    """Tokenize ``template`` filled with ``subject`` (+ space + ``target`` if given) in one pass.

    Returns ``(ids, fact_index, target_indices)``; ``target_indices`` is empty without a target.
    """
    start = template.index("{}")
    filled = template[:start] + subject + template[start + 2:]
    if target is None:
        ids, fact = fact_token_index(tok, template, subject, strategy)
        return ids, fact, []
    ids, tidx = encode_with_target(tok, filled, target)
    if strategy == "last":
        fact = tidx[0] - 1
    else:
        _, offsets = encode(tok, filled + " " + target.strip())
        if offsets is not None:
            char = start if strategy == "subject_first" else start + len(subject) - 1
            fact = token_at_char(offsets, char)
        else:
            _, fact = fact_token_index(tok, template, subject, strategy)
    if fact >= tidx[0]:
        raise RequestError(f"the subject {subject!r} must come before the target in {template!r}")
    return ids, fact, tidx
