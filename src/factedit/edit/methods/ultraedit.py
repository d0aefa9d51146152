"""UltraEdit (Gu et al., 2025, "lifelong normalization"): a training-free, covariance-free closed form per
edit turn, faithful to XiaojieGu/UltraEdit (``editor/ultraedit.py``, ``nets.RunningMeanStd``).

For each request the answer tokens' cross-entropy is back-propagated once through the unedited model; at every
edited W_out and every answer position the key k (W_out's input) and the output gradient g = ∂L/∂(W_out k)
are taken. Features x = [k, g] update a running mean and variance kept across all turns (the method state);
then, per layer, with x̂ = (x − μ) / (σ + ε) split into k̂, ĝ:

    v = −lr · ‖k̂‖² · ĝ                       (one normalised gradient step on W, seen through k̂)
    ΔWᵀ = (KᵀK + I)⁻¹ Kᵀ V                    (K, V: the turn's raw keys and v, one row per token)

stored as the factors ``left = Vᵀ``, ``right = Kᵀ(KKᵀ + I)⁻¹`` (push-through: an n × n solve). Deviations from
the reference, each for a reason given in docs/ALGORITHMS.md §13: the statistics start from a prior of
next-token features of the statistics corpus (the reference starts at zero and edits 100 facts a turn; one
edit alone would standardise to zero); each token's own loss (not the tuple's mean); the batch's variance
merged exactly (Chan), so one-token turns are defined; W_out of a late span (the reference's layout for
GPT-J, Mistral and Phi-4; Llama/Qwen configs edit gate/up projections, which factedit's deltas do not address).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...core.batching import pad_id, pad_rows
from ...core.errors import MethodError
from ...core.hooks import Hook
from ...core.tokens import target_rows
from ..deltas import LayerDelta
from ..results import Computed
from .base import GIVEN, check_layers
from .registry import MethodSpec, register

__all__ = ["UltraEditConfig", "compute_ultraedit", "merge_moments", "moments_of", "standardize",
           "ultra_update", "fold_moments", "default_ultra_span", "ULTRA_RULE", "EPS"]

#: the normaliser's ε (the reference's ``torch.finfo(float32).eps``, its features being float32)
EPS = float(torch.finfo(torch.float32).eps)
#: how the default span is chosen (recorded in configs)
ULTRA_RULE = "depth rule: 6 layers ending 2 below the top"


def default_ultra_span(n_layers: int, width: int = 6) -> Tuple[int, ...]:
    """The late W_out span UltraEdit edits: ``width`` layers ending two below the top (the reference edits
    GPT-J's fc_out 18–26 of 28, Phi-4's down_proj 30–38 of 40, Mistral's 29–30 of 32)."""
    last = max(0, n_layers - 3)
    return tuple(range(max(0, last - width + 1), last + 1))


@dataclass(frozen=True)
class UltraEditConfig:
    """UltraEdit. ``None`` fields come from the model.

    Attributes:
        method: ``"ultraedit"``.
        layers: the edited span (ascending); default :func:`default_ultra_span`.
        lr: the step size of ``v = −lr ‖k̂‖² ĝ`` (the reference uses 1e-6 on 7–8B models in half precision;
            measured for SmolLM2 in docs/ALGORITHMS.md §13).
        ridge: the identity's weight in ``(KᵀK + ridge·I)`` (the reference: 1).
        stats_corpus: the corpus of the normaliser's prior (``None``: ``"auto"``, as the key statistics).
        stats_tokens: tokens of that prior (0: none, the reference's zero start).
        stats_seq_len: tokens per sequence of the prior's forwards.
        batch_size: requests per forward/backward.
        layer_rule: how the layers were chosen (filled in).
    """

    method: str = "ultraedit"
    layers: Optional[Tuple[int, ...]] = None
    lr: float = 5e-4
    ridge: float = 1.0
    stats_corpus: Optional[str] = None
    stats_tokens: int = 2048
    stats_seq_len: int = 256
    batch_size: int = 16
    layer_rule: str = ""

    def __post_init__(self):
        if not (self.lr > 0):
            raise MethodError(f"ultraedit: lr must be positive, got {self.lr}")
        if not (self.ridge > 0):
            raise MethodError(f"ultraedit: ridge must be positive, got {self.ridge}")
        if self.stats_tokens < 0 or self.stats_seq_len < 2 or self.batch_size < 1:
            raise MethodError("ultraedit: stats_tokens must be ≥ 0, stats_seq_len ≥ 2 and batch_size ≥ 1")

    def resolved(self, adapter) -> "UltraEditConfig":
        layers = default_ultra_span(adapter.n_layers) if self.layers is None else check_layers(adapter, self.layers)
        rule = self.layer_rule or (ULTRA_RULE if self.layers is None else GIVEN)
        return replace(self, layers=layers, layer_rule=rule)


# --- the algebra (pure functions) -------------------------------------------------------------------------

def moments_of(x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Count, mean and sum of squared deviations of the rows of ``x`` (float64)."""
    x = x.double()
    mean = x.mean(0)
    return {"count": torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device), "mean": mean,
            "m2": ((x - mean) ** 2).sum(0)}


def merge_moments(a: Optional[dict], b: dict) -> dict:
    """The moments of the union of two row sets (Chan et al.); ``a`` None: ``b`` (copied). Inputs unchanged."""
    if a is None:
        return {k: v.clone() for k, v in b.items()}
    na, nb = a["count"], b["count"]
    n = na + nb
    delta = b["mean"] - a["mean"]
    return {"count": n, "mean": a["mean"] + delta * nb / n, "m2": a["m2"] + b["m2"] + delta ** 2 * na * nb / n}


def fold_moments(state: Optional[dict], update: dict) -> dict:
    """The method state after one edit turn: its moments merged in (``state`` is not modified)."""
    return merge_moments(state, update)


def standardize(x: torch.Tensor, moments: dict) -> torch.Tensor:
    """``(x − μ) / (σ + ε)`` with σ the sample standard deviation of the moments (the reference's
    ``RunningMeanStd.forward``)."""
    std = (moments["m2"] / (moments["count"] - 1 + EPS)).sqrt()
    return (x.double() - moments["mean"]) / (std + EPS)


def ultra_update(K: torch.Tensor, G: torch.Tensor, moments: dict, lr: float, ridge: float = 1.0):
    """One layer's update from its keys ``K`` (n, d_in) and output gradients ``G`` (n, d_out) under the
    normaliser ``moments`` (of the concatenated features): ``(left (d_out, n), right (d_in, n))`` with
    ``ΔW = left @ rightᵀ = Vᵀ K (KᵀK + ridge·I)⁻¹``, float64."""
    K, G = K.double(), G.double()
    z = standardize(torch.cat([K, G], dim=1), moments)
    k_hat, g_hat = z[:, : K.shape[1]], z[:, K.shape[1]:]
    V = -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat  # (n, d_out)
    A = K @ K.T + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    right = torch.linalg.solve(A, K).T  # Kᵀ (KKᵀ + rI)⁻¹, A symmetric
    return V.T, right


# --- features from the model ------------------------------------------------------------------------------

def _features(adapter, layers: Sequence[int], batch, positions, targets):
    """Keys and output gradients at ``positions`` (rows, cols) of every layer in one forward and backward
    of the summed cross-entropy of ``targets`` there. Returns ``({layer: (K, G)}, per-position NLL)``."""
    ad = adapter
    probes = {}

    def probe(layer):
        def add(h):
            z = torch.zeros_like(h, requires_grad=True)
            probes[layer] = z
            return h + z
        return add

    hooks = [Hook(ad.w_out(layer), retain_input=True, edit_output=probe(layer)) for layer in layers]
    with torch.enable_grad():
        with ExitStack() as stack:
            for h in hooks:
                stack.enter_context(h)
            hidden = ad.body(**batch.inputs()).last_hidden_state
        rows, cols = positions
        at = rows.to(hidden.device), cols.to(hidden.device)
        logp = F.log_softmax(ad.logits(hidden[at]).float(), dim=-1)
        tgt = targets.to(logp.device)
        nll = -logp[torch.arange(len(tgt), device=logp.device), tgt]
        grads = torch.autograd.grad(nll.sum(), [probes[layer] for layer in layers])
    out = {}
    for layer, hook, g in zip(layers, hooks, grads):
        dev = ad.w_out_device(layer)
        out[layer] = (hook.input[at[0].to(hook.input.device), at[1].to(hook.input.device)].to(dev).double(),
                      g[at[0].to(g.device), at[1].to(g.device)].to(dev).double())
    return out, nll.detach()


def _pooled(moments: Optional[dict], K: torch.Tensor, G: torch.Tensor) -> dict:
    """``moments`` with the rows of one layer's features ``[K, G]`` merged in (on the CPU, where the state is)."""
    return merge_moments(moments, {k: v.cpu() for k, v in moments_of(torch.cat([K, G], 1)).items()})


def _request_features(adapter, rows, cfg: UltraEditConfig):
    """Per layer the turn's keys and gradients (one row per answer token) of the requests' ``rows``
    (:func:`~factedit.core.tokens.target_rows`), and each request's mean NLL."""
    tok, dev = adapter.tokenizer, adapter.input_device
    feats: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in cfg.layers}
    nll_of: List[float] = []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start: start + cfg.batch_size]
        batch = pad_rows([seq for seq, _, _ in chunk], pad_id(tok), device=dev)
        r = [i for i, (_, pos, _) in enumerate(chunk) for _ in pos]
        c = [p for _, pos, _ in chunk for p in pos]
        t = [x for _, _, tg in chunk for x in tg]
        got, nll = _features(adapter, cfg.layers, batch, (torch.tensor(r), torch.tensor(c)), torch.tensor(t))
        for layer, kg in got.items():
            feats[layer].append(kg)
        i = 0
        for _, pos, _ in chunk:
            nll_of.append(float(nll[i: i + len(pos)].mean()))
            i += len(pos)
    return {layer: (torch.cat([k for k, _ in v]), torch.cat([g for _, g in v])) for layer, v in feats.items()}, nll_of


