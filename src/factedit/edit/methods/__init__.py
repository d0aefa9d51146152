"""Editing methods: one small module each, a config dataclass plus its update rule."""

from .batch import BATCH_METHODS, BatchConfig, compute_batch
from .ft import FTConfig, compute_ft
from .rome import ROME_VARIANTS, ROMEConfig, compute_rome

__all__ = ["ROMEConfig", "BatchConfig", "FTConfig", "ROME_VARIANTS", "BATCH_METHODS", "METHODS",
           "compute_rome", "compute_batch", "compute_ft"]

#: method name -> config class
METHODS = {**{name: ROMEConfig for name in ROME_VARIANTS}, **{name: BatchConfig for name in BATCH_METHODS},
           "ft": FTConfig}
