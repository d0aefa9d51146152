"""General ability that a small model actually shows, for tracking damage during sequential editing:
perplexity on held-out text and recall of the known facts the unedited model answers.

    ppl = perplexity(adapter, "wikitext2_test.txt", n_tokens=20_000)
    known = answered_facts(adapter, load_known_facts("known_1000.json"))   # before editing
    recall = fact_recall(adapter, known)                                   # after: share still answered

GLUE/MMLU few-shot accuracy (:mod:`.downstream`) sits at chance on a 135M model and so cannot show
damage there; these two are well above it (SmolLM2-135M: perplexity ~20-30 on WikiText-2, 279 of the
1,209 knowns answered by the first token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.batching import pad_id, pad_rows
from ..core.known_facts import KnownFact, load_known_facts
from ..core.request_files import read_utf8
from ..trace.average import known_facts
from .store import RunError

__all__ = ["AbilityConfig", "perplexity", "answered_facts", "fact_recall", "Ability"]


@dataclass(frozen=True)
class AbilityConfig:
    """What a sequential run tracks besides the downstream tasks.

    Attributes:
        ppl_corpus: text file for the perplexity (held out from the statistics' corpus, e.g.
            WikiText-2 *test* when the statistics read its validation split); ``None``: no perplexity.
        ppl_tokens: tokens of it scored (the first ones), in windows of ``window`` tokens.
        window: tokens per scored window (each window starts fresh: no context across windows).
        knowns: known-facts file (ROME's known_1000.json or JSONL); ``None``: no recall.
        batch_size: windows / prompts per forward pass.
    """

    ppl_corpus: Optional[str] = None
    ppl_tokens: int = 20_000
    window: int = 256
    knowns: Optional[str] = None
    batch_size: int = 16

    @property
    def enabled(self) -> bool:
        return bool(self.ppl_corpus or self.knowns)

    def check(self) -> None:
        if self.ppl_tokens < 2 or self.window < 2 or self.batch_size < 1:
            raise RunError("perplexity needs ppl_tokens >= 2, window >= 2 and batch_size >= 1")
        for name, path in (("--ppl-corpus", self.ppl_corpus), ("--knowns", self.knowns)):
            if path and not Path(path).is_file():
                raise RunError(f"{name}: file not found: {path}")


def _windows(adapter, text: str, n_tokens: int, window: int) -> List[List[int]]:
    ids = list(adapter.tokenizer(text)["input_ids"])[:n_tokens]
    window = min(window, adapter.max_positions or window)
    return [ids[i: i + window] for i in range(0, len(ids), window) if len(ids[i: i + window]) >= 2]


@torch.no_grad()
def perplexity(adapter, path, n_tokens: int = 20_000, window: int = 256, batch_size: int = 16) -> float:
    """exp of the mean next-token negative log-likelihood over the first ``n_tokens`` tokens of the
    text file ``path``, scored in consecutive windows of ``window`` tokens (every token but each
    window's first is predicted from the window's earlier tokens)."""
    wins = _windows(adapter, read_utf8(path), n_tokens, window)
    if not wins:
        raise RunError(f"{path}: too little text for a perplexity")
    total, count = 0.0, 0
    for b in range(0, len(wins), batch_size):
        part = wins[b: b + batch_size]
        batch = pad_rows(part, pad_id(adapter.tokenizer), device=adapter.input_device)
        h = adapter.body(**batch.inputs()).last_hidden_state
        logits = adapter.logits(h[:, :-1]).float()  # on the head's device
        target = batch.input_ids[:, 1:].to(logits.device)
        keep = batch.attention_mask[:, 1:].bool().to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        total += float(nll[keep.reshape(-1)].double().sum())
        count += int(keep.sum())
    return math.exp(total / count)


def answered_facts(adapter, facts: Sequence[KnownFact]) -> List[KnownFact]:
    """The facts whose answer's first token is the model's greedy next token (first-token recall)."""
    return list(known_facts(adapter, list(facts)))


def fact_recall(adapter, facts: Sequence[KnownFact]) -> Optional[float]:
    """The share of ``facts`` (those the unedited model answered) the model still answers."""
    return len(answered_facts(adapter, facts)) / len(facts) if facts else None


class Ability:
    """The measures of one run: the reference facts are found once, on the unedited weights."""

    def __init__(self, adapter, cfg: AbilityConfig):
        cfg.check()
        self.adapter, self.cfg = adapter, cfg
        self.facts = answered_facts(adapter, load_known_facts(cfg.knowns)) if cfg.knowns else None
        if self.facts is not None and not self.facts:
            raise RunError(f"the model answers none of the known facts in {cfg.knowns}")

    def measure(self, exclude_subjects: Sequence[str] = ()) -> dict:
        """``{"perplexity", "known_recall", "known_facts", "known_excluded"}`` on the current weights (None when
        not tracked). Facts whose subject is in ``exclude_subjects`` (compared without case; a run's edited
        subjects) are left out of the recall, so that it measures damage rather than the edits themselves;
        ``known_facts`` counts the facts it is over and ``known_excluded`` those left out."""
        c = self.cfg
        ppl = perplexity(self.adapter, c.ppl_corpus, c.ppl_tokens, c.window, c.batch_size) if c.ppl_corpus else None
        if self.facts is None:
            return {"perplexity": ppl, "known_recall": None, "known_facts": None, "known_excluded": None}
        skip = {s.strip().casefold() for s in exclude_subjects}
        kept = [f for f in self.facts if f.subject.strip().casefold() not in skip]
        return {"perplexity": ppl, "known_recall": fact_recall(self.adapter, kept) if kept else None,
                "known_facts": len(kept), "known_excluded": len(self.facts) - len(kept)}