def prior_moments(adapter, cfg: UltraEditConfig) -> Optional[dict]:
    """The normaliser's prior: moments of next-token features of ``cfg.stats_tokens`` tokens of the statistics
    corpus at every edited layer (pooled, as the reference pools all modules of one shape); ``None`` for 0.
    Cached on disk by the weights' fingerprint, corpus and settings (``$FACTEDIT_HOME/ultraedit/``), so every
    ``factedit edit`` of the same model reads it instead of running the corpus again."""
    from safetensors.torch import load_file, save_file

    from ...core.fingerprints import model_fingerprint
    from ...core.paths import atomic_path, factedit_home
    from ...core.tokens import prefix_tag
    from ...stats.corpus import resolve_corpus

    if cfg.stats_tokens == 0:
        return None
    seq_len = min(cfg.stats_seq_len, adapter.max_positions)
    src = resolve_corpus(cfg.stats_corpus, adapter, cfg.stats_tokens)
    key = json.dumps([model_fingerprint(adapter.model) + prefix_tag(adapter.tokenizer), src.name, cfg.stats_tokens,
                      seq_len, list(cfg.layers)])
    path = factedit_home() / "ultraedit" / f"prior-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    if path.is_file():
        try:
            got = load_file(str(path))
            if set(got) == {"count", "mean", "m2"} and all(torch.isfinite(v).all() for v in got.values()):
                return got
        except Exception:  # a damaged cache file is computed again
            pass
    moments = _prior(adapter, cfg, src, seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp))
    return moments


