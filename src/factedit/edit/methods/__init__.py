"""Editing methods: one small module each (a config dataclass plus its update rule), and the
registry that names them. The CLI's help, the evaluation runner and the Editor take the method
names from :data:`REGISTRY`; adding a method is one :func:`register` call (docs/EXTENDING.md).

    cfg = make_config(adapter, "memit", layers=(4, 5, 6))
    computed = REGISTRY["memit"].compute(adapter, caches, requests, cfg, state=None)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Optional

from ...core.errors import MethodError
from .batch import BATCH_METHODS, BatchConfig, compute_batch
from .ft import FTConfig, compute_ft
from .options import with_options
from .rome import ROME_VARIANTS, ROMEConfig, compute_rome, compute_rome_edit

__all__ = ["MethodSpec", "REGISTRY", "METHODS", "register", "method_spec", "make_config", "ROMEConfig",
           "BatchConfig", "FTConfig", "ROME_VARIANTS", "BATCH_METHODS", "compute_rome", "compute_batch", "compute_ft"]

#: options every command passes; a method whose config lacks one ignores it
COMMON_OPTIONS = ("stats_corpus", "stats_tokens", "stats_seq_len", "stats_dtype", "seed")


@dataclass(frozen=True)
class MethodSpec:
    """One registered editing method.

    Attributes:
        name: the name users pass (``--method``).
        config: its config dataclass (frozen; ``resolved(adapter)`` fills model-derived defaults).
        compute: ``(adapter, caches, requests, config, state) -> Computed``; must leave the weights
            as it found them.
        single_request: the method edits one request per computation (ROME): several requests are
            edited one after another.
        defaults: config fields this name sets (e.g. ``{"variant": "rome"}``).
    """

    name: str
    config: type
    compute: Callable
    single_request: bool = False
    defaults: Dict[str, object] = field(default_factory=dict)

    @property
    def single_layer(self) -> bool:
        return "layer" in {f.name for f in fields(self.config)}


#: name -> :class:`MethodSpec`, in registration order (the first is the default)
REGISTRY: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a name may be registered once)."""
    if spec.name in REGISTRY:
        raise MethodError(f"method {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    METHODS[spec.name] = spec.config
    return spec


#: name -> config class of every registered method (kept in step with :data:`REGISTRY`)
METHODS: Dict[str, type] = {}

for _name in ROME_VARIANTS:
    register(MethodSpec(_name, ROMEConfig, compute_rome_edit, single_request=True, defaults={"variant": _name}))
for _name in BATCH_METHODS:
    register(MethodSpec(_name, BatchConfig, compute_batch, defaults={"method": _name}))
register(MethodSpec("ft", FTConfig, compute_ft))


def method_spec(method: str) -> MethodSpec:
    """The registered method ``method``; a clear error listing the names otherwise."""
    if method not in REGISTRY:
        raise MethodError(f"unknown method {method!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[method]


def spec_of_config(cfg) -> MethodSpec:
    """The registered method a config object belongs to (by its ``variant`` name)."""
    return method_spec(getattr(cfg, "variant", None) or "")


def make_config(adapter, method: str = "r-rome", options=(), **overrides):
    """The method's config dataclass with model-derived defaults filled in.

    ``layer`` and ``layers`` are accepted for every method (a single-layer method takes a span of
    one); ``steps`` sets the method's optimisation steps; :data:`COMMON_OPTIONS` a config lacks are
    ignored. ``options``: ``{"field" or "nested.field": value}`` (or pairs) set last, values given as
    text converted to the field's type (:func:`~factedit.edit.methods.options.with_options`).
    """
    spec = method_spec(method)
    names = {f.name for f in fields(spec.config)}
    for k, v in spec.defaults.items():
        overrides.setdefault(k, v)
    layer, layers = overrides.pop("layer", None), overrides.pop("layers", None)
    if spec.single_layer:
        if layers is not None:
            if len(layers) != 1:
                raise MethodError(f"{method} edits a single layer; got layers {list(layers)}")
            layer = layers[0]
        if layer is not None:
            overrides["layer"] = layer
    elif layers is not None or layer is not None:
        overrides["layers"] = tuple(layers) if layers is not None else (layer,)
    for k in COMMON_OPTIONS:
        if k not in names:
            overrides.pop(k, None)
    steps: Optional[int] = overrides.pop("steps", None)
    try:
        cfg = spec.config(**overrides)
    except TypeError as e:
        raise MethodError(f"invalid option for {method}: {e}") from None
    if steps is not None:
        cfg = with_options(cfg, {"steps" if "steps" in names else "value.steps": steps})
    return with_options(cfg, dict(options)).resolved(adapter)
