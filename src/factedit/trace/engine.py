"""The causal-tracing engine: one prompt's clean and corrupted runs, then batched restored runs.

    tracer = CausalTracer(adapter, ids, subject_range=(1, 4), sigma=0.36, samples=10)
    p = tracer.restored([[("hidden", 5, 3)], [("mlp", m, 3) for m in range(0, 5)]], answer_id)

One forward holds many rows, each a (restore set, noise sample) pair; rows are grouped so that
positions before the first restored one come from a KV cache of the corrupted run and layers
before the first restored one are not run (their outputs are the recorded corrupted ones).

The math, with the deviations from the papers: docs/ALGORITHMS.md §7.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.errors import TraceError
from ..core.hooks import Hook, RawOutput, start_at_layer
from ..core.kv import cache_of, past

__all__ = ["KINDS", "Site", "gaussian_noise", "CausalTracer"]

KINDS = ("hidden", "mlp", "attn")

#: one restored site: (kind, layer, token position)
Site = Tuple[str, int, int]


def gaussian_noise(samples: int, n_tokens: int, width: int, sigma: float, seed: int) -> torch.Tensor:
    """(samples, n_tokens, width) float32 N(0, σ²) noise from a private seeded generator."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((samples, n_tokens, width), generator=gen, dtype=torch.float32) * float(sigma)


