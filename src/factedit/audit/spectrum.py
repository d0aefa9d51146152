"""What a difference between two tensors is: nothing, rounding, a low-rank update, or a dense change.

Pure functions on tensors, float64 inside, streaming over rows: a tensor is read a block of rows at a time
(:data:`CHUNK_BYTES` of float64), so comparing two 7B-sized matrices never holds either whole, let alone their
float64 difference:

* **rounding** is bounded by the format, not guessed: storing ``x`` in a float format of unit roundoff ``u``
  moves it by at most ``u·|x|`` (half an ulp; subnormals by half the smallest step), and a GGUF ``Q8_0`` block of
  32 values by at most half its step ``d = max|x|/127`` (``d`` itself kept in float16). A difference within one
  format's bound in every entry is that format's rounding (:data:`FORMATS`, tightest first);
* otherwise the singular values of ``D = suspect − base``: the **numerical rank** counts those above the noise
  that storing ``base + update`` in the stored dtype leaves (a random matrix of entries within the float bound
  has spectral norm below ``2·rms(bound)·(√m + √n)``); ``energy`` is the share of ‖D‖²_F in them. A rank at most
  ``max_rank`` and below half the smaller dimension is a **low-rank update**, with its factors ``D ≈ L Rᵀ``;
  anything else is a **dense change**. Matrices up to :data:`FULL_SVD_ENTRIES` entries get a full SVD of D;
  larger ones a randomized one (Halko–Martinsson–Tropp: a range finder with power iterations) whose products
  with D are taken block by block, widening its sketch (32, 128, ``max_rank + 16`` directions) while every
  direction found is above the noise. Such a matrix is dense when even the widest sketch ends above the noise,
  or when what it leaves unexplained holds more energy than rounding can (Σ bound², entry by entry).

A tensor is given in memory (a ``torch.Tensor``) or as rows read on demand: anything with ``shape`` and
``rows(start, stop)`` (:meth:`factedit.audit.tensors.TensorFiles.lazy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch

__all__ = ["FORMATS", "UNIT_ROUNDOFF", "rounding_format", "Finding", "classify", "DEFAULT_MAX_RANK",
           "CHUNK_BYTES", "FULL_SVD_ENTRIES", "top_singular_values"]

#: unit roundoff (half an ulp, relative) and the smallest subnormal step's half of each float format
UNIT_ROUNDOFF = {"F64": (2.0 ** -53, 2.0 ** -1075), "F32": (2.0 ** -24, 2.0 ** -150),
                 "BF16": (2.0 ** -8, 2.0 ** -134), "F16": (2.0 ** -11, 2.0 ** -25)}
#: the round trips a difference is tested against, tightest first
FORMATS = ("F32", "F16", "BF16", "Q8_0")
#: the largest rank called a low-rank update (a MEMIT batch of 100 requests at one layer has rank ≤ 100)
DEFAULT_MAX_RANK = 256
#: float64 bytes of one block of rows read at a time
CHUNK_BYTES = 4 * 2 ** 20
#: matrices with at most this many entries get a full SVD of their float64 difference (64 MiB); larger ones a
#: randomized SVD taken block by block
FULL_SVD_ENTRIES = 2 ** 23
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class _InMemory:
    """A tensor already in memory, read as rows like a file's (:meth:`TensorFiles.lazy`)."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape = t, tuple(t.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.t[start:stop] if self.t.ndim else self.t.reshape(1)


def _rows_of(x):
    """``x`` read as rows: a tensor wrapped, anything with ``shape`` and ``rows(start, stop)`` as it is."""
    return _InMemory(x) if isinstance(x, torch.Tensor) else x


