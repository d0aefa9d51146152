"""Tokenization helpers: subject (fact-token) positions and target token positions.

Positions are found from character offsets (fast tokenizers), so a subject that merges
with its neighbours (``"Tower's"``) still maps to the right token.

Every prompt the model reads starts with the *prompt prefix* (:func:`with_prompt_prefix`): nothing
for a tokenizer that starts every text with its own BOS (Llama, Gemma, Mistral), a newline for one
that adds nothing (GPT-2, SmolLM2), so that no subject sits at position 0, the attention-sink
position whose hidden state carries no retrievable content (docs/ALGORITHMS.md §2.1).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from typing import List, Tuple

from .errors import RequestError

__all__ = ["encode", "token_at_char", "fact_token_index", "encode_with_target", "encode_request", "target_rows",
           "with_prompt_prefix", "prompt_prefix_of", "prefix_tag", "source_tokenizer", "AUTO_PREFIXES"]

log = logging.getLogger(__name__)

#: What ``prompt_prefix="auto"`` tries, in order, for a tokenizer that adds no start token itself:
#: the first text that encodes to exactly one token.
AUTO_PREFIXES = ("\n",)


def _adds_start_token(tok) -> bool:
    return list(tok("a")["input_ids"])[:1] != list(tok("a", add_special_tokens=False)["input_ids"])[:1]


def source_tokenizer(tok):
    """The tokenizer a prefixed copy was made from (``tok`` itself when it is not one): what to save."""
    return getattr(tok, "factedit_source", tok)


def prompt_prefix_of(tok) -> str:
    """The prompt prefix ``tok`` puts before every text ("" when none)."""
    return getattr(tok, "factedit_prompt_prefix", "")


def prefix_tag(tok) -> str:
    """A file-name tag for caches whose contents depend on the prompts as read ("" without a prefix)."""
    prefix = prompt_prefix_of(tok)
    return "" if not prefix else "-pfx" + hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:8]


def with_prompt_prefix(tok, prefix: str = "auto"):
    """A copy of the fast tokenizer ``tok`` that puts ``prefix`` before every text it encodes with
    special tokens (``add_special_tokens=False`` still gives the bare text), or ``tok`` itself.

    ``prefix``: ``"auto"`` (nothing when ``tok`` already starts texts with a special token, else the
    first of :data:`AUTO_PREFIXES` that is one token), ``"none"`` / ``""`` (no prefix), or any text
    (``"<|endoftext|>"`` names a special token). The copy remembers its source
    (:func:`source_tokenizer`), which is what :func:`~factedit.core.models.save_model` writes: the
    prefix never reaches a saved tokenizer. The prefix tokens get the empty offset ``(0, 0)``.
    """
    base = source_tokenizer(tok)
    if prefix == "auto" and base is not tok:
        return tok  # already prefixed (by an earlier adapter of the same tokenizer)
    if prefix in ("none", ""):
        return base
    if prefix == "auto":
        if _adds_start_token(base):
            return base
        candidates = AUTO_PREFIXES
    else:
        candidates = (prefix,)
    backend = getattr(base, "backend_tokenizer", None)
    if backend is None or not getattr(base, "is_fast", False):
        if prefix != "auto":
            raise RequestError("a prompt prefix needs a fast tokenizer")
        log.warning("slow tokenizer: prompts are read without a prefix (a subject at position 0 may not edit)")
        return base
    for text in candidates:
        ids = list(base(text, add_special_tokens=False)["input_ids"])
        if ids and (prefix != "auto" or len(ids) == 1):
            break
    else:
        if prefix != "auto":
            raise RequestError(f"the prompt prefix {prefix!r} encodes to no tokens")
        return base
    from tokenizers import processors

    tokens = base.convert_ids_to_tokens(ids)
    special = list(dict.fromkeys(zip(tokens, ids)))
    template = processors.TemplateProcessing(single=[*tokens, "$A"], pair=[*tokens, "$A", "$B:1"],
                                             special_tokens=special)
    prefixed = copy.deepcopy(base)
    backend = prefixed.backend_tokenizer
    existing = backend.post_processor  # e.g. ByteLevel's offset trimming: kept, the prefix goes after it
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    prefixed.factedit_source = base
    prefixed.factedit_prompt_prefix = text
    return prefixed


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


def target_rows(tok, requests) -> list:
    """Per request, what teacher forcing its new target reads: ``(ids, positions, targets)`` with ``ids`` the
    prompt and target up to the target's last token (excluded), ``positions`` the indices whose next-token
    prediction is a target token, ``targets`` those tokens."""
    rows = []
    for req in requests:
        ids, _, tidx = encode_request(tok, req.prompt, req.subject, req.target_new)
        rows.append((ids[: tidx[-1]], [i - 1 for i in tidx], [ids[i] for i in tidx]))
    return rows
