"""What an edit is before and after it is applied: :class:`Computed` (deltas plus what they came
from; nothing in the model changed) and :class:`EditResult` (applied, revertible)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..core.requests import Request
from .deltas import AppliedEdit, LayerDelta

__all__ = ["Computed", "EditResult", "ChainedEdit"]


@dataclass
class Computed:
    """An edit computed but not yet applied: deltas plus everything they came from."""

    deltas: List[LayerDelta]
    values: object  # ValueResult (ROME variants), else None
    info: List[dict]
    timings: Dict[str, float]
    config: object
    C: object = field(default=None, repr=False)
    # what this edit adds to its method's state (AlphaEdit: this batch's keys per layer); None: stateless
    state_update: Optional[dict] = field(default=None, repr=False)
    keys: Optional[dict] = field(default=None, repr=False)  # per layer the keys (d_ff, n) the update is for


@dataclass
class EditResult:
    """What one call of :meth:`Editor.edit` did (or one patch applied). Every field but ``applied`` travels
    with the edit's patch file and comes back when it is loaded (:mod:`factedit.patch.files`)."""

    method: str
    layers: List[int]
    requests: List[Request]
    deltas: List[LayerDelta]
    applied: AppliedEdit = field(repr=False, compare=False)
    config: object = field(repr=False)  # the method's config (its JSON form if the method is not registered)
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    info: List[dict] = field(default_factory=list)  # per request: what the method reports (losses, steps, ...)
    # what the edit folded into its method's state, one update per computation, in order (AlphaEdit: its keys)
    state_updates: List[dict] = field(default_factory=list, repr=False)
    fingerprints: Dict[str, str] = field(default_factory=dict, repr=False)  # edited matrices before the edit
    fingerprints_after: Dict[str, str] = field(default_factory=dict, repr=False)  # ... and right after it
    guard: Optional[dict] = None  # the collapse guard's decision (None: guard off)
    statistics: Dict[str, dict] = field(default_factory=dict)  # per layer: corpus used (and why), tokens
    verification: List[dict] = field(default_factory=list)  # per request: verified, p_new, p_true, ...
    retried: bool = False  # an unverified edit was optimised again within the retry budget
    prompt_prefix: str = ""  # what every prompt of the edit started with (core/tokens.py)
    side_effects: Optional[dict] = None  # the blast radius report (factedit.app.side_effects), when measured
    rounding: Dict[str, float] = field(default_factory=dict)  # per layer: update lost to the weights' dtype
    wear: Dict[str, dict] = field(default_factory=dict)  # per layer: the wear meter (factedit.edit.wear)

    @property
    def stateful(self) -> bool:
        """The edit changed its method's state (which a revert restores)."""
        return bool(self.state_updates)

    @property
    def verified(self) -> Optional[bool]:
        """Every request's edit took on its own prompt (:mod:`factedit.edit.verify`); None if unchecked."""
        return all(v["verified"] for v in self.verification) if self.verification else None

    @property
    def delta_norm(self) -> float:
        """Frobenius norm of the total update (summed per layer, then root-sum-square)."""
        by_layer: Dict[int, object] = {}
        for d in self.deltas:
            by_layer[d.layer] = by_layer.get(d.layer, 0) + d.dense()
        return math.sqrt(sum(float((m.double() ** 2).sum()) for m in by_layer.values()))

    def revert(self) -> None:
        self.applied.revert()


class ChainedEdit:
    """Several applied edits reverted newest first."""

    def __init__(self, adapter, parts):
        self.adapter = adapter
        self.parts = parts

    @property
    def originals(self) -> dict:
        """Per touched layer, the matrix before the first part touched it (what a full revert gives back)."""
        out: dict = {}
        for p in self.parts:
            for layer, w in getattr(p, "originals", {}).items():
                out.setdefault(layer, w)
        return out

    def revert(self):
        for p in reversed(self.parts):
            p.revert()
