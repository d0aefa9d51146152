"""ROME's context templates: the bare prompt plus short model-generated prefixes, over which
keys are averaged (k*) and the target is optimised.

    templates = cached_context_templates(adapter, seed=0)      # ["{}", "The ... . {}", ...]
"""

from __future__ import annotations

import json
from typing import List, Sequence

from ..core.fingerprints import model_fingerprint
from ..core.lm import sample_continuations
from ..core.paths import atomic_write_text, factedit_home
from ..core.tokens import prefix_tag

__all__ = ["context_templates", "cached_context_templates"]


def context_templates(adapter, seed: int = 0, lengths: Sequence[tuple] = ((5, 10), (10, 10))) -> List[str]:
    """ROME's context templates: ``"{}"`` plus model-generated prefixes, each ``"<text>. {}"``.

    ``lengths`` holds ``(tokens, count)`` pairs (ROME: 10 texts of 5 and 10 of 10 tokens).
    """
    tok = adapter.tokenizer
    out = ["{}"]
    for i, (length, count) in enumerate(lengths):
        for ids in sample_continuations(adapter, count, length, seed=seed * 1000 + i):
            text = tok.decode(ids, skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            out.append(f"{text}. {{}}")
    return out


def cached_context_templates(adapter, seed: int = 0, lengths: Sequence[tuple] = ((5, 10), (10, 10))) -> List[str]:
    """:func:`context_templates`, stored per (model, seed, lengths) under ``$FACTEDIT_HOME/templates``."""
    key = "-".join(f"{a}x{b}" for a, b in lengths)
    tag = prefix_tag(adapter.tokenizer)  # sampling starts from the prompt prefix
    path = factedit_home() / "templates" / f"{model_fingerprint(adapter.model)}{tag}-seed{seed}-{key}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, list) and cached and all(isinstance(t, str) and t.count("{}") == 1 for t in cached):
            return cached
    except (OSError, ValueError):
        pass  # missing or damaged: regenerate (deterministic) and rewrite atomically
    templates = context_templates(adapter, seed=seed, lengths=lengths)
    atomic_write_text(path, json.dumps(templates))
    return templates
