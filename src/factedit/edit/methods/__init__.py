"""Editing methods: one small module each (a config dataclass, its update rule, and its registration),
the registry that names them (:mod:`.registry`), what they share (:mod:`.base`) and the options every front
end hands over (:mod:`.options`). Importing this package registers the built-in methods; adding a method is
one module that calls :func:`register` (docs/EXTENDING.md).

    cfg = make_config(adapter, MethodOptions("memit", layers=(4, 5, 6)))
    computed = REGISTRY["memit"].compute(adapter, caches, requests, cfg, state=None)
"""

from __future__ import annotations

# isort: off
# each registers its methods; the registration order is the order users see them in (ROME variants first)
from . import rome, batch, ft, ultraedit  # noqa: F401
# isort: on
from .base import StatsFields, default_layer, default_span, default_stats_tokens
from .batch import BATCH_METHODS, BatchConfig
from .ft import FTConfig
from .options import COMMON_OPTIONS, MethodOptions, parse_options, with_options
from .registry import METHODS, REGISTRY, MethodSpec, make_config, method_names, method_spec, register
from .rome import ROME_VARIANTS, ROMEConfig
from .ultraedit import UltraEditConfig

__all__ = ["MethodSpec", "MethodOptions", "REGISTRY", "METHODS", "COMMON_OPTIONS", "register", "method_spec",
           "method_names", "make_config", "parse_options", "with_options", "StatsFields", "default_layer",
           "default_span", "default_stats_tokens", "ROMEConfig", "BatchConfig", "FTConfig", "ROME_VARIANTS",
           "BATCH_METHODS", "UltraEditConfig"]
