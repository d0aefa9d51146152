"""Causal tracing (ALGORITHMS.md §7): which (token, layer) states carry a fact.

    result = trace_prompt(adapter, "The Space Needle is in the city of", "Space Needle")
    result.scores["mlp"]        # (tokens, layers): P(answer) with a window of MLPs restored
    result.recommended_layer    # strongest MLP effect at the last subject token

The subject's token embeddings are corrupted with Gaussian noise of scale σ (see
:func:`factedit.trace_cache.noise_sigma`); a *restore set* then puts back the clean output
of some (module, layer, token) sites. One forward holds many rows, each a (restore set,
noise sample) pair; rows whose first restored site is at the same layer share a forward
that skips every earlier layer (their outputs are those of the recorded corrupted run).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import LayerError, RequestError, TraceError
from .hooks import Trace, replaced_forward, rewrap
from .tokens import encode, token_at_char

__all__ = ["KINDS", "TOKEN_CLASSES", "token_classes", "TraceConfig", "TracePrompt", "TraceResult", "CausalTracer", "window_layers",
           "restore_set", "prepare_prompt", "gaussian_noise", "trace_prompt"]

KINDS = ("hidden", "mlp", "attn")
TOKEN_CLASSES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")

#: one restored site: (kind, layer, token position)
Site = Tuple[str, int, int]


@dataclass(frozen=True)
class TraceConfig:
    """Knobs of a causal trace.

    Attributes:
        kinds: which states to restore: ``"hidden"`` (residual stream after a layer),
            ``"mlp"``, ``"attn"`` (module outputs over a window of layers).
        samples: noise samples per prompt (P is averaged over them).
        window: MLP / attention layers restored together, centred on each layer
            (``None``: 10, or the model's depth if it has fewer layers).
        noise_factor: σ = factor × the embedding standard deviation over subjects (ROME: 3).
        seed: seed of the noise (the same samples serve every restore set).
        batch_tokens: rows × prompt tokens per forward (memory bound).
        classes: trace only the tokens of these :data:`TOKEN_CLASSES` (``None``: every token);
            the other cells are NaN. ``("last_subject",)`` is all a layer recommendation needs.
    """

    kinds: Tuple[str, ...] = KINDS
    samples: int = 10
    window: Optional[int] = None
    noise_factor: float = 3.0
    seed: int = 0
    batch_tokens: int = 16384
    classes: Optional[Tuple[str, ...]] = None

    def check(self, n_layers: int) -> "TraceConfig":
        """A copy with the window resolved for a model of ``n_layers``; raises on bad settings."""
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise TraceError(f"unknown trace kind(s) {bad or list(self.kinds)}; choose from {', '.join(KINDS)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise TraceError(f"samples must be a positive integer, got {self.samples!r}")
        if self.window is None:
            return replace(self, window=min(10, n_layers)).check(n_layers)
        if not isinstance(self.window, int) or self.window < 1:
            raise LayerError(f"window must be a positive number of layers, got {self.window!r}")
        if self.window > n_layers:
            raise LayerError(f"window {self.window} is larger than the model: it has {n_layers} layers")
        if self.classes is not None and (not self.classes or set(self.classes) - set(TOKEN_CLASSES)):
            raise TraceError(f"token classes must be among {', '.join(TOKEN_CLASSES)}; got {self.classes!r}")
        if not self.noise_factor >= 0:
            raise TraceError(f"noise_factor must be >= 0, got {self.noise_factor!r}")
        return self


def token_classes(n_tokens: int, subject_range: Tuple[int, int]) -> Dict[str, List[int]]:
    """Token positions of each class for a prompt of ``n_tokens`` with the subject at ``[s, e)``.

    As in ROME's averages, a one-token subject is both the first and the last subject token,
    and a single token after the subject is both the first subsequent and the last token.
    Tokens before the subject belong to no class (noise cannot reach them).
    """
    s, e = subject_range
    if not 0 <= s < e <= n_tokens:
        raise TraceError(f"subject range {subject_range!r} is not inside {n_tokens} tokens")
    return {
        "first_subject": [s],
        "middle_subject": list(range(s + 1, e - 1)),
        "last_subject": [e - 1],
        "first_subsequent": [e] if e < n_tokens else [],
        "further": list(range(e + 1, n_tokens - 1)),
        "last": [n_tokens - 1],
    }


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored around ``layer``: ``[layer - window//2, layer + window - window//2)``,
    clipped to ``[0, n_layers)`` (ROME's convention; window 10 at layer 12 → 7..16)."""
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


def restore_set(kind: str, token: int, layer: int, window: int, n_layers: int) -> List[Site]:
    """The sites restored for one cell of a ``kind`` heatmap."""
    if kind == "hidden":
        return [("hidden", layer, token)]
    return [(kind, m, token) for m in window_layers(layer, window, n_layers)]


@dataclass(frozen=True)
class TracePrompt:
    """A tokenized prompt: ids, the subject's token range ``[start, end)``, the answer token."""

    text: str
    subject: str
    ids: Tuple[int, ...]
    subject_range: Tuple[int, int]
    answer_id: Optional[int] = None


def prepare_prompt(tok, prompt: str, subject: str, answer: Optional[str] = None,
                   max_len: Optional[int] = None) -> TracePrompt:
    """Tokenize ``prompt`` (``"{}"`` is filled with ``subject``) and find the subject's tokens.

    ``answer`` (optional) must continue the prompt: a space is put before it unless either
    side already has one, and the prompt's tokens must stay the same; its first token is traced.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("the prompt is empty")
    if not isinstance(subject, str) or not subject.strip():
        raise RequestError("the subject is empty")
    if prompt.count("{}") == 1:
        prompt = prompt.replace("{}", subject)
    start = prompt.find(subject)
    if start < 0:
        raise RequestError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    ids, offsets = encode(tok, prompt)
    if not ids:
        raise RequestError(f"the prompt {prompt!r} produces no tokens")
    if max_len is not None and len(ids) > max_len:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model accepts at most {max_len}")
    end = start + len(subject)
    if offsets is not None:
        rng = (token_at_char(offsets, start), token_at_char(offsets, end - 1) + 1)
    else:
        rng = (len(tok(prompt[:start])["input_ids"]), len(tok(prompt[:end])["input_ids"]))
    answer_id = None if answer is None else _answer_token(tok, prompt, ids, answer)
    return TracePrompt(prompt, subject, tuple(ids), rng, answer_id)


def _answer_token(tok, prompt: str, ids: List[int], answer: str) -> int:
    if not isinstance(answer, str) or not answer.strip():
        raise RequestError("the answer is empty")
    text = answer if (answer[0].isspace() or prompt[-1].isspace()) else " " + answer
    full, _ = encode(tok, prompt + text)
    if len(full) <= len(ids) or full[: len(ids)] != list(ids):
        raise RequestError(
            f"answer {answer!r} is not a continuation of the prompt {prompt!r}: together they "
            "tokenize differently from the prompt alone (remove trailing spaces, or give the answer "
            "with the text that follows the prompt)")
    return int(full[len(ids)])


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
        self.ids = torch.tensor([list(ids)], device=adapter.device)  # (1, T)
        self.subject_range = subject_range
        self.S = samples
        self._clean_run()
        s, e = subject_range
        if not 0 <= s < e <= self.T:
            raise TraceError(f"subject range {subject_range!r} is not inside the {self.T} prompt tokens")
        self.noise = gaussian_noise(samples, e - s, self.width, sigma, seed).to(adapter.device, self.dtype)
        self._corrupt_run()

    @torch.no_grad()
    def _clean_run(self) -> None:
        ad = self.adapter
        with contextlib.ExitStack() as stack:
            emb = stack.enter_context(Trace(ad.embed, retain_output=True))
            raw = stack.enter_context(_RawOutput(ad.layers[0]))
            traces = {(k, l): stack.enter_context(Trace(ad.component(k, l), retain_output=True))
                      for k in KINDS for l in range(ad.n_layers)}
            h = ad.body(input_ids=self.ids).last_hidden_state
        self.width, self.dtype = emb.output.shape[-1], emb.output.dtype
        self.layer_template = raw.output
        self.clean = {k: [traces[k, l].output[0] for l in range(ad.n_layers)] for k in KINDS}  # (T, d) each
        self.clean_probs = self._probs(h[:, -1])[0]  # (V,)

    @torch.no_grad()
    def _corrupt_run(self) -> None:
        ad = self.adapter
        sample = torch.arange(self.S, device=ad.device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(Trace(ad.embed, edit_output=self._add_noise(sample, 0)))
            traces = [stack.enter_context(Trace(ad.layers[l], retain_output=True)) for l in range(ad.n_layers)]
            h = ad.body(input_ids=self.ids.expand(self.S, self.T)).last_hidden_state
        self.corrupt_layers = [t.output for t in traces]  # (S, T, d) each
        self.corrupt_probs = self._probs(h[:, -1]).double().mean(0)  # (V,)
        self._prefix: Dict[int, object] = {}

    @torch.no_grad()
    def _prefix_cache(self, p0: int):
        """KV cache of the corrupted run over positions ``[0, p0)`` (S rows; ``None`` for p0 = 0)."""
        if p0 and p0 not in self._prefix:
            sample = torch.arange(self.S, device=self.adapter.device)
            with Trace(self.adapter.embed, edit_output=self._add_noise(sample, 0)):
                out = self.adapter.body(input_ids=self.ids[:, :p0].expand(self.S, p0), use_cache=True)
            self._prefix[p0] = out.past_key_values
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
            out[:, lo - offset: hi - offset] += noise[:, lo - s: hi - s].to(h.dtype)
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
    def restored(self, sets: Sequence[Sequence[Site]], answer_id: int, batch_tokens: int = 16384) -> torch.Tensor:
        """Mean P(answer) over the noise samples for each restore set: (len(sets),) float64.

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
        finals = torch.empty(len(sets), self.S, self.width, device=self.adapter.device, dtype=self.dtype)
        for p0, by_layer in sorted(groups.items()):
            per_set = self.S * (self.T - p0)  # rows × positions of one set
            for start, idx in _chunks(by_layer, per_set, L, max(per_set, batch_tokens)):
                finals[idx] = self._run(p0, start, [sets[j] for j in idx])
        probs = torch.cat([self._probs(f.reshape(-1, self.width))[:, answer_id].double().cpu()
                           for f in finals.split(max(1, 4096 // self.S))])
        return probs.view(len(sets), self.S).mean(1)

    @torch.no_grad()
    def _run(self, p0: int, inject: int, sets: Sequence[Sequence[Site]]) -> torch.Tensor:
        """One forward of S × len(sets) rows (row = sample · n + set) over positions ``[p0, T)``;
        layers ≤ ``inject`` come from the corrupted run, positions < p0 from its KV cache.
        Returns the final states at the last position, (len(sets), S, d)."""
        ad, S, T, n = self.adapter, self.S, self.T, len(sets)
        dev = ad.device
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
            if inject >= 0:
                tmpl, start = self.layer_template, self.corrupt_layers[inject][sample, p0:]  # (B, T - p0, d)

                def skip(*args, **kwargs):
                    return rewrap(tmpl, args[0] if args else kwargs["hidden_states"])

                for m in range(inject):
                    stack.enter_context(replaced_forward(ad.layers[m], skip))
                stack.enter_context(replaced_forward(ad.layers[inject], lambda *a, **k: rewrap(tmpl, start)))
            else:
                stack.enter_context(Trace(ad.embed, edit_output=self._add_noise(sample, p0)))
            for (kind, layer), (rows, toks) in sites.items():
                fn = _restore(torch.cat(rows).to(dev), torch.cat(toks).to(dev), self.clean[kind][layer], p0)
                stack.enter_context(Trace(ad.component(kind, layer), edit_output=fn))
            pos = torch.arange(p0, T, device=dev)[None].expand(B, -1)
            h = ad.body(input_ids=self.ids[:, p0:].expand(B, -1), position_ids=pos, past_key_values=cache,
                        use_cache=cache is not None).last_hidden_state[:, -1]
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
    values = clean[toks]

    def edit(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[rows, toks - offset] = values.to(out.dtype)
        return out

    return edit


class _RawOutput(Trace):
    """Keeps a module's raw output object (tensor or tuple), to mimic its structure."""

    def _hook(self, module, inputs, output):
        self.output = output
        return output


@dataclass
class TraceResult:
    """A full trace of one prompt. ``scores[kind]`` is (tokens, layers) P(answer), float64."""

    prompt: str
    subject: str
    tokens: List[str]
    subject_range: Tuple[int, int]
    answer: str
    answer_id: int
    p_clean: float
    p_corrupt: float
    scores: Dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 10
    window: int = 10
    noise_sigma: float = 0.0

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.scores.values())).shape[1])

    @property
    def recommended_layer(self) -> Optional[int]:
        """Layer of the strongest MLP effect at the last subject token (``None`` without MLP)."""
        row = self.scores["mlp"][self.subject_range[1] - 1] if "mlp" in self.scores else None
        return None if row is None or bool(row.isnan().any()) else int(row.argmax())

    def to_dict(self) -> dict:
        out = {"prompt": self.prompt, "subject": self.subject, "answer": self.answer, "answer_id": self.answer_id,
               "tokens": self.tokens, "subject_range": list(self.subject_range),
               "layers": list(range(self.n_layers)), "p_clean": self.p_clean, "p_corrupt": self.p_corrupt}
        for k in KINDS:
            out[k] = [[None if x != x else x for x in row] for row in self.scores[k].tolist()] if k in self.scores else None
        out.update(recommended_layer=self.recommended_layer, samples=self.samples, window=self.window,
                   noise_sigma=self.noise_sigma)
        return out


def trace_prompt(adapter, prompt: str, subject: str, answer: Optional[str] = None,
                 config: Optional[TraceConfig] = None, sigma: Optional[float] = None) -> TraceResult:
    """Trace every (token, layer) of ``prompt`` for the kinds in ``config``.

    Without ``answer`` the model's own greedy next token is traced. ``sigma`` defaults to
    ``config.noise_factor`` × the cached embedding std of the model. Positions before the
    subject are not run: noise cannot reach them, so restoring them gives P_corrupt exactly.
    With ``config.classes`` only those token classes are traced (other cells NaN).
    """
    cfg = (config or TraceConfig()).check(adapter.n_layers)
    tp = prepare_prompt(adapter.tokenizer, prompt, subject, answer, adapter.max_positions)
    if sigma is None:
        from .trace_cache import noise_sigma

        sigma = noise_sigma(adapter, factor=cfg.noise_factor)
    tracer = CausalTracer(adapter, tp.ids, tp.subject_range, sigma, cfg.samples, cfg.seed)
    answer_id = tracer.greedy_answer if tp.answer_id is None else tp.answer_id
    p_corrupt = tracer.p_corrupt(answer_id)
    L, T, first = adapter.n_layers, len(tp.ids), tp.subject_range[0]
    if cfg.classes is None:
        positions = list(range(first, T))
    else:
        classes = token_classes(T, tp.subject_range)
        positions = sorted({t for c in cfg.classes for t in classes[c]})
    cells = [(k, t, l) for k in cfg.kinds for t in positions for l in range(L)]
    values = tracer.restored([restore_set(k, t, l, cfg.window, L) for k, t, l in cells], answer_id,
                             cfg.batch_tokens)
    scores = {k: torch.full((T, L), p_corrupt if cfg.classes is None else float("nan"), dtype=torch.float64)
              for k in cfg.kinds}
    for (k, t, l), v in zip(cells, values.tolist()):
        scores[k][t, l] = v
    tok = adapter.tokenizer
    return TraceResult(
        prompt=tp.text, subject=subject, tokens=[tok.decode([i]) for i in tp.ids], subject_range=tp.subject_range,
        answer=tok.decode([answer_id]), answer_id=answer_id, p_clean=tracer.p_clean(answer_id), p_corrupt=p_corrupt,
        scores=scores, samples=cfg.samples, window=cfg.window, noise_sigma=float(sigma))