def _prior(adapter, cfg: UltraEditConfig, src, seq_len: int) -> dict:
    from ...stats.layer import token_chunks

    tok = adapter.tokenizer
    chunks = [c for c in token_chunks(tok, src, seq_len, cfg.stats_tokens) if len(c) > 1]
    if not chunks:
        raise MethodError(f"ultraedit: the statistics corpus {src.name} gave no text for the normaliser's prior")
    moments = None
    for start in range(0, len(chunks), 4):
        part = chunks[start: start + 4]
        batch = pad_rows([c[:-1] for c in part], pad_id(tok), device=adapter.input_device)
        r = [i for i, c in enumerate(part) for _ in range(len(c) - 1)]
        p = [j for c in part for j in range(len(c) - 1)]
        t = [x for c in part for x in c[1:]]
        got, _ = _features(adapter, cfg.layers, batch, (torch.tensor(r), torch.tensor(p)), torch.tensor(t))
        for layer in cfg.layers:
            moments = _pooled(moments, *got[layer])
    return moments


def compute_ultraedit(adapter, caches, requests, cfg: UltraEditConfig, state: Optional[dict] = None) -> Computed:
    """Deltas of one UltraEdit turn over ``requests``. ``state`` (the normaliser's moments, ``None`` before
    the first turn) is not modified; the result's ``state_update`` is what the turn adds to it (its features'
    moments; the first turn's include the prior), folded in by :func:`fold_moments`."""
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    d = adapter.d_ff + adapter.d_model
    if state is not None and tuple(state.get("mean", torch.empty(0)).shape) != (d,):
        raise MethodError(f"ultraedit: the method state has features of another width than this model's ({d}); "
                          "it belongs to another model")
    update = prior_moments(adapter, cfg) if state is None else None
    timings["prior"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = target_rows(adapter.tokenizer, requests)
    feats, nll = _request_features(adapter, rows, cfg)
    for layer in cfg.layers:  # the reference updates the normaliser with every module's features first
        update = _pooled(update, *feats[layer])
    moments = merge_moments(state, update)
    timings["values"] = time.perf_counter() - t
    t = time.perf_counter()
    deltas = []
    for layer in cfg.layers:
        K, G = feats[layer]
        m = {k: v.to(K.device) for k, v in moments.items()}
        left, right = ultra_update(K, G, m, cfg.lr, cfg.ridge)
        deltas.append(LayerDelta(layer, left.float(), right.float()))
    timings["solve"] = time.perf_counter() - t
    info = [{"nll_before": x, "tokens": len(pos)} for x, (_, pos, _) in zip(nll, rows)]
    keys = {layer: feats[layer][0].T.float() for layer in cfg.layers}
    return Computed(deltas, None, info, timings, cfg, state_update=update, keys=keys)


register(MethodSpec("ultraedit", UltraEditConfig, compute_ultraedit, fold_state=fold_moments))
