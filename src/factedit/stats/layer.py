"""Key statistics C = E[k kᵀ] per layer: streamed, mergeable, cached as safetensors.

    stats = layer_stats(adapter, layer=5, corpus="../shared/data/corpus/wikitext2_valid.txt")
    C = stats.mom2                      # (d_ff, d_ff) float32

The accumulator keeps the *sum* of k kᵀ (float64) and the token count, so partial
statistics from several processes or machines merge exactly (:meth:`SecondMoment.merge`).
Forward passes stop right after the layer's W_out has seen its input. Cache files carry
their provenance in the safetensors metadata and can be shared between users.

The math, with the deviations from the papers: docs/ALGORITHMS.md §8.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from ..core.batching import pad_id, pad_rows
from ..core.errors import StatsError
from ..core.hooks import Hook
from ..core.offload import precise_dtype
from ..core.paths import atomic_path, factedit_home
from .corpus import Corpus, resolve_corpus

__all__ = ["SecondMoment", "LayerStats", "layer_stats", "stats_cache_path", "token_chunks", "load_stats_file",
           "check_stats_options", "STATS_DTYPES", "accumulator_bytes"]

log = logging.getLogger(__name__)
_FORMAT = "factedit.mom2.v1"
#: the accumulators of ``sum k kᵀ`` (``--stats-dtype``)
STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def check_stats_options(seq_len: int, dtype: str) -> None:
    """A clear error for a statistics sequence length or accumulator dtype that cannot work."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise StatsError(f"stats_seq_len must be an integer of at least 2 tokens, got {seq_len!r}")
    if dtype not in STATS_DTYPES:
        raise StatsError(f"stats_dtype must be one of {', '.join(STATS_DTYPES)}, got {dtype!r}")


def accumulator_bytes(d_ff: int, dtype: str = "float64", batch_tokens: int = 8 * 256) -> dict:
    """What statistics of a layer of width ``d_ff`` hold on the layer's device: the ``d_ff²`` sum in ``dtype``,
    the float32 ``C`` the edits use, and one batch's keys (float32)."""
    size = STATS_DTYPES[dtype].itemsize
    return {"sum": d_ff * d_ff * size, "mom2": d_ff * d_ff * 4, "keys": batch_tokens * d_ff * 4}


@dataclass
class SecondMoment:
    """Streaming uncentered second moment of row vectors: ``sum x xᵀ`` and ``count``.

    ``update`` takes (n, d) batches (any dtype; the product is formed in float32 and summed
    into a float64 buffer on the batches' device: nothing of size d² crosses to the host while
    accumulating). ``merge`` adds another accumulator: the result equals one pass over the union
    of the data. :meth:`host` gives the sum on the CPU (for files and all-reduces).
    """

    dim: int
    sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    count: int = 0
    dtype: str = "float64"  # the accumulator's (float32: half the memory, ~1e-7 relative rounding per batch)

    def __post_init__(self):
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, dtype=STATS_DTYPES[self.dtype])

    def update(self, x: torch.Tensor) -> "SecondMoment":
        x = x.reshape(-1, self.dim).to(torch.float32)
        if x.shape[0]:
            if self.sum.device != x.device:  # first batch: the buffer moves to where the keys are (once)
                want = STATS_DTYPES[self.dtype] if self.dtype == "float32" else precise_dtype(x.device)
                self.sum = self.sum.to(device=x.device, dtype=want)
            self.sum += (x.T @ x).to(self.sum.dtype)
            self.count += int(x.shape[0])
        return self

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        if other.dim != self.dim:
            raise StatsError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += other.count
        return self

    def host(self) -> "SecondMoment":
        """This accumulator with its sum on the CPU in float64."""
        return SecondMoment(self.dim, self.sum.to(device="cpu", dtype=torch.float64), self.count, self.dtype)

    def mom2(self) -> torch.Tensor:
        """E[x xᵀ] in float32, on the CPU (the editing methods move it to the layer's device once)."""
        if self.count == 0:
            raise StatsError("no tokens were accumulated")
        return (self.sum / self.count).to(device="cpu", dtype=torch.float32)


