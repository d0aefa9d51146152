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
from typing import Dict, List, Optional, Sequence, Union

from .core.arch import ArchSpec, ModelAdapter
from .core.errors import MethodError
from .core.fingerprints import matrix_fingerprint
from .core.requests import Request
from .edit.caches import EditCaches
from .edit.deltas import ROUNDING_WARN, apply_deltas, rounding_error
from .edit.guard import Guard, GuardConfig
from .edit.guard import combine as combine_guard
from .edit.history import History
from .edit.verify import retry_config, verify_requests
from .edit.methods import make_config, spec_of_config
from .edit.methods.rome import ROMEConfig
from .edit.methods.rome import prefetch_targets as prefetch_rome_targets
from .edit.results import ChainedEdit, Computed, EditResult
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
    def history(self) -> List[EditResult]:
        """The applied edits, oldest first."""
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

    def target_memo(self, layer: int, templates, value_cfg, essence, fact_token, site: str = "residual") -> dict:
        """See :meth:`EditCaches.target_memo <factedit.edit.caches.EditCaches.target_memo>`."""
        return self.caches.target_memo(layer, templates, value_cfg, essence, fact_token, site)

    def projector(self, layer: int, C, threshold: float):
        """AlphaEdit's null-space projector (:meth:`EditCaches.projector <factedit.edit.caches.EditCaches.projector>`)."""
        return self.caches.projector(layer, C, threshold)

    # ------------------------------------------------------------------ editing
    def make_config(self, method: str = "r-rome", options=(), **overrides):
        """The method's config dataclass with model-derived defaults filled in
        (:func:`~factedit.edit.methods.make_config`); bad methods, layers and options fail here.

        The default layer is the depth rule, the same for every caller; ``layer="traced"`` edits the
        layer that ``factedit trace --dataset`` recommended for this model (cached). How the layer was
        chosen is recorded in the config's ``layer_rule`` (and so in results, patches and runs)."""
        if overrides.get("layer") == TRACED:
            rec = load_recommendation(self.adapter)
            if rec is None:
                raise MethodError("layer 'traced': no causal-trace recommendation is cached for this model; run "
                                  "`factedit trace --dataset FILE` first, or give a layer number")
            overrides["layer"] = rec.layer
            overrides.setdefault("layer_rule", f"causal-trace recommendation ({rec.n_facts} facts from "
                                               f"{rec.source or 'a data set'})")
        return make_config(self.adapter, method, options, **overrides)

    def _config(self, method: str, config, overrides):
        return config.resolved(self.adapter) if config is not None else self.make_config(method, **overrides)

    def compute(self, requests: Union[Request, Sequence[Request]], method: str = "r-rome",
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
        """Optimise the targets of single ROME edits of ``requests`` on the current weights, ``batch_size``
        at a time, for later :meth:`compute` calls on the same weights
        (:func:`~factedit.edit.methods.rome.prefetch_targets`). A no-op for the other methods, which
        batch their targets themselves. Returns the seconds spent."""
        t = time.perf_counter()
        cfg = config.resolved(self.adapter)
        if isinstance(cfg, ROMEConfig):
            prefetch_rome_targets(self.adapter, self.caches, requests, cfg, batch_size)
        return time.perf_counter() - t

    def edit(self, requests: Union[Request, Sequence[Request]], method: str = "r-rome",
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
        done: List[EditResult] = []
        try:
            for group in ([[r] for r in reqs] if spec.single_request else [reqs]):
                res = self._apply(group, cfg, spec, guard, done, t0)
                retry = retry_config(cfg) if verify and spec.single_request else None
                if not res.verified and retry is not None:
                    self._undo(done.pop())
                    res = self._apply(group, retry, spec, guard, done, t0)
                    res.retried = True
        except BaseException:
            for r in reversed(done):
                self._undo(r)
            raise
        finally:
            if not guard.enabled:
                self.guard.forget()
        result = done[0] if len(done) == 1 else EditResult(
            spec.name, sorted({l for r in done for l in r.layers}), reqs, [d for r in done for d in r.deltas],
            ChainedEdit(self.adapter, [r.applied for r in done]), cfg, 0.0, {}, [i for r in done for i in r.info],
            guard=combine_guard([r.guard for r in done]), verification=[v for r in done for v in r.verification],
            retried=any(r.retried for r in done),
            rounding={l: max(r.rounding[l] for r in done if l in r.rounding) for l in {k for r in done for k in r.rounding}})
        result.seconds = time.perf_counter() - t0
        result.fingerprints = fingerprints
        result.statistics = self.caches.sources(cfg)
        result.prompt_prefix = self.adapter.prompt_prefix
        result.fingerprints_after = {self.adapter.w_out_name(l): matrix_fingerprint(self.adapter.w_out_stored(l))
                                     for l in cfg.layers}
        self.history.append(result)
        failed = [r for r, v in zip(result.requests, result.verification) if not v["verified"]]
        if failed:
            log.warning("%d of %d edits did not take on their own prompt (%s%s)", len(failed), len(reqs),
                        ", ".join(repr(r.text + " -> " + r.target_new) for r in failed[:3]),
                        ", ..." if len(failed) > 3 else "")
        return result

    def _apply(self, group, cfg, spec, guard: GuardConfig, done: List[EditResult], t0: float) -> EditResult:
        """Compute, apply, judge (guard) and verify one group; appended to ``done``."""
        c = self.compute(group, config=cfg)
        refs = self.guard.prepare(cfg, guard)
        applied = apply_deltas(self.adapter, c.deltas)
        res = EditResult(spec.name, list(cfg.layers), list(group), c.deltas, applied, cfg,
                         time.perf_counter() - t0, c.timings, c.info, state_keys=c.state_keys,
                         stateful=c.state_keys is not None)
        if c.keys:
            res.rounding = rounding_error(applied, c.keys)
            worst = max(res.rounding.values(), default=0.0)
            if worst > ROUNDING_WARN:
                log.warning("writing the update in %s lost %.1f%% of its effect on its own keys (layer %s); edit a "
                            "float32 copy of the model for exact updates", self.adapter.w_out_parameter(cfg.layers[0]).dtype,
                            100 * worst, max(res.rounding, key=res.rounding.get))
        self._history.add_state(res, done)
        done.append(res)
        if guard.enabled:
            self.guard.judge(res, refs, guard, len(group))
        res.verification = verify_requests(self.adapter, group)
        return res

    def revert(self, n: int = 1) -> None:
        """Undo the last ``n`` edits, newest first."""
        if n > len(self.history):
            raise MethodError(f"cannot revert {n} edits: only {len(self.history)} applied")
        for _ in range(n):
            self._undo(self.history.pop())

    def _undo(self, result: EditResult) -> None:
        self._history.undo(result)
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
        result = other.history.pop()  # the list: the weights stay as they are
        other._history.release(result)
        self._history.add_state(result)
        self.history.append(result)
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
        results = load_stack(self.adapter, directory, force=force)
        self.history.extend(results)
        self.guard.forget()
        return len(results)

    def apply_patches(self, patches, force: bool = False) -> int:
        """Apply :class:`~factedit.patch.files.Patch` objects in order (base fingerprints checked; all or
        nothing) and add them to the history, so that :meth:`revert` undoes them. Returns how many."""
        results = apply_as_results(self.adapter, list(patches), force=force)
        self.history.extend(results)
        self.guard.forget()
        return len(results)
