"""KV caches across transformers versions: the argument and output field were ``past_key_values``
and are ``cache`` since transformers 5.2x (the old name warns, and goes in 5.40).

    out = adapter.body(input_ids=prefix, use_cache=True)
    h = adapter.body(input_ids=rest, **past(adapter.body, cache_of(out))).last_hidden_state
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["past", "cache_of"]


@functools.lru_cache(maxsize=None)
def _argument(cls) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def past(module, cache) -> dict:
    """The keyword arguments that hand ``cache`` to ``module``'s forward (None: no cache in, none kept)."""
    if cache is None:
        return {"use_cache": False}
    return {_argument(type(module)): cache, "use_cache": True}


def cache_of(out):
    """The KV cache a forward returned (None if it kept none)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    if "cache" in keys:
        return out["cache"]
    return out["past_key_values"] if "past_key_values" in keys else None
