"""Target-value optimisation: find δ so that the layer's W_out output v + δ at the fact
token makes the model say the new target. One implementation serves every method.

Only what depends on δ is recomputed at each optimisation step:

* positions before the fact token are run **once** and kept as a key/value cache;
* layers below the edit layer are skipped (their output at the fact token onwards is cached);
* logits are formed only at target positions and at the essence (KL) positions.

``fast=False`` runs the plain full forward with a hook instead; tests check both agree.

The math, with the deviations from the papers: docs/ALGORITHMS.md §2.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.batching import pad_id, pad_rows
from ..core.errors import MethodError
from ..core.hooks import Hook, RawOutput, start_at_layer
from ..core.kv import cache_of, past
from ..core.progress import report
from ..core.tokens import encode_request

__all__ = ["ValueConfig", "ValueProblem", "ValueResult", "optimize_values"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueConfig:
    """Knobs of the value optimisation (ROME's defaults).

    Attributes:
        steps: maximum Adam steps.
        lr: Adam learning rate.
        kl_factor: weight of the essence-drift KL term.
        weight_decay: weight of ``‖δ‖ / ‖v0‖²``.
        clamp_norm_factor: ``‖δ‖ ≤ clamp_norm_factor · ‖v0‖`` after every step.
        early_stop_loss: stop a request once its loss is below this.
        early_stop_on: ``"nll"`` (default): the rewrite NLL, i.e. stop once the new target has
            per-token probability ≈ e^-0.05 ≈ 0.95; ``"loss"``: the total loss, as the ROME code
            does. With the weight-decay and KL terms the total rarely falls below 0.05, so under
            ``"loss"`` nearly every CounterFact edit runs all steps (median 24 of 25 on SmolLM2,
            ~3× the time) for no gain in efficacy.
        bare_weight: share of the rewrite NLL given to the bare prompt (the request's own prompt) on
            top of its place among the templates: 0 (default) averages the templates uniformly; the
            retry of an edit that did not take (:mod:`factedit.edit.verify`) uses 0.5.
        optimizer: ``"adam"`` (default, ROME's) or ``"nadam"``: Nesterov momentum with a constant
            μ = β₁/2 (``torch.optim.NAdam`` with ``momentum_decay=0``). On the embedded model it reaches
            the same stop in ~30 % fewer steps with a δ ~43 % shorter (docs/BENCHMARKS.md, "Fewer
            value-optimisation steps?"): another edit, not today's faster.
    """

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    early_stop_on: str = "nll"
    bare_weight: float = 0.0
    optimizer: str = "adam"

    def __post_init__(self):
        if self.early_stop_on not in EARLY_STOP_ON:
            raise MethodError(f"value.early_stop_on must be one of {', '.join(EARLY_STOP_ON)}, "
                              f"got {self.early_stop_on!r}")
        if self.optimizer not in OPTIMIZERS:
            raise MethodError(f"value.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    def __repr__(self) -> str:
        # part of the identity of targets kept on disk (EditCaches.target_keeper): a field added after targets
        # were kept appears only when it is set, so those files still match the settings that made them
        shown = [f for f in fields(self) if f.name not in _ADDED or getattr(self, f.name) != f.default]
        return f"ValueConfig({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    def make_optimizer(self, params):
        """The optimiser of δ this config names."""
        if self.optimizer == "nadam":
            return torch.optim.NAdam(params, lr=self.lr, momentum_decay=0.0)
        return torch.optim.Adam(params, lr=self.lr)


#: what the early stop reads, and the optimisers of δ (:class:`ValueConfig`)
EARLY_STOP_ON = ("nll", "loss")
OPTIMIZERS = ("adam", "nadam")
#: ValueConfig fields added after targets were first kept on disk (shown in its repr only when set)
_ADDED = ("optimizer",)


@dataclass
class _Row:
    ids: List[int]
    fact: int
    predict: List[int]  # positions whose logits predict target tokens
    targets: List[int]
    req: int
    kind: str  # "rewrite" | "kl"
    bare: bool = False


@dataclass
class ValueResult:
    """Per request: δ, the original value v0 at the bare prompt, keys k_o and k* (float32)."""

    delta: torch.Tensor  # (n, d_model)
    v0: torch.Tensor  # (n, d_model) value at the injection site, fact token of the bare prompt
    k_o: torch.Tensor  # (n, d_ff) key of the bare prompt
    k_star: torch.Tensor  # (n, d_ff) key averaged over the context templates
    losses: List[List[float]]  # per step, per request
    steps: int  # Adam steps of the longest-running request
    nll_before: List[float]
    nll_after: List[float]
    steps_each: List[int] = None  # type: ignore[assignment]  # Adam steps per request (early stops differ)

    def __post_init__(self):
        if self.steps_each is None:
            self.steps_each = [self.steps] * int(self.delta.shape[0])

    def select(self, i: int) -> "ValueResult":
        """Request ``i`` alone (as if optimised by itself: the requests of a batch are independent)."""
        return ValueResult(self.delta[i: i + 1], self.v0[i: i + 1], self.k_o[i: i + 1], self.k_star[i: i + 1],
                           [[step[i]] for step in self.losses], self.steps_each[i], [self.nll_before[i]],
                           [self.nll_after[i]], [self.steps_each[i]])


class ValueProblem:
    """The batch of prompts for one or more requests at one layer, laid out for fast steps."""

    def __init__(self, adapter, layer: int, requests: Sequence, templates: Sequence[str],
                 essence_prompts: Sequence[str] = ("{} is a",), fact_token: str = "subject_last",
                 inject: str = "w_out", bare_weight: float = 0.0):
        self.adapter, self.layer = adapter, adapter.check_layer(layer)
        if not 0.0 <= bare_weight <= 1.0:
            raise ValueError(f"bare_weight must be in [0, 1], got {bare_weight!r}")
        self.bare_weight = bare_weight
        if inject not in ("w_out", "residual"):
            raise ValueError(f"inject must be 'w_out' or 'residual', got {inject!r}")
        # where δ is added: W_out's output (ROME's v*) or the layer's residual output (MEMIT's z*)
        self.site = adapter.w_out(layer) if inject == "w_out" else adapter.layers[layer]
        self.n_req = len(requests)
        tok = adapter.tokenizer
        rows: List[_Row] = []
        for r, req in enumerate(requests):
            for ctx in templates:
                template = ctx.replace("{}", req.prompt)
                ids, fact, tidx = encode_request(tok, template, req.subject, req.target_new, fact_token)
                rows.append(_Row(ids[: tidx[-1]], fact, [i - 1 for i in tidx], [ids[i] for i in tidx], r,
                                 "rewrite", bare=(ctx == "{}")))
            for ess in essence_prompts:
                ids, fact, _ = encode_request(tok, ess, req.subject, None, fact_token)
                rows.append(_Row(ids[: fact + 1], fact, [], [], r, "kl"))
        self.rows = rows
        self._layout()

    # ------------------------------------------------------------------ layout
    def _layout(self):
        rows, dev = self.rows, self.adapter.input_device  # index tensors follow their consumer (.to at use)
        pad = pad_id(self.adapter.tokenizer)
        # the part before the fact token is left-padded (one KV-cache prefix whose last position is
        # the same for every row); the fact token onwards is right-padded after it
        pre = pad_rows([r.ids[: r.fact] for r in rows], pad, side="left", device=dev)
        suf = pad_rows([r.ids[r.fact:] for r in rows], pad, device=dev)
        full = pad_rows([r.ids for r in rows], pad, device=dev)
        P, S = pre.width, suf.width
        self.P, self.S = P, S
        facts = torch.tensor([r.fact for r in rows], device=dev)
        self.pre = pre.inputs(positions=True)
        self.suf = dict(input_ids=suf.input_ids, attention_mask=torch.cat([pre.attention_mask, suf.attention_mask], 1),
                        position_ids=facts[:, None] + torch.arange(S, device=dev)[None, :])
        self.full = full.inputs()
        self.facts = facts
        self.row_req = torch.tensor([r.req for r in rows], device=dev)
        # positions (suffix coordinates) where logits are needed
        sel_rows, sel_cols, sel_tgt, sel_w = [], [], [], []
        n_rewrite = [sum(1 for r in rows if r.req == q and r.kind == "rewrite") for q in range(self.n_req)]
        for b, r in enumerate(rows):
            for p, t in zip(r.predict, r.targets):
                sel_rows.append(b), sel_cols.append(p - r.fact), sel_tgt.append(t)
                share = (1.0 - self.bare_weight) / n_rewrite[r.req] + (self.bare_weight if r.bare else 0.0)
                sel_w.append(share / len(r.targets))
        kl_rows = [b for b, r in enumerate(rows) if r.kind == "kl"]
        self.n_nll = len(sel_rows)
        self.sel_rows = torch.tensor(sel_rows + kl_rows, device=dev)
        self.sel_cols = torch.tensor(sel_cols + [0] * len(kl_rows), device=dev)
        self.sel_tgt = torch.tensor(sel_tgt, device=dev)
        self.sel_w = torch.tensor(sel_w, device=dev)
        self.sel_req = self.row_req[self.sel_rows[: self.n_nll]]
        self.kl_req = self.row_req[torch.tensor(kl_rows, device=dev, dtype=torch.long)]
        n_kl = [max(1, sum(1 for r in rows if r.req == q and r.kind == "kl")) for q in range(self.n_req)]
        self.kl_w = torch.tensor([1.0 / n_kl[r.req] for r in rows if r.kind == "kl"], device=dev)
        self.bare_rows = torch.tensor(
            [next(b for b, r in enumerate(rows) if r.req == q and r.bare) for q in range(self.n_req)], device=dev)
        self.rewrite_mask = torch.tensor([r.kind == "rewrite" for r in rows], device=dev)

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def prepare(self):
        """Run the δ-independent part once: prefix cache, skipped-layer output, keys, v0, KL base."""
        ad, l = self.adapter, self.layer
        self.cache = None
        if self.P:
            self.cache = cache_of(ad.body(**self.pre, use_cache=True))
        stack = contextlib.ExitStack()
        with stack:
            t_in = stack.enter_context(Hook(ad.layers[l - 1], retain_output=True)) if l else None
            t_raw = stack.enter_context(RawOutput(ad.layers[max(l - 1, 0)]))
            t_w = stack.enter_context(Hook(ad.w_out(l), retain_input=True))
            t_site = stack.enter_context(Hook(self.site, retain_output=True))
            h = ad.body(**self.suf, **past(ad.body, copy.deepcopy(self.cache))).last_hidden_state
        self.h_in = t_in.output if t_in else None
        self.layer_out_template = t_raw.output
        self.keys = t_w.input[:, 0, :].float()  # (B, d_ff)
        self.values = t_site.output[:, 0, :].float()  # (B, d_model) at the injection site
        logits = self.adapter.logits(h[self.sel_rows.to(h.device), self.sel_cols.to(h.device)]).float()
        self.kl_base = F.log_softmax(logits[self.n_nll:], dim=-1)
        return self

    def _inject(self, delta, row_req):
        rows_delta = delta[row_req.to(delta.device)]  # (B, d_model)

        def edit(out):
            first = out[:, :1, :] + rows_delta[:, None, :].to(out.dtype)
            return torch.cat([first, out[:, 1:, :]], dim=1)
        return edit

    def logits(self, delta: torch.Tensor, fast: bool = True, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits at the selected positions with δ added at the fact token (differentiable in δ).

        ``active`` (n_req,) bool: compute only the rows of these requests (finished requests
        drop out of the batch); the result then holds only their entries, in order.
        """
        ad, l = self.adapter, self.layer
        if not fast:
            return self._logits_full(delta)
        suf, h_in, row_req = self.suf, self.h_in, self.row_req
        cache = copy.deepcopy(self.cache)
        sel_rows, sel_cols = self.sel_rows, self.sel_cols
        if active is not None and not bool(active.all()):
            keep = active.to(self.row_req.device)[self.row_req]
            idx = keep.nonzero()[:, 0]
            suf = {k: v[idx] for k, v in suf.items()}
            h_in = h_in[idx.to(h_in.device)] if h_in is not None else None
            row_req = row_req[idx]
            if cache is not None:
                cache.batch_select_indices(idx.cpu())  # CPU indices select on every layer's device
            remap = torch.full_like(keep, -1, dtype=torch.long)
            remap[idx] = torch.arange(len(idx), device=idx.device)
            entries = keep[sel_rows]
            sel_rows, sel_cols = remap[sel_rows[entries]], sel_cols[entries]
        with contextlib.ExitStack() as stack:
            if l:  # layers below l: their output at the fact token onwards is recorded
                stack.enter_context(start_at_layer(ad.layers, l - 1, h_in, self.layer_out_template))
            stack.enter_context(Hook(self.site, edit_output=self._inject(delta, row_req)))
            h = ad.body(**suf, **past(ad.body, cache)).last_hidden_state
        return self.adapter.logits(h[sel_rows.to(h.device), sel_cols.to(h.device)]).float()

    def _logits_full(self, delta):
        """Reference: the whole padded sequences through the whole model, δ added by a hook."""
        ad = self.adapter
        rows_delta = delta[self.row_req.to(delta.device)]
        facts = self.facts

        def edit(out):
            add = torch.zeros_like(out)
            add[torch.arange(out.shape[0], device=out.device),
                facts.to(out.device)] = rows_delta.to(out.device, out.dtype)
            return out + add

        with Hook(self.site, edit_output=edit):
            h = ad.body(**self.full).last_hidden_state
        at = (self.sel_rows, self.sel_cols + self.facts[self.sel_rows])
        sel = h[at[0].to(h.device), at[1].to(h.device)]
        return ad.logits(sel).float()

    def losses(self, logits: torch.Tensor, active: Optional[torch.Tensor] = None):
        """Per-request rewrite NLL and essence KL(P_δ ‖ P_orig) from :meth:`logits`
        (zero for requests outside ``active``)."""
        dev = logits.device  # the head's: the losses are computed there
        sel_tgt, sel_w, sel_req = self.sel_tgt.to(dev), self.sel_w.to(dev), self.sel_req.to(dev)
        kl_base, kl_w, kl_req = self.kl_base, self.kl_w.to(dev), self.kl_req.to(dev)
        if active is not None and not bool(active.all()):
            active = active.to(dev)
            e, k = active[sel_req], active[kl_req]
            sel_tgt, sel_w, sel_req = sel_tgt[e], sel_w[e], sel_req[e]
            kl_base, kl_w, kl_req = kl_base[k], kl_w[k], kl_req[k]
        n_nll = len(sel_tgt)
        logp = F.log_softmax(logits[:n_nll], dim=-1)
        tok_nll = -logp[torch.arange(n_nll, device=logp.device), sel_tgt] * sel_w
        nll = torch.zeros(self.n_req, device=logp.device).index_add(0, sel_req, tok_nll)
        kl_logp = F.log_softmax(logits[n_nll:], dim=-1)
        # KL(P_δ ‖ P_orig) = Σ P_δ (log P_δ − log P_orig), as ROME's compute_v (kl_div with log_target)
        kl_each = (kl_logp.exp() * (kl_logp - kl_base)).sum(-1) * kl_w
        kl = torch.zeros(self.n_req, device=logp.device).index_add(0, kl_req, kl_each)
        return nll, kl


def optimize_values(problem: ValueProblem, cfg: ValueConfig, fast: bool = True) -> ValueResult:
    """Adam (or ``cfg.optimizer``) on δ (one row per request) with ROME's loss, norm clamp and early stop."""
    p = problem.prepare()
    dev = p.values.device  # the injection site's: δ lives where it is added
    n = p.n_req
    v0 = p.values[p.bare_rows.to(dev)]  # (n, d_model)
    keys = p.keys  # on W_out's device
    row_req, rewrite = p.row_req.to(keys.device), p.rewrite_mask.to(keys.device)
    k_o = keys[p.bare_rows.to(keys.device)]
    k_star = torch.stack([keys[(row_req == q) & rewrite].mean(0) for q in range(n)])
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = cfg.make_optimizer([delta])
    max_norm = cfg.clamp_norm_factor * v0.norm(dim=-1)  # (n,)
    v0_sq = v0.norm(dim=-1) ** 2
    active = torch.ones(n, dtype=torch.bool, device=dev)
    last_loss = torch.zeros(n, device=dev)
    last_nll = torch.zeros(n, device=dev)
    history: List[List[float]] = []
    nll_before = None
    steps = 0
    steps_each = torch.zeros(n, dtype=torch.long, device=dev)
    with torch.enable_grad():
        for it in range(cfg.steps):
            report("value optimisation (step, at most)", it, cfg.steps)
            act = active.clone()
            nll, kl = (x.to(dev) for x in p.losses(p.logits(delta, fast=fast, active=act), active=act))
            wd = cfg.weight_decay * delta.norm(dim=-1) / v0_sq
            loss = nll + cfg.kl_factor * kl + wd
            with torch.no_grad():
                last_loss[act] = loss.detach()[act]
                last_nll[act] = nll.detach()[act]
            history.append([float(x) for x in last_loss])
            if nll_before is None:
                nll_before = [float(x) for x in nll.detach()]
            crit = nll.detach() if cfg.early_stop_on == "nll" else loss.detach()
            active = act & (crit >= cfg.early_stop_loss)
            if not bool(active.any()) or it == cfg.steps - 1:
                break
            opt.zero_grad(set_to_none=True)
            (loss * active).sum().backward()
            frozen = delta.detach()[~active].clone()
            opt.step()
            steps = it + 1
            steps_each += active.long()
            with torch.no_grad():
                delta[~active] = frozen  # finished requests keep their δ (Adam momentum must not move it)
                norms = delta.norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
    # every request's last evaluated loss is that of its final δ
    return ValueResult(delta.detach().float(), v0, k_o, k_star, history, steps, nll_before,
                       [float(x) for x in last_nll], [int(x) for x in steps_each])
