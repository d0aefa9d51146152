"""Causal tracing (docs/ALGORITHMS.md §7): which (token, layer) states carry a fact.

    result = trace_prompt(adapter, "The Space Needle is in the city of", "Space Needle")
    result.scores["mlp"]        # (tokens, layers): P(answer) with a window of MLPs restored
    result.recommended_layer    # strongest MLP effect at the last subject token

The subject's token embeddings are corrupted with Gaussian noise of scale σ (see
:func:`factedit.trace_cache.noise_sigma`); a *restore set* then puts back the clean output
of some (module, layer, token) sites; :mod:`factedit.tracer` runs the restore sets in batches.
This module holds the settings, prompt preparation, token classes and the full trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core.errors import LayerError, RequestError, TraceError
from ..core.tokens import encode, token_at_char
from .engine import KINDS, CausalTracer, Site, gaussian_noise

__all__ = ["KINDS", "TOKEN_CLASSES", "token_classes", "TraceConfig", "TracePrompt", "TraceResult", "CausalTracer",
           "window_layers", "restore_set", "prepare_prompt", "gaussian_noise", "trace_prompt"]

TOKEN_CLASSES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")


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
            out[k] = ([[None if x != x else x for x in row] for row in self.scores[k].tolist()]
                      if k in self.scores else None)
        out.update(recommended_layer=self.recommended_layer, samples=self.samples, window=self.window,
                   noise_sigma=self.noise_sigma)
        return out


def trace_prompt(adapter, prompt: str, subject: str, answer: Optional[str] = None,
                 config: Optional[TraceConfig] = None, sigma: Optional[float] = None,
                 on_progress: Optional[Callable[[int, int], None]] = None) -> TraceResult:
    """Trace every (token, layer) of ``prompt`` for the kinds in ``config``.

    Without ``answer`` the model's own greedy next token is traced. ``sigma`` defaults to
    ``config.noise_factor`` × the cached embedding std of the model. Positions before the
    subject are not run: noise cannot reach them, so restoring them gives P_corrupt exactly.
    With ``config.classes`` only those token classes are traced (other cells NaN).
    ``on_progress(done, total)`` reports the restored cells traced so far.
    """
    cfg = (config or TraceConfig()).check(adapter.n_layers)
    tp = prepare_prompt(adapter.tokenizer, prompt, subject, answer, adapter.max_positions)
    if sigma is None:
        from .cache import noise_sigma

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
                             cfg.batch_tokens, on_progress)
    scores = {k: torch.full((T, L), p_corrupt if cfg.classes is None else float("nan"), dtype=torch.float64)
              for k in cfg.kinds}
    for (k, t, l), v in zip(cells, values.tolist()):
        scores[k][t, l] = v
    tok = adapter.tokenizer
    return TraceResult(
        prompt=tp.text, subject=subject, tokens=[tok.decode([i]) for i in tp.ids], subject_range=tp.subject_range,
        answer=tok.decode([answer_id]), answer_id=answer_id, p_clean=tracer.p_clean(answer_id), p_corrupt=p_corrupt,
        scores=scores, samples=cfg.samples, window=cfg.window, noise_sigma=float(sigma))
