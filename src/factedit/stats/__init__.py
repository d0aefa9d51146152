"""Key statistics C = E[k kᵀ] per layer: text corpora (:mod:`.corpus`) and the streamed,
mergeable, cached second moments (:mod:`.layer`). Builds on :mod:`factedit.core` only."""

from .layer import LayerStats, SecondMoment, layer_stats

__all__ = ["LayerStats", "SecondMoment", "layer_stats"]
