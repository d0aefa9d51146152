"""Exceptions raised by factedit. Every user-facing failure is a :class:`FactEditError`.

The CLI turns any ``FactEditError`` into a one-paragraph message on stderr and exit code 2;
anything else is a bug.
"""

__all__ = [
    "FactEditError",
    "RequestError",
    "ArchitectureError",
    "LayerError",
    "StatsError",
    "CorpusError",
    "ModelLoadError",
    "MethodError",
    "TraceError",
    "DataError",
    "UnverifiedEditError",
]


class FactEditError(Exception):
    """Base class: a clear, user-facing error. The model is left as it was."""


class RequestError(FactEditError, ValueError):
    """The edit request is malformed (template, subject, target)."""


class ArchitectureError(FactEditError):
    """The model's module layout is not known and no override was given."""


class LayerError(FactEditError, ValueError):
    """A layer index is out of range for the model."""


class StatsError(FactEditError):
    """Key statistics are missing, unreadable or numerically invalid."""


class CorpusError(FactEditError):
    """The text corpus for statistics cannot be read or is empty."""


class ModelLoadError(FactEditError):
    """The model could not be loaded."""


class MethodError(FactEditError, ValueError):
    """Unknown editing method or invalid method configuration."""


class TraceError(FactEditError, ValueError):
    """A causal-trace setting or data set is invalid (window, samples, known-facts file)."""


class DataError(FactEditError, ValueError):
    """A data file (known facts, ...) cannot be read or is malformed."""


class UnverifiedEditError(FactEditError):
    """An edit did not take on its own prompt and the caller asked not to keep such edits."""


class FlaggedEditError(FactEditError):
    """An edit's blast radius was flagged (it changed what the model says about other subjects) and the caller
    asked not to keep such edits (``--strict``)."""
