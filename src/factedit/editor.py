"""The :class:`Editor`: a model plus the state that edits need (templates, statistics,
history), applying edits atomically and reverting them exactly.

    editor = Editor(*load_model())
    result = editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"))
    editor.revert()            # back to the original weights, bit for bit
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from .core.arch import ArchSpec, ModelAdapter
from .edit.deltas import AppliedEdit, LayerDelta, apply_deltas
from .core.errors import MethodError
from .edit.templates import cached_context_templates
from .edit.guard import CollapseError, GuardConfig, entropy_probe, norm_reference
from .edit.guard import check as check_guard
from .edit.methods import METHODS, BatchConfig, FTConfig, ROMEConfig, compute_batch, compute_ft, compute_rome
from .edit.methods.batch import add_keys
from .edit.methods.options import with_options
from .core.requests import Request
from .stats.layer import LayerStats, layer_stats
from .edit.values import ValueProblem, optimize_values

__all__ = ["Editor", "EditResult", "Computed"]

log = logging.getLogger(__name__)


@dataclass
class Computed:
    """An edit computed but not yet applied: deltas plus everything they came from."""

    deltas: List[LayerDelta]
    values: object  # ValueResult
    info: List[dict]
    timings: Dict[str, float]
    config: object
    C: object = field(default=None, repr=False)
    state_keys: Optional[dict] = field(default=None, repr=False)  # AlphaEdit: this batch's keys per layer


@dataclass
class EditResult:
    """What one call of :meth:`Editor.edit` did."""

    method: str
    layers: List[int]
    requests: List[Request]
    deltas: List[LayerDelta]
    applied: AppliedEdit = field(repr=False)
    config: object = field(repr=False)
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    info: List[dict] = field(default_factory=list)
    state_keys: Optional[dict] = field(default=None, repr=False)  # keys added to the method state
    stateful: bool = False  # the method carries state across edits (AlphaEdit)
    fingerprints: Dict[str, str] = field(default_factory=dict, repr=False)  # edited matrices before the edit
    guard: Optional[dict] = None  # the collapse guard's decision (None: guard off)

    @property
    def delta_norm(self) -> float:
        """Frobenius norm of the total update (summed per layer, then root-sum-square)."""
        import math

        by_layer: Dict[int, object] = {}
        for d in self.deltas:
            by_layer[d.layer] = by_layer.get(d.layer, 0) + d.dense()
        return math.sqrt(sum(float((m.double() ** 2).sum()) for m in by_layer.values()))

    def revert(self) -> None:
        self.applied.revert()


class Editor:
    """Holds a model and everything edits reuse.

    Args:
        model, tokenizer: a loaded causal LM (see :func:`factedit.load_model`).
        arch: explicit module layout for unknown architectures.
        progress: show progress bars (statistics).
    """

    def __init__(self, model, tokenizer, arch: Optional[ArchSpec] = None, progress: bool = True):
        self.adapter = ModelAdapter(model, tokenizer, arch)
        self.progress = progress
        self.history: List[EditResult] = []
        self._templates: Dict[tuple, List[str]] = {}
        self._stats: Dict[tuple, LayerStats] = {}
        self._projectors: Dict[tuple, object] = {}
        self._memo: Dict[str, Dict[tuple, dict]] = {}  # weights_memo: kind -> key -> memo
        #: per-method state carried across sequential edits (AlphaEdit: {layer: K_p K_pᵀ})
        self.state: Dict[str, dict] = {}
        # the state of each method before the oldest stateful edit in the history; later states
        # are replayed from it (history keeps only each batch's keys, not d_ff × d_ff matrices)
        self._state_base: Dict[str, Optional[dict]] = {}
        self._entropy: Optional[float] = None  # guard's fluency probe of the current weights

    @property
    def model(self):
        return self.adapter.model

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    # ------------------------------------------------------------------ shared state
    def templates(self, seed: int = 0, lengths=((5, 10), (10, 10))) -> List[str]:
        key = (seed, tuple(map(tuple, lengths)))
        if key not in self._templates:
            self._templates[key] = cached_context_templates(self.adapter, seed, key[1])
        return self._templates[key]

    def stats(self, layer: int, corpus: Optional[str] = None, n_tokens: int = 100_000) -> LayerStats:
        key = (layer, corpus, n_tokens)
        if key not in self._stats:
            self._stats[key] = layer_stats(self.adapter, layer, corpus=corpus, n_tokens=n_tokens,
                                           progress=self.progress)
        return self._stats[key]

    def weights_memo(self, kind: str, *key) -> dict:
        """A memo dict for the *current* weights, ``kind`` and ``key``: whatever was stored in it is only
        seen again while the weights have the same fingerprint. Bounded per kind (the 8 newest keys), so
        that e.g. the many target memos of a sequential run do not push out the downstream accuracy of
        the original weights."""
        from .core.fingerprints import model_fingerprint

        memos = self._memo.setdefault(kind, {})
        full = (model_fingerprint(self.model),) + key
        if full not in memos:
            if len(memos) >= 8:  # drop the oldest
                memos.pop(next(iter(memos)))
            memos[full] = {}
        return memos[full]

    def target_memo(self, layer: int, templates, value_cfg, essence, fact_token, site: str = "residual") -> dict:
        """The memo of optimised targets for the current weights and these settings (``site``
        ``"residual"``: request -> (z*, info) of the batch methods; ``"w_out"``: request -> ROME's
        :class:`~factedit.values.ValueResult`)."""
        return self.weights_memo("targets", layer, tuple(templates), value_cfg, tuple(essence), fact_token, site)

    def projector(self, layer: int, C, threshold: float):
        """AlphaEdit's null-space projector of layer ``layer`` (cached per threshold)."""
        from .edit.solver import null_space_projector

        key = (layer, threshold, id(C))
        if key not in self._projectors:
            self._projectors[key] = null_space_projector(C, threshold)
        return self._projectors[key]

    # ------------------------------------------------------------------ editing
    def make_config(self, method: str = "r-rome", options=(), **overrides):
        """The method's config dataclass with model-derived defaults filled in.

        ``options``: ``{"field" or "nested.field": value}`` (or pairs) set last, values given as text
        converted to the field's type (:func:`~factedit.methods.options.with_options`).
        """
        if method not in METHODS:
            raise MethodError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        cls = METHODS[method]
        if cls is ROMEConfig:
            overrides.setdefault("variant", method)
        elif cls is BatchConfig:
            overrides.setdefault("method", method)
        if "layer" in overrides and cls is not ROMEConfig:
            layer = overrides.pop("layer")
            if layer is not None:
                overrides.setdefault("layers", (layer,))
        if "layers" in overrides and cls is ROMEConfig:
            layers = overrides.pop("layers")
            if layers is not None:
                if len(layers) != 1:
                    raise MethodError(f"{method} edits a single layer; got layers {list(layers)}")
                overrides["layer"] = layers[0]
        if cls is FTConfig:
            for k in ("stats_corpus", "stats_tokens", "seed"):
                overrides.pop(k, None)
        steps = overrides.pop("steps", None)
        try:
            cfg = cls(**overrides)
        except TypeError as e:
            raise MethodError(f"invalid option for {method}: {e}") from None
        if steps is not None:
            cfg = with_options(cfg, {"steps" if cls is FTConfig else "value.steps": steps})
        return with_options(cfg, dict(options)).resolved(self.adapter)

    def compute(self, requests: Union[Request, Sequence[Request]], method: str = "r-rome",
                config=None, **overrides) -> Computed:
        """Compute (but do not apply) an edit. Nothing in the model changes.

        ROME variants take exactly one request; MEMIT / EMMET / AlphaEdit / FT take a batch.
        """
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        if not reqs:
            raise MethodError("no requests to edit")
        cfg = config.resolved(self.adapter) if config is not None else self.make_config(method, **overrides)
        if isinstance(cfg, ROMEConfig):
            if len(reqs) != 1:
                raise MethodError("ROME edits one request at a time; pass one Request (or use Editor.edit)")
            return self._compute_rome(reqs[0], cfg)
        if isinstance(cfg, BatchConfig):
            deltas, info, timings, keys = compute_batch(self, reqs, cfg, self.state.get(cfg.method))
            return Computed(deltas, None, info, timings, cfg, None, keys)
        t = time.perf_counter()
        deltas, info = compute_ft(self, reqs, cfg)
        return Computed(deltas, None, info, {"values": time.perf_counter() - t}, cfg)

    def prefetch_targets(self, requests: Sequence[Request], config, batch_size: int = 16) -> float:
        """Optimise the targets (δ) of single ROME edits of ``requests`` on the current weights,
        ``batch_size`` requests per optimisation, for later :meth:`compute` calls on the same weights
        (they are memoised per weight fingerprint; any edit in between makes them unused). The
        optimisations of a batch are independent (own δ, own loss, own early stop), so this only
        amortises the per-forward cost; the δ equal single-request ones up to float rounding. A
        no-op for the batch methods, which batch their targets themselves. Returns the seconds spent."""
        t = time.perf_counter()
        cfg = config.resolved(self.adapter)
        if not isinstance(cfg, ROMEConfig):
            return 0.0
        templates = self.templates(cfg.seed, cfg.context_lengths)
        memo = self.target_memo(cfg.layer, templates, cfg.value, cfg.essence_prompts, cfg.fact_token, site="w_out")
        todo = list(dict.fromkeys(r for r in requests if r not in memo))
        for i in range(0, len(todo), max(1, batch_size)):
            chunk = todo[i: i + max(1, batch_size)]
            problem = ValueProblem(self.adapter, cfg.layer, chunk, templates, cfg.essence_prompts, cfg.fact_token)
            values = optimize_values(problem, cfg.value)
            for j, r in enumerate(chunk):
                memo[r] = values.select(j)
        return time.perf_counter() - t

    def _compute_rome(self, req: Request, cfg: ROMEConfig) -> Computed:
        timings: Dict[str, float] = {}
        t = time.perf_counter()
        stats = self.stats(cfg.layer, cfg.stats_corpus, cfg.stats_tokens)
        timings["stats"] = time.perf_counter() - t
        t = time.perf_counter()
        templates = self.templates(cfg.seed, cfg.context_lengths)
        timings["templates"] = time.perf_counter() - t
        t = time.perf_counter()
        memo = self.target_memo(cfg.layer, templates, cfg.value, cfg.essence_prompts, cfg.fact_token, site="w_out")
        values = memo.get(req)  # prefetched, or computed before on the same weights
        if values is None:
            problem = ValueProblem(self.adapter, cfg.layer, [req], templates, cfg.essence_prompts, cfg.fact_token)
            values = memo[req] = optimize_values(problem, cfg.value)
        timings["values"] = time.perf_counter() - t
        t = time.perf_counter()
        C = stats.mom2.to(values.k_star.device)
        delta = compute_rome(C, values, 0, cfg.variant, cfg.layer)
        timings["solve"] = time.perf_counter() - t
        info = [{"nll_before": values.nll_before[0], "nll_after": values.nll_after[0], "steps": values.steps,
                 "delta_v_norm": float(values.delta[0].norm()), "v0_norm": float(values.v0[0].norm())}]
        return Computed([delta], values, info, timings, cfg, C)

    def edit(self, requests: Union[Request, Sequence[Request]], method: str = "r-rome",
             config=None, guard: Optional[GuardConfig] = None, **overrides) -> EditResult:
        """Compute and apply an edit. ROME variants edit several requests one after another;
        MEMIT / EMMET / AlphaEdit / FT edit them as one batch.

        The collapse guard (:mod:`factedit.guard`, on by default) rolls back an edit whose
        update norm or generation entropy looks like a disabling edit and raises
        :class:`~factedit.guard.CollapseError`; ``guard=GuardConfig(enabled=False)`` forces it.
        If anything fails, every weight touched by this call is restored before the error
        propagates.
        """
        guard = guard or GuardConfig()
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        t0 = time.perf_counter()
        done: List[EditResult] = []
        cfg0 = config.resolved(self.adapter) if config is not None else self.make_config(method, **overrides)
        from .core.fingerprints import matrix_fingerprint

        fingerprints = {self.adapter.w_out_name(l): matrix_fingerprint(self.adapter.w_out_parameter(l))
                        for l in cfg0.layers}
        groups = [[r] for r in reqs] if isinstance(cfg0, ROMEConfig) else [reqs]
        try:
            for group in groups:
                c = self.compute(group, config=cfg0)
                refs = self._guard_references(cfg0, guard)
                if guard.enabled and self._entropy is None:
                    self._entropy = entropy_probe(self.adapter, guard)
                applied = apply_deltas(self.adapter, c.deltas)
                key = getattr(c.config, "variant", method)
                if c.state_keys is not None:
                    if not any(r.stateful and r.method == key for r in self.history + done):
                        self._state_base[key] = self.state.get(key)
                    self.state[key] = add_keys(self.state.get(key), c.state_keys)
                res = EditResult(key, list(c.config.layers), list(group), c.deltas, applied, c.config,
                                 time.perf_counter() - t0, c.timings, c.info, state_keys=c.state_keys,
                                 stateful=c.state_keys is not None)
                done.append(res)
                if guard.enabled:
                    res.guard = check_guard(res, refs, self._entropy, entropy_probe(self.adapter, guard), guard,
                                            len(group))
                    if not res.guard["passed"]:
                        raise CollapseError(
                            "edit rolled back: it looks like a disabling edit that would break the model: "
                            + "; ".join(res.guard["fired"])
                            + ". Try another layer or method (r-rome is the stable ROME), or force it with "
                            "guard=GuardConfig(enabled=False) (CLI: --no-guard)."
                        )
                    self._entropy = res.guard["entropy_after"]
        except BaseException:
            for r in reversed(done):
                self._undo(r)
            raise
        finally:
            if not guard.enabled:
                self._entropy = None
        if len(done) == 1:
            result = done[0]
        else:
            result = EditResult(done[0].method, sorted({l for r in done for l in r.layers}), reqs,
                                [d for r in done for d in r.deltas], _Chain(self.adapter, [r.applied for r in done]),
                                done[0].config, 0.0, {}, [i for r in done for i in r.info])
        result.seconds = time.perf_counter() - t0
        result.fingerprints = fingerprints
        self.history.append(result)
        return result

    def revert(self, n: int = 1) -> None:
        """Undo the last ``n`` edits, newest first."""
        if n > len(self.history):
            raise MethodError(f"cannot revert {n} edits: only {len(self.history)} applied")
        for _ in range(n):
            self._undo(self.history.pop())

    # ------------------------------------------------------------------ history as patches
    def save_history(self, directory) -> List[str]:
        """Write the applied edits as a stack of patch files plus ``stack.json`` (their order)."""
        import json
        from pathlib import Path

        from .patch.files import Patch
        from .core.paths import atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        names = []
        for i, r in enumerate(self.history):
            name = f"{i:05d}-{r.method}.safetensors"
            Patch.from_result(r, self.adapter).save(d / name)
            names.append(name)
        atomic_write_text(d / "stack.json", json.dumps({"patches": names}))
        return names

    def load_history(self, directory, force: bool = False) -> int:
        """Apply a stack written by :meth:`save_history` (all or nothing) and add it to the history,
        so that :meth:`revert` can undo it edit by edit. Returns the number of edits applied."""
        import json
        from pathlib import Path

        from .patch.files import Patch, PatchError, apply_patches

        d = Path(directory)
        try:
            names = json.loads((d / "stack.json").read_text(encoding="utf-8"))["patches"]
            assert isinstance(names, list) and all(isinstance(n, str) and "/" not in n for n in names)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise PatchError(f"{d}: not a factedit history (stack.json missing or malformed)") from None
        patches = [Patch.load(d / n) for n in names]
        applied = apply_patches(self.adapter, patches, force=force)
        for p, a in zip(patches, applied):
            self.history.append(EditResult(p.meta.get("method", "patch"), list(p.meta.get("layers", [])),
                                           [Request(**r) for r in p.meta.get("requests", [])], p.deltas, a,
                                           p.meta.get("config"), guard=p.meta.get("guard"),
                                           fingerprints=dict(p.meta["fingerprints"])))
        self._entropy = None
        return len(patches)

    def _guard_references(self, cfg, guard: GuardConfig) -> Dict[int, float]:
        """Calibrated norm references (ROME variants: one layer, one request per edit)."""
        if not guard.enabled or not isinstance(cfg, ROMEConfig):
            return {}
        return {cfg.layer: norm_reference(self, cfg.layer, cfg.stats_corpus, cfg.stats_tokens,
                                          cfg.value.clamp_norm_factor)}

    def _undo(self, result: EditResult) -> None:
        """Revert the weights of ``result`` and restore the method state it replaced."""
        result.revert()
        # the weights are bit-identical to those before the edit: so is their fluency probe
        self._entropy = result.guard["entropy_before"] if result.guard else None
        if result.stateful:
            # replay the keys of the remaining stateful edits on top of the base: bit-exact
            state = self._state_base.get(result.method)
            for r in self.history:
                if r.stateful and r.method == result.method and r is not result:
                    state = add_keys(state, r.state_keys)
            if state is None:
                self.state.pop(result.method, None)
            else:
                self.state[result.method] = state


class _Chain:
    """Several applied edits reverted newest first."""

    def __init__(self, adapter, parts):
        self.adapter = adapter
        self.parts = parts

    def revert(self):
        for p in reversed(self.parts):
            p.revert()
