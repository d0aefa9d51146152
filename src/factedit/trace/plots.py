"""Heatmaps of causal traces (matplotlib, Agg; no pyplot state), in the style of the ROME paper.

    plot_trace(result.to_dict(), "mlp", "out/mlp.png")      # tokens × layers, P(answer)
    plot_average(avg.to_dict(), "mlp", "out/average_mlp.png")

Both take the JSON objects that ``factedit trace`` writes, so plots can be redrawn from files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..core.paths import atomic_path

__all__ = ["plot_trace", "plot_average"]

_CMAP = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_WHAT = {"hidden": "state", "mlp": "MLP", "attn": "attention"}


def _figure(n_rows: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 1.2 + 0.3 * n_rows), dpi=150)
    FigureCanvasAgg(fig)
    return fig


def _xlabel(kind: str, window: int) -> str:
    if kind == "hidden":
        return "single restored layer"
    return f"center of interval of {window} restored {_WHAT[kind]} layers"


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plot_trace(trace: dict, kind: str, path, model: Optional[str] = None) -> Path:
    """Heatmap of ``trace[kind]`` (tokens × layers of P(answer)); subject tokens marked with ``*``."""
    import numpy as np

    s, e = trace["subject_range"]
    labels = [repr(t)[1:-1] + ("*" if s <= i < e else "") for i, t in enumerate(trace["tokens"])]
    fig = _figure(len(labels))
    ax = fig.add_subplot(1, 1, 1)
    scores = np.array([[np.nan if x is None else x for x in row] for row in trace[kind]], dtype=float)
    img = ax.pcolormesh(np.ma.masked_invalid(scores), cmap=_CMAP[kind],
                        vmin=min(trace["p_corrupt"], float(np.nanmin(scores))), shading="flat")
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5)
    ax.set_yticklabels(labels)
    ax.set_xticks(np.arange(0, scores.shape[1], max(1, scores.shape[1] // 10)) + 0.5)
    ax.set_xticklabels(list(range(0, scores.shape[1], max(1, scores.shape[1] // 10))))
    ax.set_title(f"Impact of restoring {_WHAT[kind]} after corrupted input"
                 + (f"\n{model}" if model else ""), fontsize=10)
    ax.set_xlabel(_xlabel(kind, trace.get("window", 10)))
    cb = fig.colorbar(img, ax=ax)
    cb.set_label(f"p({trace['answer'].strip()})")
    return _save(fig, path)


def plot_average(avg: dict, kind: str, path, model: Optional[str] = None, window: int = 10) -> Path:
    """Heatmap of the average indirect effect by token class (rows) and layer (columns)."""
    import numpy as np

    from .average import CLASS_LABELS

    scores = np.array([[np.nan if x is None else x for x in row] for row in avg[kind]], dtype=float)
    labels = [CLASS_LABELS[c] for c in avg["classes"]]
    fig = _figure(len(labels) + 2)
    ax = fig.add_subplot(1, 1, 1)
    img = ax.pcolormesh(np.ma.masked_invalid(scores), cmap=_CMAP[kind],
                        vmin=min(0.0, float(np.nanmin(scores))), shading="flat")
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5)
    ax.set_yticklabels(labels)
    step = max(1, scores.shape[1] // 10)
    ax.set_xticks(np.arange(0, scores.shape[1], step) + 0.5)
    ax.set_xticklabels(list(range(0, scores.shape[1], step)))
    ax.set_title(f"Average indirect effect of restoring {_WHAT[kind]} ({avg['n_facts']} facts)"
                 + (f"\n{model}" if model else ""), fontsize=10)
    ax.set_xlabel(_xlabel(kind, avg.get("window", window)))
    cb = fig.colorbar(img, ax=ax)
    cb.set_label("average indirect effect on p(answer)")
    return _save(fig, path)
