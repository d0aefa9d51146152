"""The :class:`Editor`: the front door. A model plus what its edits reuse (:class:`~factedit.edit.caches.EditCaches`),
the applied edits (:class:`~factedit.edit.history.History`) and the collapse guard
(:class:`~factedit.edit.guard.Guard`); edits are applied atomically and reverted exactly.

    editor = Editor(*load_model())
    result = editor.edit(Request("{} is located in the city of", "Eiffel Tower", "Rome"))
    editor.revert()            # back to the original weights, bit for bit

The work is done by the packages below it: the registered method computes the deltas
(:mod:`factedit.edit.methods`), :func:`~factedit.edit.deltas.apply_deltas` writes them, the guard
judges them, and :mod:`factedit.patch.stack` turns the history into patch files and back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .core.arch import ArchSpec, ModelAdapter
from .core.errors import MethodError
from .core.fingerprints import matrix_fingerprint
from .core.requests import Request
from .core.timing import phase, record
from .edit.caches import EditCaches
from .edit.deltas import ROUNDING_WARN, apply_deltas, rounding_error
from .edit.guard import Guard, GuardConfig
from .edit.guard import combine as combine_guard
from .edit.history import History
from .edit.methods.options import MethodOptions
from .edit.methods.registry import REGISTRY, make_config, spec_of_config
from .edit.results import ChainedEdit, Computed, EditResult
from .edit.verify import verify_requests
from .edit.wear import measure_wear
from .patch.stack import apply_as_results, load_stack, save_stack
from .stats.layer import LayerStats
from .trace.cache import load_recommendation

__all__ = ["Editor", "EditResult", "Computed", "TRACED"]

#: the layer name that stands for the cached causal-trace recommendation (``--layer traced``)
TRACED = "traced"

log = logging.getLogger(__name__)


class Editor:
    """Holds a model and everything edits reuse.

    Args:
        model, tokenizer: a loaded causal LM (see :func:`factedit.load_model`).
        arch: explicit module layout for unknown architectures.
        progress: show progress bars (statistics, targets).
        prompt_prefix: what every prompt starts with (``"auto"``, ``"none"`` or a text; see
            :func:`~factedit.core.tokens.with_prompt_prefix`); :attr:`tokenizer` applies it.
    """

    def __init__(self, model, tokenizer, arch: Optional[ArchSpec] = None, progress: bool = True,
                 prompt_prefix: str = "auto"):
        self.adapter = ModelAdapter(model, tokenizer, arch, prompt_prefix)
        self.caches = EditCaches(self.adapter, progress)
        self._history = History()
        self.guard = Guard(self.adapter, self.caches)

    # ------------------------------------------------------------------ what the editor holds
    @property
    def model(self):
        return self.adapter.model

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    @property
    def progress(self) -> bool:
        return self.caches.progress

    @property
    def history(self) -> Tuple[EditResult, ...]:
        """The applied edits, oldest first (read-only: :meth:`edit`, :meth:`revert`, :meth:`load_history` and
        :meth:`apply_patches` change it)."""
        return self._history.results

    @property
    def state(self) -> Dict[str, dict]:
        """Per method, the state carried across sequential edits (AlphaEdit: ``{layer: K_p K_pᵀ}``)."""
        return self._history.state

    def templates(self, seed: int = 0, lengths=((5, 10), (10, 10))) -> List[str]:
        return self.caches.templates(seed, lengths)

    def stats(self, layer: int, corpus: Optional[str] = None, n_tokens: int = 100_000, seq_len: int = 256,
              dtype: str = "float64") -> LayerStats:
        return self.caches.stats(layer, corpus, n_tokens, seq_len, dtype)

    def weights_memo(self, kind: str, *key) -> dict:
        """See :meth:`EditCaches.weights_memo <factedit.edit.caches.EditCaches.weights_memo>`."""
        return self.caches.weights_memo(kind, *key)

    # ------------------------------------------------------------------ editing
    def make_config(self, method: Union[str, MethodOptions, None] = None, options=(), **overrides):
        """The method's config dataclass with model-derived defaults filled in; bad methods, layers and
        options fail here. ``method`` is a method name (``options``: ``--set`` pairs or a mapping; keywords:
        the fields of :class:`~factedit.edit.methods.options.MethodOptions` — layer, layers, steps,
        target_batch, seed, the statistics — or any field of the method's config) or a whole
        :class:`~factedit.edit.methods.options.MethodOptions`, the form every front end hands over. ``method``
        None: the default method (r-rome), or the one ``hparams=FILE`` (a ROME/MEMIT-repository JSON or EasyEdit
        YAML file, read under the other options) is for.

        The default layer is the depth rule, the same for every caller; ``layer="traced"`` edits the
        layer that ``factedit trace --dataset`` recommended for this model (cached). How the layer was
        chosen is recorded in the config's ``layer_rule`` (and so in results, patches and runs)."""
        opts = method if isinstance(method, MethodOptions) else MethodOptions.of(method, options, **overrides)
        if opts.layer == TRACED:
            rec = load_recommendation(self.adapter)
            if rec is None:
                raise MethodError("layer 'traced': no causal-trace recommendation is cached for this model; run "
                                  "`factedit trace --dataset FILE` first, or give a layer number")
            opts = replace(opts, layer=rec.layer, layer_rule=opts.layer_rule or (
                f"causal-trace recommendation ({rec.n_facts} facts from {rec.source or 'a data set'})"))
        return make_config(self.adapter, opts)

    def _config(self, method: Optional[str], config, overrides):
        return config.resolved(self.adapter) if config is not None else self.make_config(method, **overrides)

    def compute(self, requests: Union[Request, Sequence[Request]], method: Optional[str] = None,
                config=None, **overrides) -> Computed:
        """Compute (but do not apply) an edit. Nothing in the model changes.

        ROME variants take exactly one request; MEMIT / EMMET / AlphaEdit / FT take a batch.
        """
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        if not reqs:
            raise MethodError("no requests to edit")
        cfg = self._config(method, config, overrides)
        spec = spec_of_config(cfg)
        return spec.compute(self.adapter, self.caches, reqs, cfg, self.state.get(spec.name))

    def prefetch_targets(self, requests: Sequence[Request], config, batch_size: int = 16) -> float:
        """Optimise the targets of single edits of ``requests`` on the current weights, ``batch_size``
        at a time, for later :meth:`compute` calls on the same weights (the registration's ``prefetch``,
        e.g. :func:`~factedit.edit.methods.rome.prefetch_targets`). A no-op for methods without one (the
        batch methods optimise their targets together themselves). Returns the seconds spent."""
        t = time.perf_counter()
        cfg = config.resolved(self.adapter)
        spec = spec_of_config(cfg)
        if spec.prefetch is not None:
            spec.prefetch(self.adapter, self.caches, requests, cfg, batch_size)
        return time.perf_counter() - t

    def edit(self, requests: Union[Request, Sequence[Request]], method: Optional[str] = None,
             config=None, guard: Optional[GuardConfig] = None, verify: bool = True, **overrides) -> EditResult:
        """Compute and apply an edit. ROME variants edit several requests one after another;
        MEMIT / EMMET / AlphaEdit / FT edit them as one batch.

        The collapse guard (:mod:`factedit.edit.guard`, on by default) rolls back an edit whose
        update norm or generation entropy looks like a disabling edit and raises
        :class:`~factedit.edit.guard.CollapseError`; ``guard=GuardConfig(enabled=False)`` forces it.
        If anything fails, every weight touched by this call is restored before the error
        propagates.

        Every edit is then checked on each request's own prompt (:mod:`factedit.edit.verify`):
        ``result.verification`` holds the outcomes and ``result.verified`` their conjunction. With
        ``verify`` (default) a single-request edit that did not take is undone and optimised once more
        within the retry budget (:func:`~factedit.edit.verify.retry_config`); one that still does not
        take stays applied with ``verified`` False and a warning (the CLI refuses it unless
        ``--allow-unverified``). ``verify=False`` measures the raw method (outcomes still recorded).
        """
        guard = guard or GuardConfig()
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        t0 = time.perf_counter()
        cfg = self._config(method, config, overrides)
        spec = spec_of_config(cfg)
        fingerprints = {self.adapter.w_out_name(l): matrix_fingerprint(self.adapter.w_out_stored(l))
                        for l in cfg.layers}
        n0 = len(self._history)
        retry = spec.retry(cfg) if verify and spec.single_request and spec.retry is not None else None
        try:
            for group in ([[r] for r in reqs] if spec.single_request else [reqs]):
                res = self._apply(group, cfg, spec, guard)
                if not res.verified and retry is not None:
                    self._undo()
                    res = self._apply(group, retry, spec, guard)
                    res.retried = True
        except BaseException:
            while len(self._history) > n0:
                self._undo()
            raise
        finally:
            if not guard.enabled:
                self.guard.forget()
        done = self._history.results[n0:]
        result = done[0] if len(done) == 1 else _chained(self.adapter, spec.name, reqs, cfg, done)
        result.seconds = time.perf_counter() - t0
        result.fingerprints = fingerprints
        result.statistics = self.caches.sources(cfg)
        result.prompt_prefix = self.adapter.prompt_prefix
        result.fingerprints_after = {self.adapter.w_out_name(l): matrix_fingerprint(self.adapter.w_out_stored(l))
                                     for l in cfg.layers}
        if len(done) > 1:
            self._history.merge_last(len(done), result)
            result.wear = self._wear(result, cfg, spec)
        failed = [r for r, v in zip(result.requests, result.verification) if not v["verified"]]
        if failed:
            log.warning("%d of %d edits did not take on their own prompt (%s%s)", len(failed), len(reqs),
                        ", ".join(repr(r.text + " -> " + r.target_new) for r in failed[:3]),
                        ", ..." if len(failed) > 3 else "")
        return result

    def _apply(self, group, cfg, spec, guard: GuardConfig) -> EditResult:
        """Compute, apply, judge (guard) and verify one group; it joins the history as it is applied (an
        error or a collapse after that is undone by the caller)."""
        t0 = time.perf_counter()
        with phase("compute the update"):
            c = self.compute(group, config=cfg)
        for name, seconds in c.timings.items():
            record(name, seconds, deeper=1)
        with phase("guard: probe and references"):
            refs = self.guard.prepare(cfg, guard, norm_limit=spec.norm_limit)
        applied = apply_deltas(self.adapter, c.deltas)
        res = EditResult(spec.name, list(cfg.layers), list(group), c.deltas, applied, cfg,
                         time.perf_counter() - t0, c.timings, c.info,
                         state_updates=[] if c.state_update is None else [c.state_update])
        if c.keys:
            res.rounding = rounding_error(applied, c.keys)
            worst = max(res.rounding.values(), default=0.0)
            if worst > ROUNDING_WARN:
                log.warning("writing the update in %s lost %.1f%% of its effect on its own keys (layer %s); edit a "
                            "float32 copy of the model for exact updates",
                            self.adapter.w_out_parameter(cfg.layers[0]).dtype,
                            100 * worst, max(res.rounding, key=res.rounding.get))
        self._history.push(res)
        with phase("wear"):
            res.wear = self._wear(res, cfg, spec)
        if guard.enabled:
            with phase("guard: judge"):
                self.guard.judge(res, refs, guard, len(group))
        t = time.perf_counter()
        with phase("verify"):
            res.verification = verify_requests(self.adapter, group)
        res.timings["verify"] = time.perf_counter() - t
        return res

    def revert(self, n: int = 1) -> None:
        """Undo the last ``n`` edits, newest first."""
        if n > len(self._history):
            raise MethodError(f"cannot revert {n} edits: only {len(self._history)} applied")
        for _ in range(n):
            self._undo()

    def _undo(self) -> None:
        result = self._history.pop()
        self.guard.reverted(result)  # the weights are bit-identical to those before the edit

    def adopt(self, other: "Editor") -> EditResult:
        """Take over the newest edit of ``other``, an Editor over the same model (e.g. one that reads prompts
        without the prompt prefix, for chat turns): it stays applied and joins this history with its method
        state (AlphaEdit's keys), so :meth:`revert` undoes it here; ``other`` forgets it. Both guards probe
        again next time (the weights changed behind each one's back)."""
        if other.model is not self.model:
            raise MethodError("adopt takes edits of an Editor over the same model object")
        if not other.history:
            raise MethodError("the other editor holds no edit to adopt")
        result = other._history.take()  # the weights stay as they are
        self._history.push(result)
        self.guard.forget()
        other.guard.forget()
        return result

    # ------------------------------------------------------------------ history as patches
    def save_history(self, directory) -> List[str]:
        """Write the applied edits as a stack of patch files plus ``stack.json`` (their order)."""
        return save_stack(self.history, self.adapter, directory)

    def load_history(self, directory, force: bool = False) -> int:
        """Apply a stack written by :meth:`save_history` (all or nothing) and add it to the history,
        so that :meth:`revert` can undo it edit by edit. Returns the number of edits applied."""
        return self._join(load_stack(self.adapter, directory, force=force))

    def apply_patches(self, patches, force: bool = False) -> int:
        """Apply :class:`~factedit.patch.files.Patch` objects in order (base fingerprints checked; all or
        nothing) and add them to the history, so that :meth:`revert` undoes them. Returns how many."""
        return self._join(apply_as_results(self.adapter, list(patches), force=force))

    def _join(self, results: Sequence[EditResult]) -> int:
        """Applied results (patches) join the history, their method state folded in."""
        results = list(results)
        for i, r in enumerate(results):
            self._history.push(r)
            if not r.wear:  # a patch written before the wear meter: the matrices right after it are those the
                after = {}  # next patch touching each layer started from (all are applied by now)
                for later in reversed(results[i + 1:]):
                    after.update(later.applied.originals)
                r.wear = self._wear(r, r.config, REGISTRY.get(r.method), after)
        self.guard.forget()
        return len(results)

    def _wear(self, result: EditResult, cfg, spec, after=None) -> dict:
        """The wear meter of ``result``, the newest edit of the history (:mod:`factedit.edit.wear`)."""
        room = None
        if spec is not None and spec.room is not None and not isinstance(cfg, dict):
            room = spec.room(self.adapter, self.caches, cfg, self.state.get(spec.name))
        return measure_wear(self.adapter, self._history.results, result, room, after)


def _chained(adapter, method: str, requests, cfg, done: Sequence[EditResult]) -> EditResult:
    """One result for edits of one call made one after another (a ROME edit of several requests)."""
    layers = {k for r in done for k in r.rounding}
    return EditResult(
        method, sorted({l for r in done for l in r.layers}), list(requests), [d for r in done for d in r.deltas],
        ChainedEdit(adapter, [r.applied for r in done]), cfg, 0.0, {}, [i for r in done for i in r.info],
        state_updates=[u for r in done for u in r.state_updates], guard=combine_guard([r.guard for r in done]),
        verification=[v for r in done for v in r.verification], retried=any(r.retried for r in done),
        rounding={k: max(r.rounding[k] for r in done if k in r.rounding) for k in layers})
