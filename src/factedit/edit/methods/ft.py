"""Plain fine-tuning of W_out (the FT-L baseline of the MEMIT paper): Adam on the rewrite NLL
of the bare prompts, every weight kept within ``norm_constraint`` (L∞) of its original value.
Adam runs on a float32 Δ beside the weights (never on half-precision weights themselves).

The math, with the deviations from the papers: docs/ALGORITHMS.md §10.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ...core.batching import pad_id, pad_rows
from ...core.tokens import target_rows
from ..deltas import LayerDelta
from ..results import Computed
from ..row_deltas import RowDeltas
from .base import DEPTH_RULE, GIVEN, check_layers, default_layer
from .registry import MethodSpec, register

__all__ = ["FTConfig", "compute_ft"]


@dataclass(frozen=True)
class FTConfig:
    """Fine-tuning baseline.

    Attributes:
        method: ``"ft"``.
        layers: layers whose W_out is trained (ascending); default the ROME default layer.
        steps: Adam steps.
        lr: learning rate.
        norm_constraint: L∞ bound on each weight's change.
        layer_rule: how the layers were chosen (filled in).
    """

    method: str = "ft"
    layers: Optional[Tuple[int, ...]] = None
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    layer_rule: str = ""

    def resolved(self, adapter) -> "FTConfig":
        layers = (default_layer(adapter.n_layers),) if self.layers is None else check_layers(adapter, self.layers)
        rule = self.layer_rule or (DEPTH_RULE if self.layers is None else GIVEN)
        return replace(self, layers=layers, layer_rule=rule)


def compute_ft(adapter, caches, requests, cfg: FTConfig, state=None) -> Computed:
    """Dense deltas of fine-tuning. The weights are never written: Adam trains a float32 Δ per layer
    (the master weights of a half-precision model), added to W_out's output by a hook (``W k + Δ k``),
    on the device where that W_out computes; the constraint ``|Δ| ≤ norm_constraint`` is the L∞ bound."""
    t0 = time.perf_counter()
    ad = adapter
    tok, dev = ad.tokenizer, ad.input_device
    rows = target_rows(tok, requests)
    batch = pad_rows([seq for seq, _, _ in rows], pad_id(tok), device=dev)
    sel_r, sel_c, tgt, w = [], [], [], []
    for i, (_, pos, t) in enumerate(rows):
        for p, tt in zip(pos, t):
            sel_r.append(i), sel_c.append(p), tgt.append(tt), w.append(1.0 / (len(t) * len(rows)))
    head = ad.head_device
    tgt, w = torch.tensor(tgt, device=head), torch.tensor(w, device=head)
    deltas = [torch.zeros(ad.d_model, ad.d_ff, device=ad.w_out_device(l), dtype=torch.float32, requires_grad=True)
              for l in cfg.layers]
    losses = []
    trained = RowDeltas(ad, [[LayerDelta(l, D, None) for l, D in zip(cfg.layers, deltas)]])

    def loss_now():
        h = ad.body(**batch.inputs()).last_hidden_state
        at = torch.tensor(sel_r, device=h.device), torch.tensor(sel_c, device=h.device)
        logp = F.log_softmax(ad.logits(h[at]).float(), dim=-1).to(head)
        return -(logp[torch.arange(len(tgt), device=head), tgt] * w).sum()

    opt = torch.optim.Adam(deltas, lr=cfg.lr)
    with trained, trained.rows([0] * len(rows)):
        with torch.enable_grad():
            for _ in range(cfg.steps):
                loss = loss_now()
                losses.append(float(loss.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for D in deltas:
                        D.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
        with torch.no_grad():  # the loss of the Δ the edit ends with (after the last step's clamp)
            loss_after = float(loss_now())
    out = [LayerDelta.from_dense(l, D.detach().clone()) for l, D in zip(cfg.layers, deltas)]
    info = [{"loss_before": losses[0] if losses else loss_after, "loss_after": loss_after, "steps": cfg.steps}]
    return Computed(out, None, info, {"values": time.perf_counter() - t0}, cfg)


register(MethodSpec("ft", FTConfig, compute_ft))
