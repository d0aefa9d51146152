"""Metric functions shared by the guard and the evaluation harness."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

__all__ = ["ngram_entropy", "generation_entropy"]


def ngram_entropy(tokens: Sequence, n: int) -> float:
    """Entropy (bits) of the n-gram frequency distribution of a token sequence (0 if too short)."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    total = len(grams)
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def generation_entropy(tokens: Sequence) -> float:
    """ROME's fluency measure: weighted mean of bigram (2/3) and trigram (4/3) entropies."""
    return (2 / 3 * ngram_entropy(tokens, 2) + 4 / 3 * ngram_entropy(tokens, 3)) / 2
