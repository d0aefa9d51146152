"""What an edit's report reads from the model, read together: every continuation the CLI and the page
show (the prompt and its paraphrases, the chat answer, the blast-radius probes, and the collapse guard's
fluency probe when the guard has none yet) decoded as rows of one greedy batch
(:func:`~factedit.core.lm.greedy_rows`), and the target probabilities in one scoring pass.

    before = read(adapter, asks)                                      # the weights before the edit
    after = read(adapter, asks, drafts=before.only("answers"))        # after it: the probes' answers verified

After an edit most probes of other subjects answer as before, so the "after" read checks their "before"
tokens in one teacher-forced forward and decodes only the rows that changed (and the edited fact's own
continuations, which are meant to change). The tokens are greedy decoding's (``model.generate(do_sample=
False)``, one prompt at a time; a batch differs from it only by the rounding of batched matrix products,
which tests/test_reads.py finds changing no token on every supported architecture, nor 200 CounterFact
evaluations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..core.answers import answer_text, sentence_stop
from ..core.batching import pad_id
from ..core.lm import eos_ids, greedy_rows, pad_finished, probability, target_logprobs

__all__ = ["Asks", "Reads", "read"]


@dataclass
class Asks:
    """What one report reads, by kind.

    Attributes:
        pairs: ``(prompt, target)`` whose teacher-forced probability is read (P(new), P(true)).
        continuations: ``(name, text, max_new_tokens, tokenizer)``: greedy continuations shown in full
            (``tokenizer``: None for the adapter's, or another, e.g. the chat model's without the prompt prefix).
        answers: ``(name, text, max_new_tokens)``: greedy answers cut at their first sentence (probes).
        tokens: ``(name, prompts, max_new_tokens)``: greedy tokens of a group of prompts padded as a batched
            ``generate`` pads them (the guard's fluency probe).
    """

    pairs: List[Tuple[str, str]] = field(default_factory=list)
    continuations: List[tuple] = field(default_factory=list)
    answers: List[tuple] = field(default_factory=list)
    tokens: List[tuple] = field(default_factory=list)


@dataclass
class Reads:
    """The model's answers to :class:`Asks`: ``probabilities`` in the order of ``pairs``, ``texts`` by name
    (continuations and answers), ``tokens`` by name; ``rows``: every row's new tokens (drafts for a later read)."""

    probabilities: List[float]
    texts: Dict[str, str]
    tokens: Dict[str, List[List[int]]]
    rows: Dict[tuple, List[int]]

    def only(self, *kinds: str) -> "Reads":
        """These rows only (``"continuations"``, ``"answers"``, ``"tokens"``): drafts for a later read that should
        verify those and decode the others afresh."""
        tags = {_KINDS[k] for k in kinds}
        return Reads(self.probabilities, self.texts, self.tokens, {k: v for k, v in self.rows.items() if k[0] in tags})


_KINDS = {"continuations": "c", "answers": "a", "tokens": "t"}


def read(adapter, asks: Asks, drafts: Optional[Reads] = None, probabilities: Optional[List[float]] = None) -> Reads:
    """Read ``asks`` on the current weights. ``drafts``: an earlier read of the same asks (its tokens are
    verified, not decoded again); ``probabilities``: the pairs' probabilities when already read elsewhere
    (e.g. by the edit's verification)."""
    tok = adapter.tokenizer
    eos = eos_ids(adapter, tok)
    keys, starts, limits, stops, decoders = [], [], [], [], []

    def add(key, row_tok, text, limit, stop=None):
        keys.append(key), starts.append(list(row_tok(text)["input_ids"])), limits.append(int(limit))
        stops.append(stop), decoders.append(row_tok)

    for name, text, limit, other in asks.continuations:
        add(("c", name), other or tok, text, limit)
    stop = sentence_stop(tok)
    for name, text, limit in asks.answers:
        add(("a", name), tok, text, limit, stop)
    for name, prompts, limit in asks.tokens:
        for j, p in enumerate(prompts):
            add(("t", name, j), tok, p, limit)
    old = [drafts.rows.get(k, []) for k in keys] if drafts is not None else None  # a row without one: decoded
    rows = greedy_rows(adapter, starts, limits, stops, drafts=old, eos=eos) if keys else []
    by_key = dict(zip(keys, rows))
    texts = {}
    for (kind, *name), row, dec in zip(keys, rows, decoders):
        if kind == "c":
            texts[name[0]] = dec.decode(row, skip_special_tokens=True)
        elif kind == "a":
            texts[name[0]] = answer_text(dec, row, eos)
    tokens = {name: pad_finished([by_key[("t", name, j)] for j in range(len(prompts))], pad_id(tok))
              for name, prompts, _ in asks.tokens}
    if probabilities is None:
        probabilities = [probability(lp) for lp in target_logprobs(adapter, [p for p, _ in asks.pairs],
                                                                   [t for _, t in asks.pairs])] if asks.pairs else []
    return Reads(list(probabilities), texts, tokens, by_key)