@dataclass
class LayerStats:
    """Finished statistics for one layer (what the editing methods consume)."""

    mom2: torch.Tensor  # (d_ff, d_ff) float32, E[k kᵀ]
    count: int
    meta: dict

    def validate(self, d_ff: Optional[int] = None, source: str = "statistics") -> "LayerStats":
        C = self.mom2
        if C.ndim != 2 or C.shape[0] != C.shape[1]:
            raise StatsError(f"{source}: expected a square matrix, got shape {tuple(C.shape)}")
        if d_ff is not None and C.shape[0] != d_ff:
            raise StatsError(f"{source}: dimension {C.shape[0]} does not match this layer's d_ff={d_ff}")
        if not torch.isfinite(C).all():
            raise StatsError(f"{source}: contains NaN or Inf values; recompute them (factedit stats --force)")
        if self.count <= 0:
            raise StatsError(f"{source}: token count is {self.count}")
        return self


def token_chunks(tok, corpus: Corpus, seq_len: int, n_tokens: int, skip_chunks: int = 0) -> Iterator[List[int]]:
    """Pack the corpus into a stream of ``seq_len``-token chunks until ``n_tokens`` are given.

    Documents are concatenated (separated by EOS when the tokenizer has one) so no token
    is padding. Deterministic: the same arguments always give the same chunks.
    """
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []
    body = seq_len - len(bos)
    buf: List[int] = []
    given, index = 0, 0
    for doc in corpus.open():
        if not doc:
            continue
        buf.extend(tok(doc, add_special_tokens=False)["input_ids"] + sep)
        while len(buf) >= body:
            chunk, buf = bos + buf[:body], buf[body:]
            if index >= skip_chunks:
                yield chunk
            index += 1
            given += len(chunk)
            if given >= n_tokens:
                return
    if buf and given < n_tokens:
        if index >= skip_chunks:
            yield bos + buf[: n_tokens - given]


def stats_cache_path(model_fp: str, layer: int, corpus_name: str, n_tokens: int, home: Optional[Path] = None,
                     seq_len: int = 256, dtype: str = "float64") -> Path:
    """The cache file of these statistics (the default sequence length and accumulator add nothing to the name,
    so files written before those were options keep serving)."""
    import hashlib

    key = hashlib.sha256(corpus_name.encode()).hexdigest()[:10]
    extra = (f"-len{seq_len}" if seq_len != 256 else "") + (f"-{dtype}" if dtype != "float64" else "")
    return (home or factedit_home()) / "stats" / model_fp / f"layer{layer}-{key}-{n_tokens}{extra}.safetensors"