def _matrix_shape(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """(rows, entries per row) of a tensor read as a matrix of its first dimension."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _blocks(base, suspect, m: int, n: int) -> Iterator[Tuple[int, Optional[torch.Tensor], torch.Tensor]]:
    """(start row, base rows, suspect rows) as stored, each block about :data:`CHUNK_BYTES` in float64 (``base``
    None: None for its rows)."""
    step = max(1, CHUNK_BYTES // (8 * max(n, 1)))
    for i in range(0, m, step):
        j = min(m, i + step)
        yield (i, None if base is None else base.rows(i, j).reshape(j - i, n),
               suspect.rows(i, j).reshape(j - i, n))


def _d_blocks(base, suspect, m: int, n: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """(start row, rows of D = suspect − base in float64; D = suspect when ``base`` is None)."""
    for i, b, s in _blocks(base, suspect, m, n):
        yield i, s.double() if b is None else s.double() - b.double()


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


def _noise_format(dtypes: Tuple[str, ...]) -> str:
    """The coarsest float format of the two stored dtypes, never finer than float32 (what ``base + update``
    was rounded to when it was stored; an update computed in float32 carries float32 rounding at least)."""
    fmt = max((f for f in dtypes if f in UNIT_ROUNDOFF), key=lambda f: UNIT_ROUNDOFF[f][0], default="F32")
    return "F32" if UNIT_ROUNDOFF[fmt][0] < UNIT_ROUNDOFF["F32"][0] else fmt


@dataclass
class _Pass:
    """What one read of a tensor pair establishes, entry by entry (:func:`_first_pass`)."""

    identical: bool
    rounding: Optional[str]  # the tightest format explaining every entry
    norm2: float  # ‖D‖²_F
    base_norm2: float  # ‖base‖²_F
    bound2: float  # Σ bound² of the noise format (the most energy its rounding can hold)


def _first_pass(base, suspect, m: int, n: int, noise_fmt: str, last_dim: int) -> _Pass:
    if all(torch.equal(b, s) for _, b, s in _blocks(base, suspect, m, n)):  # stops at the first difference
        return _Pass(True, None, 0.0, 0.0, 0.0)
    alive = [f for f in FORMATS if f != "Q8_0" or last_dim % 32 == 0]
    norm2, base_norm2, bound2 = 0.0, 0.0, 0.0
    for _, b_raw, s_raw in _blocks(base, suspect, m, n):
        b, s = b_raw.double(), s_raw.double()
        d = (s - b).abs()
        big = torch.maximum(b.abs(), s.abs())
        noise_bound = _float_bound(big, noise_fmt)
        norm2 += float(d.pow(2).sum())
        base_norm2 += float(b.pow(2).sum())
        bound2 += float(noise_bound.pow(2).sum())
        for fmt in list(alive):
            bound = (noise_bound if fmt == noise_fmt else _q8_0_bound(b.reshape(-1, last_dim)).reshape(b.shape)
                     if fmt == "Q8_0" else _float_bound(big, fmt))
            if not bool((d <= bound).all()):
                alive.remove(fmt)
    return _Pass(False, alive[0] if alive else None, norm2, base_norm2, bound2)


def rounding_format(base, suspect) -> Optional[str]:
    """The tightest of :data:`FORMATS` whose round trip explains ``suspect − base`` in every entry (None: none)."""
    base, suspect = _rows_of(base), _rows_of(suspect)
    shape = tuple(base.shape)
    m, n = _matrix_shape(shape)
    p = _first_pass(base, suspect, m, n, "F32", shape[-1] if shape else 1)
    return "F32" if p.identical else p.rounding


@dataclass
class Finding:
    """One tensor's comparison. ``kind``: ``identical``, ``rounding``, ``low_rank`` or ``dense``."""

    name: str
    shape: Tuple[int, ...]
    kind: str
    norm: float = 0.0  # ‖suspect − base‖_F
    relative: float = 0.0  # over ‖base‖_F
    rank: Optional[int] = None  # None for a dense matrix: more directions above the noise than were computed
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


def _difference(base, suspect, m: int, n: int) -> torch.Tensor:
    d = torch.empty(m, n, dtype=torch.float64)
    for i, rows in _d_blocks(base, suspect, m, n):
        d[i:i + len(rows)] = rows
    return d


def _d_times(base, suspect, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    """D @ x, block by block (x: n × q)."""
    out = torch.empty(m, x.shape[1], dtype=torch.float64)
    for i, rows in _d_blocks(base, suspect, m, n):
        out[i:i + len(rows)] = rows @ x
    return out


def _dt_times(base, suspect, m: int, n: int, y: torch.Tensor) -> torch.Tensor:
    """Dᵀ @ y, block by block (y: m × q)."""
    out = torch.zeros(n, y.shape[1], dtype=torch.float64)
    for i, rows in _d_blocks(base, suspect, m, n):
        out += rows.T @ y[i:i + len(rows)]
    return out


def _randomized_svd(base, suspect, m: int, n: int, q: int, niter: int = 4, seed: int = 0):
    """The leading ``q`` singular triplets of D, never holding D (a range finder with ``niter`` power
    iterations, re-orthonormalised at each step)."""
    g = torch.Generator().manual_seed(seed)
    y = _d_times(base, suspect, m, n, torch.randn(n, q, generator=g, dtype=torch.float64))
    for _ in range(niter):
        z = _dt_times(base, suspect, m, n, torch.linalg.qr(y).Q)
        y = _d_times(base, suspect, m, n, torch.linalg.qr(z).Q)
    qm = torch.linalg.qr(y).Q  # m × q: an orthonormal basis of D's leading range
    small_u, sv, vh = torch.linalg.svd(_dt_times(base, suspect, m, n, qm).T, full_matrices=False)  # Qᵀ D = Ũ S Vᵀ
    return qm @ small_u, sv, vh.T


def top_singular_values(w, k: int = 4, niter: int = 6) -> List[float]:
    """The ``k`` largest singular values of one matrix (a tensor or rows read on demand): exact up to
    :data:`FULL_SVD_ENTRIES` entries, else by the block-by-block randomized SVD (``k + 8`` directions)."""
    w = _rows_of(w)
    m, n = _matrix_shape(tuple(w.shape))
    if m * n <= FULL_SVD_ENTRIES:
        sv = torch.linalg.svdvals(_difference(None, w, m, n))
    else:
        sv = _randomized_svd(None, w, m, n, min(k + 8, m, n), niter=niter)[1]
    return [float(x) for x in sv[:k]]


def classify(name: str, base, suspect, dtypes: Tuple[str, ...] = ("F32",),
             max_rank: int = DEFAULT_MAX_RANK, keep: int = 8) -> Finding:
    """The :class:`Finding` of ``suspect`` against ``base`` (same shape; tensors, or rows read on demand);
    ``dtypes``: the stored dtypes of the two (safetensors names); ``keep``: how many singular values the
    finding lists."""
    base, suspect = _rows_of(base), _rows_of(suspect)
    shape = tuple(base.shape)
    m, n = _matrix_shape(shape)
    noise_fmt = _noise_format(dtypes)
    p = _first_pass(base, suspect, m, n, noise_fmt, shape[-1] if shape else 1)
    if p.identical:
        return Finding(name, shape, "identical")
    norm = math.sqrt(p.norm2)
    rel = norm / max(math.sqrt(p.base_norm2), 1e-300)
    if p.rounding is not None:
        return Finding(name, shape, "rounding", norm, rel, rounding=p.rounding)
    if len(shape) != 2:  # vectors (norms, biases) and stacked tensors: changed, no rank to speak of
        return Finding(name, shape, "dense", norm, rel)
    # a random matrix of entries within the bound has spectral norm below 2·rms(bound)·(√m + √n)
    noise = 2.0 * math.sqrt(p.bound2 / (m * n)) * (math.sqrt(m) + math.sqrt(n))
    small = min(m, n)
    if m * n <= FULL_SVD_ENTRIES:
        u, sv, vh = torch.linalg.svd(_difference(base, suspect, m, n), full_matrices=False)
        v = vh.T
        rank: Optional[int] = int((sv > noise).sum())
    else:
        widest = min(max_rank + 16, small)
        for q in (min(32, widest), min(128, widest), widest):
            u, sv, v = _randomized_svd(base, suspect, m, n, q)
            if sv[-1] <= noise:
                break
        rank = int((sv > noise).sum())
        left_over = p.norm2 - float((sv[:rank] ** 2).sum())
        if (rank == len(sv) and rank < small) or left_over > 1.01 * p.bound2:
            rank = None  # more directions above the noise than computed, or energy rounding cannot hold
    energy = float((sv[:rank] ** 2).sum()) / p.norm2 if rank is not None else None
    low = rank is not None and 0 < rank <= max_rank and rank < small / 2
    f = Finding(name, shape, "low_rank" if low else "dense", norm, rel, rank=rank, energy=energy,
                singular_values=[float(x) for x in sv[:keep]], noise=noise)
    if low:
        f.left, f.right = (u[:, :rank] * sv[:rank]).float(), v[:, :rank].float()
    return f


def dtype_name(t: torch.Tensor) -> str:
    """A tensor's dtype as safetensors names it (what :func:`classify` takes in ``dtypes``)."""
    return _DTYPES.get(t.dtype, "F32")