class CausalTracer:
    """Clean and corrupted runs of one prompt, then batched restored runs.

        tracer = CausalTracer(adapter, prompt.ids, prompt.subject_range, sigma=0.1, samples=10)
        p = tracer.restored([[("hidden", 5, 3)], [("mlp", m, 3) for m in range(0, 5)]], answer_id)

    Args:
        adapter: the model (any device / dtype).
        ids: prompt token ids (no padding).
        subject_range: ``[start, end)`` token positions that get noise.
        sigma: noise scale; 0 makes the corrupted run equal the clean one.
        samples, seed: noise samples and their seed.
    """

    def __init__(self, adapter, ids: Sequence[int], subject_range: Tuple[int, int], sigma: float,
                 samples: int = 10, seed: int = 0):
        self.adapter = adapter
        self.T = len(ids)
        self.ids = torch.tensor([list(ids)], device=adapter.input_device)  # (1, T)
        self.subject_range = subject_range
        self.S = samples
        self._clean_run()
        s, e = subject_range
        if not 0 <= s < e <= self.T:
            raise TraceError(f"subject range {subject_range!r} is not inside the {self.T} prompt tokens")
        self.noise = gaussian_noise(samples, e - s, self.width, sigma, seed).to(adapter.input_device, self.dtype)
        self._corrupt_run()

    @torch.no_grad()
    def _clean_run(self) -> None:
        ad = self.adapter
        with contextlib.ExitStack() as stack:
            emb = stack.enter_context(Hook(ad.embed, retain_output=True))
            raw = stack.enter_context(RawOutput(ad.layers[0]))
            traces = {(k, l): stack.enter_context(Hook(ad.component(k, l), retain_output=True))
                      for k in KINDS for l in range(ad.n_layers)}
            h = ad.body(input_ids=self.ids).last_hidden_state
        self.width, self.dtype = emb.output.shape[-1], emb.output.dtype
        self.out_device = h.device  # the final states' device (the last layer's, or the final norm's)
        self.layer_template = raw.output
        self.clean = {k: [traces[k, l].output[0] for l in range(ad.n_layers)] for k in KINDS}  # (T, d) each
        self.clean_probs = self._probs(h[:, -1])[0]  # (V,)

    @torch.no_grad()
    def _corrupt_run(self) -> None:
        ad = self.adapter
        sample = torch.arange(self.S, device=ad.input_device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(Hook(ad.embed, edit_output=self._add_noise(sample, 0)))
            traces = [stack.enter_context(Hook(ad.layers[l], retain_output=True)) for l in range(ad.n_layers)]
            h = ad.body(input_ids=self.ids.expand(self.S, self.T)).last_hidden_state
        self.corrupt_layers = [t.output for t in traces]  # (S, T, d) each
        self.corrupt_probs = self._probs(h[:, -1]).double().mean(0)  # (V,)
        self._prefix: Dict[int, object] = {}

    @torch.no_grad()
    def _prefix_cache(self, p0: int):
        """KV cache of the corrupted run over positions ``[0, p0)`` (S rows; ``None`` for p0 = 0)."""
        if p0 and p0 not in self._prefix:
            sample = torch.arange(self.S, device=self.adapter.input_device)
            with Hook(self.adapter.embed, edit_output=self._add_noise(sample, 0)):
                out = self.adapter.body(input_ids=self.ids[:, :p0].expand(self.S, p0), use_cache=True)
            self._prefix[p0] = cache_of(out)
        return self._prefix.get(p0)

    def _probs(self, h_last: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.adapter.logits(h_last).float(), dim=-1)

    def _add_noise(self, sample: torch.Tensor, offset: int):
        """An embedding edit adding each row's noise sample to the subject positions, for an
        input that starts at position ``offset``."""
        s, e = self.subject_range
        noise = self.noise[sample]  # (rows, e - s, d)

        def edit(h: torch.Tensor) -> torch.Tensor:
            lo, hi = max(s, offset), min(e, offset + h.shape[1])
            if lo >= hi:
                return h
            out = h.clone()
            out[:, lo - offset: hi - offset] += noise[:, lo - s: hi - s].to(h.device, h.dtype)
            return out

        return edit

    @property
    def greedy_answer(self) -> int:
        """The clean run's most likely next token."""
        return int(self.clean_probs.argmax())

    def p_clean(self, answer_id: int) -> float:
        return float(self.clean_probs[answer_id])

    def p_corrupt(self, answer_id: int) -> float:
        return float(self.corrupt_probs[answer_id])

    @torch.no_grad()
    def restored(self, sets: Sequence[Sequence[Site]], answer_id: int, batch_tokens: int = 16384,
                 on_progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Mean P(answer) over the noise samples for each restore set: (len(sets),) float64.
        ``on_progress(done, total)`` is called after each batch of forwards (sets run so far).

        Sets are grouped by their first restored position p0 (positions before it come from a
        cached corrupted prefix), then by their first restored layer (earlier layers are skipped);
        see :func:`_chunks` for how layer groups share forwards. The final states of all forwards
        share one LM-head pass.
        """
        L = self.adapter.n_layers
        groups: Dict[int, Dict[int, List[int]]] = defaultdict(lambda: defaultdict(list))
        for i, sites in enumerate(sets):
            for kind, layer, token in sites:
                self.adapter.check_layer(layer)
                if kind not in KINDS or not 0 <= token < self.T:
                    raise TraceError(f"invalid restore site {(kind, layer, token)!r}")
            inject = min((layer if kind == "hidden" else layer - 1 for kind, layer, _ in sites), default=L - 1)
            groups[min((token for _, _, token in sites), default=self.T - 1)][inject].append(i)
        finals = torch.empty(len(sets), self.S, self.width, device=self.out_device, dtype=self.dtype)
        done = 0
        for p0, by_layer in sorted(groups.items()):
            per_set = self.S * (self.T - p0)  # rows × positions of one set
            for start, idx in _chunks(by_layer, per_set, L, max(per_set, batch_tokens)):
                finals[idx] = self._run(p0, start, [sets[j] for j in idx])
                done += len(idx)
                if on_progress is not None:
                    on_progress(done, len(sets))
        probs = torch.cat([self._probs(f.reshape(-1, self.width))[:, answer_id].double().cpu()
                           for f in finals.split(max(1, 4096 // self.S))])
        return probs.view(len(sets), self.S).mean(1)

    @torch.no_grad()
    def _run(self, p0: int, inject: int, sets: Sequence[Sequence[Site]]) -> torch.Tensor:
        """One forward of S × len(sets) rows (row = sample · n + set) over positions ``[p0, T)``;
        layers ≤ ``inject`` come from the corrupted run, positions < p0 from its KV cache.
        Returns the final states at the last position, (len(sets), S, d)."""
        ad, S, T, n = self.adapter, self.S, self.T, len(sets)
        dev = ad.input_device
        B = n * S
        sample = torch.arange(B, device=dev) // n
        sites: Dict[Tuple[str, int], Tuple[list, list]] = defaultdict(lambda: ([], []))
        for i, st in enumerate(sets):
            for kind, layer, token in st:
                rows, toks = sites[kind, layer]
                rows.append(torch.arange(S) * n + i)
                toks.append(torch.full((S,), token))
        cache = copy.deepcopy(self._prefix_cache(p0))
        if cache is not None and n > 1:
            cache.batch_repeat_interleave(n)  # row s·n + i holds sample s
        with contextlib.ExitStack() as stack:
            if inject >= 0:  # (B, T - p0, d) corrupted output of layer `inject`
                layer_out = self.corrupt_layers[inject]
                start = layer_out[sample.to(layer_out.device), p0:]
                stack.enter_context(start_at_layer(ad.layers, inject, start, self.layer_template))
            else:
                stack.enter_context(Hook(ad.embed, edit_output=self._add_noise(sample, p0)))
            for (kind, layer), (rows, toks) in sites.items():
                fn = _restore(torch.cat(rows), torch.cat(toks), self.clean[kind][layer], p0)
                stack.enter_context(Hook(ad.component(kind, layer), edit_output=fn))
            pos = torch.arange(p0, T, device=dev)[None].expand(B, -1)
            h = ad.body(input_ids=self.ids[:, p0:].expand(B, -1), position_ids=pos,
                        **past(ad.body, cache)).last_hidden_state[:, -1]
        return h.view(S, n, -1).transpose(0, 1)


def _chunks(by_layer: Dict[int, List[int]], per_set: int, n_layers: int, batch_tokens: int,
            small: int = 16, fixed: int = 64):
    """Split sets (keyed by the layer a forward must start after) into forwards.

    A forward starts after its earliest layer; sets that could start later then recompute a few
    corrupted layers. A layer group joins the current forward while that waste (its tokens × the
    extra layers) is below what a separate forward costs: ``small`` token-rows per layer of a
    small matrix product plus ``fixed`` for a forward's own overhead. Yields (start, set indices).
    """
    chunk: List[int] = []
    start = size = 0
    for layer in sorted(by_layer):
        idx = by_layer[layer]
        for c in range(0, len(idx), max(1, batch_tokens // per_set)):
            part = idx[c: c + max(1, batch_tokens // per_set)]
            tokens = len(part) * per_set
            waste = tokens * (layer - start)
            if chunk and size + tokens <= batch_tokens and waste <= (n_layers - 1 - layer) * small + fixed:
                chunk += part
                size += tokens
                continue
            if chunk:
                yield start, chunk
            chunk, start, size = list(part), layer, tokens
    if chunk:
        yield start, chunk


def _restore(rows: torch.Tensor, toks: torch.Tensor, clean: torch.Tensor, offset: int):
    """An output edit putting the clean states (T, d) back at (row, token) pairs of an input
    that starts at position ``offset``."""
    rows, toks = rows.to(clean.device), toks.to(clean.device)  # the component's device: where it runs
    values = clean[toks]

    def edit(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[rows.to(out.device), (toks - offset).to(out.device)] = values.to(out.device, out.dtype)
        return out

    return edit
