"""What edits of one model reuse: context templates, key statistics, AlphaEdit projectors, norm anchors,
and memos tied to the current weights (optimised targets, downstream accuracy).

    caches = EditCaches(adapter)
    caches.stats(5, corpus="wikitext2_valid.txt", n_tokens=100_000).mom2      # C of layer 5
    caches.templates(seed=0)                                                   # ["{}", "... . {}", ...]

The methods receive it next to the adapter (never the Editor); everything in it is also cached
on disk where that pays (statistics, templates, projectors, norm anchors; targets when asked: `disk_targets`),
so a new process starts warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Callable, Dict, List, Optional

from ..core.fingerprints import model_fingerprint
from ..core.paths import atomic_path, atomic_write_text, factedit_home
from ..stats.layer import LayerStats, layer_stats
from .solver import null_space_basis
from .templates import cached_context_templates

__all__ = ["EditCaches"]

log = logging.getLogger(__name__)

#: part of every cached anchor's key: raise it when the calibration changes, so older files are not used
ANCHOR_CACHE_VERSION = 1
#: the same for the targets kept on disk (raise it when the target optimisation changes)
TARGETS_CACHE_VERSION = 1


class EditCaches:
    """In-memory caches of one model's editing inputs.

    Args:
        adapter: the :class:`~factedit.core.arch.ModelAdapter`.
        progress: show progress bars while statistics or targets are computed.
    """

    #: memos kept per kind (the newest ones; see :meth:`weights_memo`)
    MEMOS_PER_KIND = 8
    #: keep AlphaEdit's null-space bases on disk (off: recompute them in every process)
    disk_projectors = True
    #: keep the batch methods' optimised targets on disk (``$FACTEDIT_HOME/targets/``), chunk by chunk as they are
    #: optimised, so a batch too large to lose (10,000 requests optimise for hours) continues where it stopped
    #: and a later process reuses them (off by default: most targets are needed once)
    disk_targets = False

    def __init__(self, adapter, progress: bool = True):
        self.adapter = adapter
        self.progress = progress
        self._templates: Dict[tuple, List[str]] = {}
        self._stats: Dict[tuple, LayerStats] = {}
        self._on_device: Dict[tuple, object] = {}
        self._projectors: Dict[tuple, object] = {}
        self._memo: Dict[str, Dict[tuple, dict]] = {}  # kind -> (fingerprint, *key) -> memo
        self._announced: set = set()  # corpora chosen by "auto" that were reported

    def templates(self, seed: int = 0, lengths=((5, 10), (10, 10))) -> List[str]:
        """The context templates for ``seed`` and ``(tokens, count)`` ``lengths`` (disk-cached)."""
        key = (seed, tuple(map(tuple, lengths)))
        if key not in self._templates:
            self._templates[key] = cached_context_templates(self.adapter, seed, key[1])
        return self._templates[key]

    def stats(self, layer: int, corpus: Optional[str] = None, n_tokens: int = 100_000, seq_len: int = 256,
              dtype: str = "float64") -> LayerStats:
        """Key statistics of ``layer`` (disk-cached; see :func:`~factedit.stats.layer.layer_stats`)."""
        key = (layer, corpus, n_tokens, seq_len, dtype)
        if key not in self._stats:
            st = self._stats[key] = layer_stats(self.adapter, layer, corpus=corpus, n_tokens=n_tokens,
                                                seq_len=seq_len, dtype=dtype, progress=self.progress)
            name, reason = st.meta.get("corpus"), st.meta.get("corpus_reason")
            if reason and (name, reason) not in self._announced:
                self._announced.add((name, reason))
                log.warning("key statistics from %s (%s)", name, reason)
        return self._stats[key]

    def mom2(self, layer: int, corpus: Optional[str], n_tokens: int, seq_len: int = 256, dtype: str = "float64"):
        """C of ``layer`` on the device where its W_out computes (moved there once, then kept)."""
        dev = self.adapter.w_out_device(layer)
        key = (layer, corpus, n_tokens, seq_len, dtype, str(dev))
        if key not in self._on_device:
            self._on_device[key] = self.stats(layer, corpus, n_tokens, seq_len, dtype).mom2.to(dev)
        return self._on_device[key]

    def sources(self, cfg) -> Dict[str, dict]:
        """Per edited layer of ``cfg``, where its statistics came from: corpus, how it was chosen, tokens
        (``{}`` for methods without statistics)."""
        if not hasattr(cfg, "stats_args"):
            return {}
        out = {}
        for l in cfg.layers:
            m = self.stats(l, **cfg.stats_args).meta
            out[str(l)] = {"corpus": m.get("corpus"), "spec": m.get("corpus_spec"),
                           "reason": m.get("corpus_reason", ""), "tokens": int(m.get("count", 0))}
        return out

    def clear_stats(self) -> None:
        """Forget the in-memory statistics (the next use reads the disk cache again)."""
        self._stats.clear()
        self._on_device.clear()

    def null_basis(self, layer: int, C, threshold: float):
        """The basis U (d_ff × k) of the eigenvectors of C with eigenvalue below ``threshold``, on C's device.
        The eigendecomposition runs once per (statistics, threshold): U is cached on disk
        (``$FACTEDIT_HOME/projectors/``, keyed by the SHA-256 of C), so a new process only reads it."""
        key = (layer, threshold, id(C), "basis")
        if key not in self._projectors:
            self._projectors[key] = (_cached_basis(C, threshold).to(C.device) if self.disk_projectors
                                     else null_space_basis(C, threshold))
        return self._projectors[key]

    def projector(self, layer: int, C, threshold: float):
        """AlphaEdit's null-space projector ``P = U Uᵀ`` of layer ``layer`` (:meth:`null_basis`), on C's device."""
        key = (layer, threshold, id(C))
        if key not in self._projectors:
            U = self.null_basis(layer, C, threshold)
            self._projectors[key] = U @ U.T
        return self._projectors[key]

    def weights_memo(self, kind: str, *key) -> dict:
        """A memo dict for the *current* weights, ``kind`` and ``key``: whatever was stored in it is only
        seen again while the weights have the same fingerprint. Bounded per kind (the newest
        :attr:`MEMOS_PER_KIND` keys), so that e.g. the many target memos of a sequential run do not push
        out the downstream accuracy of the original weights."""
        memos = self._memo.setdefault(kind, {})
        full = (model_fingerprint(self.adapter.model),) + key
        if full not in memos:
            if len(memos) >= self.MEMOS_PER_KIND:  # drop the oldest
                memos.pop(next(iter(memos)))
            memos[full] = {}
        return memos[full]

    def anchor_norm(self, key: tuple, compute) -> float:
        """The norm anchor (:mod:`~factedit.edit.anchor`) of the current weights for ``key`` (the calibration's
        settings), calibrated by ``compute()`` only the first time: kept for these weights in memory and on disk
        (``$FACTEDIT_HOME/anchors/``, keyed by the weights' fingerprint and ``key``), so a new process that edits
        the same model with the same settings does not optimise the calibration requests again."""
        memo = self.weights_memo("norm anchor", *key)
        if "m" not in memo:
            memo["m"] = _cached_anchor(model_fingerprint(self.adapter.model), key, compute)
        return memo["m"]

    def target_memo(self, layer: int, templates, value_cfg, essence, fact_token, site: str = "residual") -> dict:
        """The memo of optimised targets for the current weights and these settings (``site``
        ``"residual"``: request -> (z*, info) of the batch methods; ``"w_out"``: request -> ROME's
        :class:`~factedit.edit.values.ValueResult`). With :attr:`disk_targets`, a new residual memo starts with
        the targets kept on disk for these weights and settings (:meth:`target_keeper`)."""
        key = (layer, tuple(templates), value_cfg, tuple(essence), fact_token, site)
        memo = self.weights_memo("targets", *key)
        if self.disk_targets and site == "residual" and not memo:
            memo.update(_read_targets(self._targets_dir(key)))
        return memo

    def target_keeper(self, layer: int, templates, value_cfg, essence, fact_token) -> Optional[Callable]:
        """With :attr:`disk_targets`, a function that writes one chunk of residual targets just optimised on the
        current weights (request -> (z*, info)) to disk, one atomic file per chunk, where :meth:`target_memo` reads
        them back; ``None`` otherwise. The directory is fixed here (the weights' fingerprint: 0.1 s for SmolLM2),
        not per chunk."""
        if not self.disk_targets:
            return None
        directory = self._targets_dir((layer, tuple(templates), value_cfg, tuple(essence), fact_token, "residual"))
        return lambda found: _write_targets(directory, found)

    def _targets_dir(self, key: tuple):
        _, digest = _disk_ident(TARGETS_CACHE_VERSION, model_fingerprint(self.adapter.model), key)
        return factedit_home() / "targets" / digest


def _disk_ident(version: int, fingerprint: str, key: tuple):
    """What identifies a value kept on disk for these weights and settings (JSON text) and its file name (the
    first 24 hex digits of its SHA-256)."""
    ident = json.dumps([version, fingerprint, repr(key)])
    return ident, hashlib.sha256(ident.encode()).hexdigest()[:24]


def _write_targets(directory, found: Dict) -> None:
    """One chunk of targets as ``DIR/<sha of its requests>.safetensors``: ``z`` (n, d) and, in the metadata, the
    requests and their optimisation info (JSON)."""
    import torch
    from safetensors.torch import save_file

    reqs = list(found)
    requests = [r.to_dict() for r in reqs]
    meta = json.dumps({"requests": requests, "info": [found[r][1] for r in reqs]})
    name = hashlib.sha256(json.dumps(requests).encode()).hexdigest()[:24]
    z = torch.stack([found[r][0].detach().cpu() for r in reqs]).contiguous()
    with atomic_path(directory / f"{name}.safetensors", suffix=".safetensors") as tmp:
        save_file({"z": z}, str(tmp), metadata={"chunk": meta})


def _read_targets(directory) -> Dict:
    """Every chunk kept in ``directory`` (request -> (z*, info)); a damaged chunk is skipped (and optimised
    again by its next use)."""
    from safetensors import safe_open

    from ..core.requests import Request

    out: Dict = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                chunk = json.loads(f.metadata()["chunk"])
                z = f.get_tensor("z")
            reqs = [Request(**d) for d in chunk["requests"]]
            if z.ndim != 2 or z.shape[0] != len(reqs) or len(chunk["info"]) != len(reqs):
                raise ValueError("its tensor does not match its requests")
        except Exception as e:
            log.warning("ignoring damaged target cache %s (%s)", path, e)
            continue
        out.update({r: (z[i], info) for i, (r, info) in enumerate(zip(reqs, chunk["info"]))})
    return out


def _cached_anchor(fingerprint: str, key: tuple, compute) -> float:
    """``compute()`` (a positive float) from ``$FACTEDIT_HOME/anchors/`` when an earlier process calibrated it for
    the same weights and key; written there otherwise (atomic). A damaged file is recomputed and replaced."""
    ident, digest = _disk_ident(ANCHOR_CACHE_VERSION, fingerprint, key)
    path = factedit_home() / "anchors" / f"{digest}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved["key"] == ident and math.isfinite(saved["m"]) and saved["m"] > 0:
                return float(saved["m"])
            raise ValueError("not this calibration's")
        except Exception as e:
            log.warning("ignoring damaged norm-anchor cache %s (%s)", path, e)
    m = float(compute())
    atomic_write_text(path, json.dumps({"key": ident, "m": m}))
    return m


def _cached_basis(C, threshold: float):
    """:func:`~factedit.edit.solver.null_space_basis` of C, from ``$FACTEDIT_HOME/projectors/`` when an earlier
    process computed it for the same C (by its SHA-256) and threshold; written there otherwise (atomic)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..core.fingerprints import matrix_fingerprint

    path = factedit_home() / "projectors" / f"{matrix_fingerprint(C)[:24]}-t{threshold:g}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                U = f.get_tensor("basis")
            if U.ndim == 2 and U.shape[0] == C.shape[0]:
                return U
        except Exception as e:  # a damaged file is recomputed and replaced
            log.warning("ignoring damaged projector cache %s (%s)", path, e)
    U = null_space_basis(C, threshold)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({"basis": U.contiguous()}, str(tmp), metadata={"threshold": repr(threshold), "dim": str(C.shape[0])})
    return U
