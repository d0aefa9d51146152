"""Editing methods: one small module each, a config dataclass plus its update rule."""

from .rome import ROMEConfig, ROME_VARIANTS, compute_rome

__all__ = ["ROMEConfig", "ROME_VARIANTS", "compute_rome", "METHODS"]

#: method name -> config class
METHODS = {name: ROMEConfig for name in ROME_VARIANTS}
