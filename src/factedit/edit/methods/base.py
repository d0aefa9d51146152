"""What the editing methods share: the rules that derive a method's layers and statistics from the model,
and the statistics fields of every method that reads key statistics and context templates.

    default_layer(30) == 5            # the edit layer of single-layer methods (SmolLM2's 30 layers)
    default_span(30) == (4, 5, 6, 7, 8)
    default_stats_tokens(1536) == 100_000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ...core.arch import ArchSpec
from ...core.errors import MethodError
from ...stats.layer import check_stats_options

__all__ = ["DEPTH_RULE", "SPAN_RULE", "GIVEN", "default_layer", "default_span", "default_stats_tokens",
           "check_layers", "StatsFields"]

#: how the default edit layer is chosen, as recorded in configs (the same in Python, `edit` and `eval`)
DEPTH_RULE = "depth rule: round(0.17 × layers)"
#: how the default span of a multi-layer method is chosen
SPAN_RULE = "depth rule: 5 layers ending at round(0.27 × layers)"
#: the layer rule of layers the user gave
GIVEN = "given"


def default_layer(n_layers: int) -> int:
    """Edit layer from depth: ~17% of the way up (GPT-J 28 → 5 as in ROME, SmolLM2 30 → 5)."""
    return max(0, min(n_layers - 1, round(0.17 * n_layers)))


def default_span(n_layers: int, width: int = 5) -> Tuple[int, ...]:
    """``width`` consecutive layers ending ~27% up the stack (GPT-J 28 → 4..8, MEMIT used 3..8;
    SmolLM2 30 → 4..8; GPT-2 XL 48 → 9..13)."""
    last = max(0, min(n_layers - 1, round(0.27 * n_layers)))
    return tuple(range(max(0, last - width + 1), last + 1))


def default_stats_tokens(d_ff: int) -> int:
    """Tokens for C from width: at least 100k and 64 per key dimension (C must be well conditioned)."""
    return max(100_000, 64 * d_ff)


def check_layers(adapter, layers) -> Tuple[int, ...]:
    """``layers`` as a tuple after checking each exists and that they are distinct and ascending."""
    layers = tuple(layers)
    if not layers:
        raise MethodError("layers must name at least one layer")
    for layer in layers:
        adapter.check_layer(layer)
    if list(layers) != sorted(set(layers)):
        raise MethodError(f"layers must be distinct and ascending, got {list(layers)}")
    return layers


@dataclass(frozen=True)
class StatsFields:
    """The fields every method with key statistics and context templates has (ROME and the batch family).

    Attributes:
        stats_corpus: corpus spec for C (see :mod:`factedit.stats.corpus`); ``None`` = ``"auto"``.
        stats_tokens: tokens for C; default :func:`default_stats_tokens` of the width.
        stats_seq_len: tokens per sequence of the statistics' forwards, whatever the model's context length
            (memory per forward: batch × this × d_ff × 4 bytes of keys).
        stats_dtype: the accumulator of ``sum k kᵀ``: ``"float64"`` (default) or ``"float32"`` (half the memory
            of a d_ff² buffer on the layer's device; docs/BENCHMARKS.md measures what it changes in edits).
        seed: seed of the context templates.
        arch: explicit module layout for architectures factedit does not know.
        layer_rule: how the layer(s) were chosen (filled in: ``"given"``, the depth rule, or the causal-trace
            recommendation when ``layer="traced"`` is passed to :meth:`Editor.make_config`).
    """

    stats_corpus: Optional[str] = None
    stats_tokens: Optional[int] = None
    stats_seq_len: int = 256
    stats_dtype: str = "float64"
    seed: int = 0
    arch: Optional[ArchSpec] = None
    layer_rule: str = ""

    def __post_init__(self):
        check_stats_options(self.stats_seq_len, self.stats_dtype)

    @property
    def stats_args(self) -> dict:
        """The statistics this config edits with, as :meth:`EditCaches.stats` takes them (after ``layer``)."""
        return {"corpus": self.stats_corpus, "n_tokens": self.stats_tokens, "seq_len": self.stats_seq_len,
                "dtype": self.stats_dtype}
