"""What a user chooses about an edit (:class:`MethodOptions`, the one form every front end — the command
line, the evaluation, the web page and :meth:`Editor.make_config` — hands to
:func:`~factedit.edit.methods.registry.make_config`), and setting any field of a method's config by name, as
``factedit edit/eval --set KEY=VALUE`` does: ``norm_constraint=0.01`` (FT), ``value.lr=0.1`` (a field of the
nested value-optimisation config), ``context_lengths=[[5,10]]``. Values given as text are converted to the
type of the field they set.

    opts = MethodOptions("memit", layers=(4, 5, 6), steps=10, fields=parse_options(["value.lr=0.1"]))
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass, replace
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from ...core.errors import MethodError

__all__ = ["MethodOptions", "COMMON_OPTIONS", "parse_options", "with_options", "to_jsonable", "from_jsonable"]

#: config fields that are not options: what a config records about how it was made
NOT_OPTIONS = ("method", "layer_rule")
#: options every front end passes; a method whose config lacks one ignores it
COMMON_OPTIONS = ("stats_corpus", "stats_tokens", "stats_seq_len", "stats_dtype", "seed")


@dataclass(frozen=True)
class MethodOptions:
    """What a user chooses about an edit, whatever front end they use. ``None``: the method's default
    (derived from the model where it depends on it).

    Attributes:
        method: a registered method name.
        layer: the edited layer of a single-layer method (or ``"traced"``: the cached causal-trace
            recommendation, resolved by :meth:`Editor.make_config`).
        layers: the edited span of a multi-layer method (a single-layer method takes a span of one).
        steps: the method's optimisation steps (its ``steps`` or ``value.steps``).
        target_batch: targets optimised together (the config's ``batch_size``; methods that have one).
        seed: seed of the context templates.
        stats_corpus, stats_tokens, stats_seq_len, stats_dtype: the key statistics (see
            :class:`~factedit.edit.methods.base.StatsFields`).
        fields: any other config field, ``(("value.lr", "0.1"), ...)``, set last (``--set``; text or typed).
        layer_rule: how the layer was chosen, when not by the user or the depth rule (filled in by the
            Editor for ``"traced"``).
        hparams: a ROME/MEMIT-repository JSON or EasyEdit YAML hyperparameter file read under the other options
            (:mod:`~factedit.edit.methods.hparams`; what is given besides it wins).
    """

    method: str = "r-rome"
    layer: Optional[Union[int, str]] = None
    layers: Optional[Tuple[int, ...]] = None
    steps: Optional[int] = None
    target_batch: Optional[int] = None
    seed: Optional[int] = None
    stats_corpus: Optional[str] = None
    stats_tokens: Optional[int] = None
    stats_seq_len: Optional[int] = None
    stats_dtype: Optional[str] = None
    fields: Tuple[Tuple[str, Any], ...] = ()
    layer_rule: str = ""
    hparams: Optional[str] = None

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fields", tuple(tuple(kv) for kv in self.fields))

    @property
    def common(self) -> dict:
        """The :data:`COMMON_OPTIONS` (``None`` where not given)."""
        return {k: getattr(self, k) for k in COMMON_OPTIONS}

    @classmethod
    def of(cls, method: str = "r-rome", options=(), **overrides) -> "MethodOptions":
        """From :meth:`Editor.make_config`'s arguments: each named option to its field, any other keyword a
        config field set as given (before ``options``, the ``--set`` pairs or a mapping)."""
        named = {f.name for f in fields(cls)} - {"method", "fields"}
        own = {k: v for k, v in overrides.items() if k in named}
        extra = tuple((k, v) for k, v in overrides.items() if k not in named)
        given = tuple(options.items()) if isinstance(options, Mapping) else tuple(options or ())
        return cls(method=method, fields=extra + given, **own)

    def to_pairs(self) -> Tuple[Tuple[str, Any], ...]:
        """The options given, as sorted ``(name, value)`` pairs (``"options"``: the fields), the form an
        evaluation run records and compares; :meth:`from_pairs` reads it back."""
        out = {k: getattr(self, k) for k in ("layer", "layers", "steps", "target_batch", *COMMON_OPTIONS)}
        if self.fields:
            out["options"] = self.fields
        if self.layer_rule:
            out["layer_rule"] = self.layer_rule
        if self.hparams:
            out["hparams"] = self.hparams
        return tuple(sorted((k, v) for k, v in out.items() if v is not None))

    @classmethod
    def from_pairs(cls, method: str, pairs) -> "MethodOptions":
        return cls.of(method, **dict(pairs))


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
    if is_dataclass(current) and isinstance(value, type(current)):  # a whole nested config (Python callers)
        return replace(obj, **{head: value})
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


def from_jsonable(cls, data: Mapping[str, Any], ignore: Sequence[str] = ()):
    """The config dataclass ``cls`` from its :func:`to_jsonable` form: nested configs rebuilt, JSON lists
    as tuples (``from_jsonable(type(c), to_jsonable(c)) == c``). Keys named in ``ignore`` are dropped; any
    other key that is not a field is an error."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names) - set(ignore))
    if unknown:
        raise MethodError(f"{cls.__name__} has no field {unknown[0]!r}")
    kwargs = {}
    for name, f in names.items():
        if name not in data:
            continue
        value = data[name]
        proto = f.default_factory() if f.default_factory is not MISSING else f.default
        kwargs[name] = from_jsonable(type(proto), value) if is_dataclass(proto) and isinstance(value, Mapping) \
            else _tuples(value)
    return cls(**kwargs)
