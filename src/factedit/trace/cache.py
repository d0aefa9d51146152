"""Per-model caches of causal tracing: the noise scale and the recommended edit layer.

    sigma = noise_sigma(adapter)              # 3 × embedding std over subjects, cached
    rec = load_recommendation(adapter)        # None unless `factedit trace --dataset` ran

JSON files under ``$FACTEDIT_HOME/trace/<model fingerprint>/``, written atomically and
validated on read: a damaged noise file is recomputed; a damaged or foreign recommendation
is ignored with a warning, so ``factedit edit`` falls back to the depth rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from ..core.paths import atomic_write_text, factedit_home
from ..core.tokens import prefix_tag

__all__ = ["DEFAULT_SUBJECTS", "trace_dir", "embedding_std", "noise_sigma", "LayerRecommendation",
           "save_recommendation", "load_recommendation"]

log = logging.getLogger(__name__)

#: Subjects over which the embedding std is measured (people, places, organisations, works, things).
DEFAULT_SUBJECTS: Tuple[str, ...] = (
    "Eiffel Tower", "Space Needle", "Colosseum", "Great Wall of China", "Statue of Liberty", "Big Ben",
    "Mount Everest", "Amazon River", "Lake Victoria", "Sahara", "Antarctica", "Iceland", "Brazil", "Japan",
    "Canada", "Nigeria", "Paris", "Tokyo", "Berlin", "Buenos Aires", "Istanbul", "Sydney", "Toronto",
    "Cairo", "Mumbai", "Stockholm", "Albert Einstein", "Marie Curie", "Isaac Newton", "Leonardo da Vinci",
    "William Shakespeare", "Ludwig van Beethoven", "Frida Kahlo", "Nelson Mandela", "Barack Obama",
    "Angela Merkel", "Lionel Messi", "Serena Williams", "Michael Jordan", "Pablo Picasso", "Jane Austen",
    "Charles Darwin", "Ada Lovelace", "Mahatma Gandhi", "Queen Victoria", "Napoleon Bonaparte",
    "Toyota", "Microsoft", "Apple", "Nokia", "BMW", "Samsung", "IBM", "Google", "Nintendo", "Airbus",
    "Boeing", "Volkswagen", "Sony", "BBC", "NASA", "United Nations", "Harvard University",
    "University of Oxford", "Real Madrid", "Manchester United", "New York Yankees", "Los Angeles Lakers",
    "The Beatles", "Hamlet", "War and Peace", "Mona Lisa", "The Godfather", "Star Wars", "Harry Potter",
    "Windows 95", "iPhone", "PlayStation", "Python", "Linux", "Danielle Darrieux", "Toko Yasuda",
    "Autonomous University of Madrid", "Vinson Massif", "Giuseppe Angeli", "Thames", "Danube",
    "Kilimanjaro", "Yellowstone National Park", "Louvre", "Sagrada Familia", "Taj Mahal", "Acropolis",
    "Machu Picchu", "Golden Gate Bridge", "Sydney Opera House", "Hollywood", "Wall Street", "Silicon Valley",
)


def trace_dir(adapter, home: Optional[Path] = None) -> Path:
    """``$FACTEDIT_HOME/trace/<fingerprint of the whole model>``."""
    from ..core.fingerprints import model_fingerprint

    # the prompt prefix changes every traced prompt, so its results live apart
    return (home or factedit_home()) / "trace" / (model_fingerprint(adapter.model, spec=adapter.spec)
                                                   + prefix_tag(adapter.tokenizer))


@torch.no_grad()
def embedding_std(adapter, subjects: Sequence[str] = DEFAULT_SUBJECTS) -> float:
    """Standard deviation of all entries of the subjects' token embeddings (float64)."""
    tok = adapter.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"] if i not in special]
    if len(ids) < 2:
        raise ValueError("need at least two subject tokens to measure the embedding std")
    emb = adapter.embed(torch.tensor([ids], device=adapter.input_device))
    return float(emb.double().std())


def noise_sigma(adapter, factor: float = 3.0, subjects: Sequence[str] = DEFAULT_SUBJECTS,
                cache: bool = True) -> float:
    """``factor`` × :func:`embedding_std`; the std is computed once per model and subject set."""
    key = hashlib.sha256("\n".join(subjects).encode()).hexdigest()[:12]
    path = trace_dir(adapter) / f"noise-{key}.json"
    std = _read_std(path, len(subjects)) if cache else None
    if std is None:
        std = embedding_std(adapter, subjects)
        if cache:
            atomic_write_text(path, json.dumps({"embedding_std": std, "n_subjects": len(subjects)}))
    return float(factor) * std


def _read_std(path: Path, n_subjects: int) -> Optional[float]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        std = obj["embedding_std"]
        if obj["n_subjects"] == n_subjects and isinstance(std, float) and math.isfinite(std) and std > 0:
            return std
        log.warning("ignoring invalid noise cache %s; recomputing", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError):
        log.warning("ignoring unreadable noise cache %s; recomputing", path)
    return None


@dataclass(frozen=True)
class LayerRecommendation:
    """The edit layer chosen by causal tracing over known facts.

    Attributes:
        layer: argmax of ``curve``.
        curve: average MLP indirect effect at the last subject token, one value per layer.
        n_facts: facts averaged; samples / window: trace settings; source: data set path.
    """

    layer: int
    curve: Tuple[float, ...]
    n_facts: int
    samples: int
    window: int
    source: str = ""


def save_recommendation(adapter, rec: LayerRecommendation) -> Path:
    path = trace_dir(adapter) / "recommendation.json"
    obj = asdict(rec)
    obj["curve"] = list(rec.curve)
    obj["n_layers"] = adapter.n_layers
    atomic_write_text(path, json.dumps(obj, indent=1))
    return path


def load_recommendation(adapter) -> Optional[LayerRecommendation]:
    """The cached recommendation for this exact model, or ``None`` (missing or invalid: warned)."""
    path = trace_dir(adapter) / "recommendation.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable layer recommendation %s", path)
        return None
    try:
        rec = LayerRecommendation(layer=obj["layer"], curve=tuple(float(x) for x in obj["curve"]),
                                  n_facts=int(obj["n_facts"]), samples=int(obj["samples"]),
                                  window=int(obj["window"]), source=str(obj.get("source", "")))
        ok = (obj.get("n_layers") == adapter.n_layers and isinstance(rec.layer, int)
              and not isinstance(rec.layer, bool) and 0 <= rec.layer < adapter.n_layers
              and len(rec.curve) == adapter.n_layers and rec.n_facts > 0)
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        log.warning("ignoring invalid layer recommendation %s", path)
        return None
    return rec