def _save(path: Path, acc: SecondMoment, meta: dict) -> None:
    from safetensors.torch import save_file

    # n_tokens: the tokens actually accumulated (a capped corpus gives fewer than requested)
    meta = {k: str(v) for k, v in {**meta, "format": _FORMAT, "count": acc.count, "n_tokens": acc.count}.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({"mom2_sum": acc.host().sum.contiguous()}, str(tmp), metadata=meta)


def load_stats_file(path: Path) -> tuple[SecondMoment, dict]:
    """Read a statistics (or partial) file; any damage raises :class:`StatsError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            s = f.get_tensor("mom2_sum")
    except Exception as e:
        raise StatsError(
            f"statistics cache {path} is unreadable ({type(e).__name__}: {e}). "
            "Delete it or recompute with `factedit stats --force`."
        ) from None
    if meta.get("format") != _FORMAT:
        raise StatsError(f"statistics cache {path}: unknown format {meta.get('format')!r}")
    try:
        count = int(meta["count"])
    except (KeyError, ValueError):
        raise StatsError(f"statistics cache {path}: missing token count") from None
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise StatsError(f"statistics cache {path}: bad shape {tuple(s.shape)}")
    return SecondMoment(int(s.shape[0]), s.to(torch.float64), count), meta


@torch.no_grad()
def _accumulate(adapter, layer: int, chunks: Iterator[List[int]], acc: SecondMoment, n_tokens: int,
                batch_size: int, on_checkpoint, checkpoint_every: float, progress: bool, world=None) -> None:
    """Forward ``batch_size`` chunks at a time and add their keys to ``acc``. In a torchrun world, batch
    ``b`` is rank ``b % size``'s: each batch's float32 product is the one a single process forms."""
    from tqdm.auto import tqdm

    dev = adapter.input_device
    bar = tqdm(total=n_tokens, initial=acc.count, unit="tok", unit_scale=True, disable=not progress,
               desc=f"stats layer {layer}", dynamic_ncols=True)
    last_ckpt = time.monotonic()
    batch: List[List[int]] = []
    index = 0

    def run(batch):
        b = pad_rows(batch, pad_id(adapter.tokenizer), device=dev)
        with Hook(adapter.w_out(layer), retain_input=True, stop=True) as t:
            adapter.body(**b.inputs(), use_cache=False)
        keys = t.input[b.attention_mask.bool().to(t.input.device)]  # (real tokens, d_ff), on W_out's device
        acc.update(keys)
        bar.update(int(keys.shape[0]))

    try:
        for chunk in chunks:
            batch.append(chunk)
            if len(batch) == batch_size:
                if world is None or world.owns(index):
                    run(batch)
                batch, index = [], index + 1
                if on_checkpoint and time.monotonic() - last_ckpt > checkpoint_every:
                    on_checkpoint(acc)
                    last_ckpt = time.monotonic()
        if batch and (world is None or world.owns(index)):
            run(batch)
    finally:
        bar.close()


def layer_stats(
    adapter,
    layer: int,
    corpus: Optional[str] = None,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 8,
    force: bool = False,
    cache: bool = True,
    progress: bool = True,
    checkpoint_every: float = 30.0,
    world=None,
    dtype: str = "float64",
) -> LayerStats:
    """Statistics of layer ``layer``'s keys; from the cache when present, else computed.

    Args:
        corpus: corpus spec (see :mod:`factedit.corpus`); ``None`` means ``"auto"``.
        n_tokens: tokens to accumulate.
        seq_len: tokens per forward sequence, whatever the model's context length (memory per batch:
            ``batch_size × seq_len × d_ff`` float32 keys besides the ``d_ff²`` accumulator).
        force: recompute even when a cache file exists (replaces it atomically).
        cache: read/write the cache at all.
        checkpoint_every: seconds between partial saves; an interrupted run resumes from them.
        dtype: the accumulator, ``"float64"`` (default) or ``"float32"`` (:data:`STATS_DTYPES`).
        world: a :class:`~factedit.core.distributed.World` of several torchrun processes: the batches are
            shared out between the ranks, their sums all-reduced (float64), rank 0 writes the one cache
            file (the same file one process writes); every rank returns the same statistics. The ranks must
            agree on the model, corpus, layer and token count. No partial checkpoints in a world.
    """
    from ..core.fingerprints import model_fingerprint
    from ..core.models import model_name

    adapter.check_layer(layer)
    check_stats_options(seq_len, dtype)
    seq_len = min(seq_len, adapter.max_positions)
    src = resolve_corpus(corpus, adapter, n_tokens)
    fp = model_fingerprint(adapter.model, upto_layer=layer, spec=adapter.spec)
    path = stats_cache_path(fp, layer, src.name, n_tokens, seq_len=seq_len, dtype=dtype)
    meta = {"model": model_name(adapter.model), "model_fingerprint": fp, "layer": layer,
            "module": adapter.w_out_name(layer), "corpus": src.name, "requested_tokens": n_tokens, "seq_len": seq_len,
            "accumulator": dtype}
    source = {"corpus_spec": corpus or "auto", "corpus_reason": src.reason}
    if world is not None and world.distributed:
        world.agree("statistics inputs (model fingerprint, corpus, layer, tokens, sequence length)",
                    [fp, src.name, layer, n_tokens, seq_len, dtype, adapter.d_ff, bool(force)])
        cached = world.gather(bool(cache and path.is_file() and not force))[0]  # rank 0 decides for all
        if not cached:
            return _distributed_stats(adapter, layer, src, n_tokens, seq_len, batch_size, meta, source, path,
                                      cache, progress, world, dtype)
    if cache and path.is_file() and not force:
        acc, file_meta = load_stats_file(path)
        log.info("statistics for layer %d from cache %s", layer, path)
        return LayerStats(acc.mom2(), acc.count, {**file_meta, **source}).validate(adapter.d_ff, str(path))

    partial = path.with_suffix(".partial.safetensors")
    acc = SecondMoment(adapter.d_ff, dtype=dtype)
    done_chunks = 0
    if cache and partial.is_file() and not force:
        try:
            acc, pmeta = load_stats_file(partial)
            acc = SecondMoment(acc.dim, acc.sum.to(STATS_DTYPES[dtype]), acc.count, dtype)
            done_chunks = int(pmeta.get("chunks", 0))
            log.info("resuming statistics from %s (%d tokens done)", partial, acc.count)
        except StatsError as e:
            log.warning("ignoring damaged partial statistics: %s", e)
            acc, done_chunks = SecondMoment(adapter.d_ff, dtype=dtype), 0
    counter = {"chunks": done_chunks}

    def chunks():
        for c in token_chunks(adapter.tokenizer, src, seq_len, n_tokens, skip_chunks=done_chunks):
            counter["chunks"] += 1
            yield c

    def checkpoint(a):
        if cache:
            _save(partial, a, {**meta, "chunks": counter["chunks"], "partial": True})

    t0 = time.monotonic()
    _accumulate(adapter, layer, chunks(), acc, n_tokens, batch_size, checkpoint, checkpoint_every, progress)
    result = _finished(adapter, acc, src, meta, source, t0)
    if cache:
        _save(path, acc, meta)
        if partial.exists():
            partial.unlink()
    log.info("layer %d statistics: %d tokens in %.1fs", layer, acc.count, meta["seconds"])
    return result


def _finished(adapter, acc: SecondMoment, src, meta: dict, source: dict, t0: float) -> LayerStats:
    """The statistics ``acc`` accumulated since ``t0`` (``meta`` gets the seconds); no tokens is an error."""
    if acc.count == 0:
        raise StatsError(f"corpus {src.name} produced no tokens")
    meta["seconds"] = round(time.monotonic() - t0, 2)
    return LayerStats(acc.mom2(), acc.count, {**meta, **source, "count": acc.count, "n_tokens": acc.count}).validate(
        adapter.d_ff, "computed statistics")


def _distributed_stats(adapter, layer, src, n_tokens, seq_len, batch_size, meta, source, path, cache, progress,
                       world, dtype) -> LayerStats:
    """:func:`layer_stats` across a torchrun world: each rank its batches, one all-reduce, rank 0 writes."""
    acc = SecondMoment(adapter.d_ff, dtype=dtype)
    t0 = time.monotonic()
    chunks = token_chunks(adapter.tokenizer, src, seq_len, n_tokens)
    _accumulate(adapter, layer, chunks, acc, n_tokens, batch_size, None, float("inf"), progress and world.main, world)
    # gloo reduces CPU tensors; NCCL those on the rank's GPU (where the sum already is)
    total = acc.sum if world.backend == "nccl" else acc.host().sum
    world.all_reduce_sum(total)
    count = torch.tensor([acc.count], dtype=torch.float64, device=total.device)
    world.all_reduce_sum(count)
    merged = SecondMoment(adapter.d_ff, total.to(device="cpu", dtype=torch.float64), int(count.item()), dtype)
    result = _finished(adapter, merged, src, meta, source, t0)
    if cache and world.main:
        _save(path, merged, meta)
    world.barrier()  # the file exists for every rank once this returns
    log.info("layer %d statistics: %d tokens over %d ranks in %.1fs", layer, merged.count, world.size, meta["seconds"])
    return result
