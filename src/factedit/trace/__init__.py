"""Causal tracing: prompt preparation and settings (:mod:`.causal`), the batched engine
(:mod:`.engine`), averages over known facts (:mod:`.average`, :mod:`.knowns`), per-model caches
(:mod:`.cache`) and heatmaps (:mod:`.plots`). Builds on :mod:`factedit.core` only."""
