"""What a difference between two tensors is: nothing, rounding, a low-rank update, or a dense change.

Pure functions on tensors (float64 inside):

* **rounding** is bounded by the format, not guessed: storing ``x`` in a float format of unit roundoff ``u``
  moves it by at most ``u·|x|`` (half an ulp; subnormals by half the smallest step), and a GGUF ``Q8_0`` block of
  32 values by at most half its step ``d = max|x|/127`` (``d`` itself kept in float16). A difference within one
  format's bound in every entry is that format's rounding (:data:`FORMATS`, tightest first);
* otherwise the singular values of ``D = suspect − base``: the **numerical rank** counts those above the noise
  that storing ``base + update`` in the stored dtype leaves (a random matrix of entries within the float bound
  has spectral norm below ``2·rms(bound)·(√m + √n)``); ``energy`` is the share of ‖D‖²_F in them. A rank at most
  ``max_rank`` and below half the smaller dimension is a **low-rank update**, with its factors ``D ≈ L Rᵀ``;
  anything else is a **dense change**.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

__all__ = ["FORMATS", "UNIT_ROUNDOFF", "rounding_format", "Finding", "classify", "DEFAULT_MAX_RANK"]

#: unit roundoff (half an ulp, relative) and the smallest subnormal step's half of each float format
UNIT_ROUNDOFF = {"F64": (2.0 ** -53, 2.0 ** -1075), "F32": (2.0 ** -24, 2.0 ** -150),
                 "BF16": (2.0 ** -8, 2.0 ** -134), "F16": (2.0 ** -11, 2.0 ** -25)}
#: the round trips a difference is tested against, tightest first
FORMATS = ("F32", "F16", "BF16", "Q8_0")
#: the largest rank called a low-rank update (a MEMIT batch of 100 requests at one layer has rank ≤ 100)
DEFAULT_MAX_RANK = 256
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _float_bound(x: torch.Tensor, fmt: str) -> torch.Tensor:
    u, tiny = UNIT_ROUNDOFF[fmt]
    return x.abs() * u + tiny


def _q8_0_bound(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Per entry, the most a GGUF Q8_0 round trip moves it (blocks of 32 along the last dimension)."""
    if x.shape[-1] % 32:
        return None
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    # half a step, the step kept in float16 (relative 2^-11 of it, times 127 levels), and float32 of the product
    bound = step * (0.5 + 127 * 2.0 ** -11) + blocks.abs() * 2.0 ** -24
    return bound.reshape(x.shape)


def rounding_format(base: torch.Tensor, suspect: torch.Tensor) -> Optional[str]:
    """The tightest of :data:`FORMATS` whose round trip explains ``suspect − base`` in every entry (None: none)."""
    b, s = base.double(), suspect.double()
    d = (s - b).abs()
    big = torch.maximum(b.abs(), s.abs())
    for fmt in FORMATS:
        bound = _q8_0_bound(b) if fmt == "Q8_0" else _float_bound(big, fmt)
        if bound is not None and bool((d <= bound).all()):
            return fmt
    return None


@dataclass
class Finding:
    """One tensor's comparison. ``kind``: ``identical``, ``rounding``, ``low_rank`` or ``dense``."""

    name: str
    shape: Tuple[int, ...]
    kind: str
    norm: float = 0.0  # ‖suspect − base‖_F
    relative: float = 0.0  # over ‖base‖_F
    rank: Optional[int] = None
    energy: Optional[float] = None  # share of ‖D‖²_F in the top `rank` singular values
    singular_values: List[float] = field(default_factory=list)  # the largest few
    noise: Optional[float] = None  # the threshold the rank was counted against
    rounding: Optional[str] = None  # the format whose rounding explains it
    left: Optional[torch.Tensor] = None  # D ≈ left @ right.T (low-rank updates): (m, rank), (n, rank)
    right: Optional[torch.Tensor] = None

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "kind": self.kind, "norm": self.norm,
                "relative": self.relative, "rank": self.rank, "energy": self.energy,
                "singular_values": self.singular_values, "noise": self.noise, "rounding": self.rounding}


def _noise(base: torch.Tensor, suspect: torch.Tensor, dtypes: Tuple[str, ...]) -> float:
    """Spectral norm the storage rounding of ``base + update`` cannot exceed (see the module docstring)."""
    fmt = max((f for f in dtypes if f in UNIT_ROUNDOFF), key=lambda f: UNIT_ROUNDOFF[f][0], default="F32")
    if UNIT_ROUNDOFF[fmt][0] < UNIT_ROUNDOFF["F32"][0]:
        fmt = "F32"
    bound = _float_bound(torch.maximum(base.abs(), suspect.abs()), fmt)
    m, n = base.shape[0], base.reshape(base.shape[0], -1).shape[1]
    return 2.0 * float(bound.pow(2).mean().sqrt()) * (math.sqrt(m) + math.sqrt(n))


def classify(name: str, base: torch.Tensor, suspect: torch.Tensor, dtypes: Tuple[str, ...] = ("F32",),
             max_rank: int = DEFAULT_MAX_RANK, keep: int = 8) -> Finding:
    """The :class:`Finding` of ``suspect`` against ``base`` (same shape); ``dtypes``: the stored dtypes of the
    two (safetensors names); ``keep``: how many singular values the finding lists."""
    shape = tuple(base.shape)
    if torch.equal(base, suspect):
        return Finding(name, shape, "identical")
    b, s = base.double(), suspect.double()
    d = s - b
    norm = float(d.norm())
    rel = norm / max(float(b.norm()), 1e-300)
    fmt = rounding_format(b, s)
    if fmt is not None:
        return Finding(name, shape, "rounding", norm, rel, rounding=fmt)
    if d.ndim != 2:  # vectors (norms, biases) and stacked tensors: changed, no rank to speak of
        return Finding(name, shape, "dense", norm, rel)
    noise = _noise(b, s, dtypes)
    m, n = d.shape
    small = min(m, n)
    if small <= 4096:
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        v = vh.T
    else:  # a large matrix: the leading max_rank + 16 directions, the rest judged by the energy they leave
        u, sv, v = torch.svd_lowrank(d, q=min(max_rank + 16, small), niter=4)
    rank = int((sv > noise).sum())
    total = norm ** 2
    energy = float((sv[:rank] ** 2).sum()) / total if total else 1.0
    if small > 4096 and total - float((sv ** 2).sum()) > noise ** 2:
        rank = small  # energy beyond the directions computed: more than max_rank + 16 of them
    low = 0 < rank <= max_rank and rank < small / 2
    f = Finding(name, shape, "low_rank" if low else "dense", norm, rel, rank=rank, energy=energy,
                singular_values=[float(x) for x in sv[:keep]], noise=noise)
    if low:
        f.left, f.right = (u[:, :rank] * sv[:rank]).float(), v[:, :rank].float()
    return f


def dtype_name(t: torch.Tensor) -> str:
    """A tensor's dtype as safetensors names it (what :func:`classify` takes in ``dtypes``)."""
    return _DTYPES.get(t.dtype, "F32")
