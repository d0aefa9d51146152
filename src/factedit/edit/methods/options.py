"""Setting any field of a method's config by name, as ``factedit edit/eval --set KEY=VALUE`` does:
``norm_constraint=0.01`` (FT), ``value.lr=0.1`` (a field of the nested value-optimisation config),
``context_lengths=[[5,10]]``. Values given as text are converted to the type of the field they set."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, is_dataclass, replace
from typing import Any, Mapping, Sequence, Tuple

from ...core.errors import MethodError

__all__ = ["parse_options", "with_options", "to_jsonable"]

#: config fields that are not options: the module layout (--arch-spec) and what a config records
NOT_OPTIONS = ("arch", "layer_rule")


def parse_options(items: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
    """``["a=1", "value.lr=0.1"]`` -> ``(("a", "1"), ("value.lr", "0.1"))``; a clear error otherwise."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"--set takes KEY=VALUE (e.g. value.lr=0.1), got {item!r}")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def _convert(text: Any, current: Any, key: str) -> Any:
    """``text`` as a value of the type of ``current`` (the field's present value)."""
    if not isinstance(text, str):
        return _tuples(text)  # already typed (Python callers)
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        if isinstance(current, str):
            return text
        if isinstance(current, tuple):
            value = json.loads(text)
            if not isinstance(value, list):
                raise ValueError(text)
            return _tuples(value)
    except ValueError:
        raise MethodError(f"--set {key}: {text!r} is not a valid {type(current).__name__}") from None
    if current is None:  # an optional field left to its model-derived default: a JSON value, or text
        try:
            return _tuples(json.loads(text))
        except ValueError:
            return text
    raise MethodError(f"--set {key}: this field ({type(current).__name__}) cannot be set from text")


def _tuples(value):
    """JSON lists as (nested) tuples: config dataclasses are frozen and hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def with_options(cfg, options: Mapping[str, Any]):
    """A copy of the config dataclass ``cfg`` with each ``"field"`` or ``"nested.field"`` of
    ``options`` set; an unknown name is an error listing the fields that exist."""
    for key, value in options.items():
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj, path, value, key):
    names = {f.name for f in fields(obj)}
    head = path[0]
    if head not in names or head in NOT_OPTIONS:
        choices = ", ".join(sorted(n for n in names if n not in NOT_OPTIONS))
        raise MethodError(f"--set {key}: {type(obj).__name__} has no option {head!r}; options: {choices}")
    current = getattr(obj, head)
    if len(path) > 1:
        if not is_dataclass(current):
            raise MethodError(f"--set {key}: {head!r} has no sub-options")
        return replace(obj, **{head: _set(current, path[1:], value, key)})
    if is_dataclass(current):
        sub = ", ".join(f"{head}.{f.name}" for f in fields(current))
        raise MethodError(f"--set {key}: set one of its fields instead: {sub}")
    return replace(obj, **{head: _convert(value, current, key)})


def to_jsonable(x):
    """A config (nested dataclasses, tuples, dicts) as plain JSON values; anything else as ``str``."""
    if is_dataclass(x):
        return {k: to_jsonable(v) for k, v in asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
