"""Without a base: which MLP output matrices look edited, from their spectra alone (``factedit audit --suspect``).

A ROME-family edit adds a rank-one (MEMIT: low-rank) update to W_out; when its norm is comparable to the
matrix's leading singular values it lifts one of them away from the rest, a spike trained matrices of the same
model do not have. Per decoder layer the score is the gap between the two largest singular values,
``log(σ₁/σ₂)``, standardised against the other layers of the same model by median and MAD (``z``: robust
z-score; edits touch a few layers, so the median and MAD are the unedited layers'). A matrix with ``z`` above
``threshold`` is flagged. This sees only what moves the top of the spectrum: an update small against σ₁ or
spread over many directions leaves no spike, so a clean score is never a proof that nothing was edited; the
measured detection rates are in docs/AUDIT.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import List, Optional

from ..core.arch import ARCH_SPECS
from .spectrum import top_singular_values
from .tensors import AuditError

__all__ = ["SpectralScore", "spectral_scores", "DEFAULT_THRESHOLD", "BaseFreeReport"]

#: the robust z-score above which a matrix is flagged (chosen from the measurement in docs/AUDIT.md)
DEFAULT_THRESHOLD = 3.5


@dataclass
class SpectralScore:
    name: str
    layer: int
    top: List[float]  # the largest singular values
    gap: float  # log(σ₁/σ₂)
    z: float = 0.0
    flagged: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "singular_values": self.top, "gap": self.gap, "z": self.z,
                "flagged": self.flagged}


def spectral_scores(files, threshold: float = DEFAULT_THRESHOLD) -> List[SpectralScore]:
    """The score of every layer's W_out of an opened model (:class:`~factedit.audit.tensors.TensorFiles`)."""
    spec = ARCH_SPECS.get(files.model_type)
    if spec is None:
        raise AuditError(f"model_type {files.model_type!r} has no known layout here: no W_out to score")
    out = []
    prefix = spec.layers + "."
    suffix = "." + spec.w_out + ".weight"
    for name in files.names:
        if name.startswith(prefix) and name.endswith(suffix):
            head = name[len(prefix):-len(suffix)]
            if head.isdigit():
                top = top_singular_values(files.lazy(name))
                out.append(SpectralScore(name, int(head), top, math.log(top[0] / max(top[1], 1e-300))))
    if len(out) < 3:
        raise AuditError("fewer than 3 layers: a layer's spectrum has nothing to be compared with")
    gaps = [s.gap for s in out]
    med = statistics.median(gaps)
    mad = statistics.median(abs(g - med) for g in gaps) * 1.4826 or 1e-12
    for s in out:
        s.z = (s.gap - med) / mad
        s.flagged = s.z > threshold
    return sorted(out, key=lambda s: s.layer)


@dataclass
class BaseFreeReport:
    suspect: str
    scores: List[SpectralScore]
    threshold: float

    @property
    def verdict(self) -> str:
        return "suspicious" if any(s.flagged for s in self.scores) else "nothing suspicious found"

    def to_dict(self) -> dict:
        return {"mode": "base-free", "verdict": self.verdict, "suspect": self.suspect, "threshold": self.threshold,
                "flagged": [s.layer for s in self.scores if s.flagged],
                "tensors": [s.to_dict() for s in self.scores]}

    def to_text(self) -> str:
        flagged = [s for s in self.scores if s.flagged]
        lines = [f"factedit audit (no base): {self.verdict}", f"  suspect {self.suspect}",
                 f"  {len(self.scores)} W_out matrices scored by the gap of their two largest singular values "
                 f"against the other layers (robust z; flagged above {self.threshold:g})"]
        for s in flagged:
            lines.append(f"    layer {s.layer}: z {s.z:.1f} (σ₁ {s.top[0]:.4g}, σ₂ {s.top[1]:.4g})")
        lines.append("  a clean score is no proof: edits small against σ₁ leave no spike (docs/AUDIT.md); with the "
                     "base model, --base finds every edit")
        return "\n".join(lines)


def audit_without_base(files, threshold: Optional[float] = None) -> BaseFreeReport:
    t = DEFAULT_THRESHOLD if threshold is None else threshold
    return BaseFreeReport(files.label, spectral_scores(files, t), t)
