"""Average causal traces over many known facts, by token class, and recommend an edit layer.

    avg = TraceAverage(n_layers=30)
    for fact in known_facts(adapter, load_known_facts("known_1000.json"), limit=100):
        avg.update(trace_prompt(adapter, fact.prompt, fact.subject, fact.answer, cfg, sigma))
    avg.effects("mlp")          # (6 token classes, layers) average indirect effect
    avg.recommended_layer       # argmax of the MLP row "last_subject"

Indirect effect of a cell = P(answer | corrupted, cell restored) − P(answer | corrupted).
Token classes follow the ROME paper (Meng et al. 2022, Fig. 2); see :func:`factedit.tracing.token_classes`.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch

from ..core.batching import pad_id, pad_rows
from ..core.errors import FactEditError, TraceError
from ..core.known_facts import KnownFact
from .causal import KINDS, TOKEN_CLASSES, TraceResult, prepare_prompt, token_classes

__all__ = ["TOKEN_CLASSES", "CLASS_LABELS", "token_classes", "TraceAverage", "known_facts"]

CLASS_LABELS = {
    "first_subject": "First subject token", "middle_subject": "Middle subject tokens",
    "last_subject": "Last subject token", "first_subsequent": "First subsequent token",
    "further": "Further tokens", "last": "Last token",
}


class TraceAverage:
    """Streaming average of indirect effects by token class (``update()`` returns self).

    Every token of a class counts once (a fact with three middle subject tokens adds three).
    """

    def __init__(self, n_layers: int, kinds: Sequence[str] = KINDS):
        self.n_layers, self.kinds = n_layers, tuple(kinds)
        C = len(TOKEN_CLASSES)
        self.sums = {k: torch.zeros(C, n_layers, dtype=torch.float64) for k in self.kinds}
        self.counts = torch.zeros(C, dtype=torch.float64)
        self.n = 0
        self.p_clean_sum = self.p_corrupt_sum = 0.0

    def update(self, result: TraceResult) -> "TraceAverage":
        missing = [k for k in self.kinds if k not in result.scores]
        if missing or result.n_layers != self.n_layers:
            raise TraceError(f"trace lacks kinds {missing} or has {result.n_layers} layers, not {self.n_layers}")
        classes = token_classes(len(result.tokens), result.subject_range)
        for c, name in enumerate(TOKEN_CLASSES):
            pos = classes[name]
            self.counts[c] += len(pos)
            for k in self.kinds:
                if pos:
                    self.sums[k][c] += (result.scores[k][pos] - result.p_corrupt).sum(0)
        self.n += 1
        self.p_clean_sum += result.p_clean
        self.p_corrupt_sum += result.p_corrupt
        return self

    def effects(self, kind: str) -> torch.Tensor:
        """(classes, layers) average indirect effect; NaN for a class no fact had."""
        return self.sums[kind] / self.counts[:, None]

    @property
    def p_clean(self) -> float:
        return self.p_clean_sum / max(self.n, 1)

    @property
    def p_corrupt(self) -> float:
        return self.p_corrupt_sum / max(self.n, 1)

    def mlp_curve(self) -> Optional[List[float]]:
        """Average MLP indirect effect at the last subject token, per layer."""
        if "mlp" not in self.kinds or not self.n:
            return None
        return self.effects("mlp")[TOKEN_CLASSES.index("last_subject")].tolist()

    @property
    def recommended_layer(self) -> Optional[int]:
        curve = self.mlp_curve()
        return None if curve is None else int(torch.tensor(curve).argmax())

    def to_dict(self) -> dict:
        out = {"n_facts": self.n, "layers": list(range(self.n_layers)), "classes": list(TOKEN_CLASSES),
               "class_counts": self.counts.tolist(), "p_clean": self.p_clean, "p_corrupt": self.p_corrupt}
        for k in KINDS:
            out[k] = [[_num(x) for x in row] for row in self.effects(k).tolist()] if k in self.kinds else None
        out["recommended_layer"] = self.recommended_layer
        return out


def _num(x: float) -> Optional[float]:
    return None if x != x else x  # NaN -> null in JSON


def known_facts(adapter, facts: Sequence[KnownFact], limit: Optional[int] = None,
                batch_size: int = 32) -> Iterator[KnownFact]:
    """The facts whose answer's first token is the model's greedy next token (at most ``limit``).

    Facts that cannot be traced (subject missing from the prompt, answer not a continuation)
    are skipped. Prompts are checked ``batch_size`` at a time (right-padded, one forward).
    """
    found = 0
    for b in range(0, len(facts), batch_size):
        chunk = []
        for f in facts[b: b + batch_size]:
            try:
                chunk.append((f, prepare_prompt(adapter.tokenizer, f.prompt, f.subject, f.answer,
                                                adapter.max_positions)))
            except FactEditError:
                continue
        if not chunk:
            continue
        for f, ok in zip([f for f, _ in chunk], _greedy_matches(adapter, [tp for _, tp in chunk])):
            if limit is not None and found >= limit:
                return
            if ok:
                found += 1
                yield f


@torch.no_grad()
def _greedy_matches(adapter, prompts) -> List[bool]:
    batch = pad_rows([tp.ids for tp in prompts], pad_id(adapter.tokenizer), device=adapter.input_device)
    h = adapter.body(**batch.inputs()).last_hidden_state
    last = h[torch.arange(len(prompts), device=h.device), batch.last_index.to(h.device)]
    greedy = adapter.logits(last).argmax(-1).tolist()
    return [g == tp.answer_id for g, tp in zip(greedy, prompts)]
