"""Keys and residuals at the fact token, averaged over context templates (batched).

    K, Z = template_keys(adapter, requests, templates, key_layer=4, out_layer=8)
    # K: (n, d_ff) mean W_out input of layer 4; Z: (n, d_model) mean output of layer 8

The math, with the deviations from the papers: docs/ALGORITHMS.md §2.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..core.batching import pad_id, pad_rows
from ..core.hooks import Hook
from ..core.tokens import encode_request

__all__ = ["template_keys", "w_out_outputs"]


def _at(x: torch.Tensor, positions) -> torch.Tensor:
    """Row ``i`` of ``x`` (batch, seq, d) at position ``positions[i]`` (indices made on ``x``'s device)."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, torch.as_tensor(positions, device=x.device)]


@torch.no_grad()
def template_keys(adapter, requests: Sequence, templates: Sequence[str], key_layer: int,
                  out_layer: Optional[int] = None, fact_token: str = "subject_last",
                  batch_rows: int = 128) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per request, the mean over templates of the key entering W_out at ``key_layer`` and
    (optionally) of the residual output of ``out_layer``, at the fact token.

    The forward stops after the last layer needed. Rows are right-padded in chunks of
    ``batch_rows`` so memory stays bounded for thousands of requests. K is summed (float64) on the
    device of W_out at ``key_layer``, Z on that of layer ``out_layer``; both are returned there.
    """
    tok, dev = adapter.tokenizer, adapter.input_device
    k_dev = adapter.w_out_device(key_layer)
    z_dev = adapter.layer_device(out_layer) if out_layer is not None else k_dev
    pad = pad_id(tok)
    rows = []
    for r, req in enumerate(requests):
        for ctx in templates:
            ids, fact, _ = encode_request(tok, ctx.replace("{}", req.prompt), req.subject, None, fact_token)
            rows.append((ids[: fact + 1], fact, r))
    n = len(requests)
    K = torch.zeros(n, adapter.d_ff, dtype=torch.float64, device=k_dev)
    Z = torch.zeros(n, adapter.d_model, dtype=torch.float64, device=z_dev) if out_layer is not None else None
    counts = torch.zeros(n, dtype=torch.float64)
    last = max(key_layer, out_layer if out_layer is not None else -1)
    stop_module = adapter.layers[last] if out_layer is not None and out_layer >= key_layer else adapter.w_out(key_layer)
    for b in range(0, len(rows), batch_rows):
        chunk = rows[b: b + batch_rows]
        batch = pad_rows([ids for ids, _, _ in chunk], pad, device=dev)
        facts = [f for _, f, _ in chunk]
        with Hook(adapter.w_out(key_layer), retain_input=True) as tk, \
                Hook(adapter.layers[out_layer] if out_layer is not None else adapter.w_out(key_layer),
                      retain_output=out_layer is not None) as tz, \
                Hook(stop_module, stop=True):
            adapter.body(**batch.inputs(), use_cache=False)
        req_idx = torch.tensor([r for _, _, r in chunk])
        K.index_add_(0, req_idx.to(k_dev), _at(tk.input, facts).to(k_dev, torch.float64))
        if Z is not None:
            Z.index_add_(0, req_idx.to(z_dev), _at(tz.output, facts).to(z_dev, torch.float64))
        counts.index_add_(0, req_idx, torch.ones(len(chunk), dtype=torch.float64))
    K /= counts[:, None].to(k_dev)
    if Z is not None:
        Z /= counts[:, None].to(z_dev)
    return K.float(), (Z.float() if Z is not None else None)


@torch.no_grad()
def w_out_outputs(adapter, requests: Sequence, layer: int, fact_token: str = "subject_last",
                  batch_rows: int = 128) -> torch.Tensor:
    """Per request, the output of W_out at ``layer`` (the MLP's contribution to the residual, NAS's v₀) at the
    fact token of the bare prompt, (n, d_model) float64 on that layer's device."""
    tok, dev = adapter.tokenizer, adapter.input_device
    rows = []
    for req in requests:
        ids, fact, _ = encode_request(tok, req.prompt, req.subject, None, fact_token)
        rows.append((ids[: fact + 1], fact))
    out = []
    for b in range(0, len(rows), batch_rows):
        chunk = rows[b: b + batch_rows]
        batch = pad_rows([ids for ids, _ in chunk], pad_id(tok), device=dev)
        with Hook(adapter.w_out(layer), retain_output=True, stop=True) as h:
            adapter.body(**batch.inputs(), use_cache=False)
        out.append(_at(h.output, [f for _, f in chunk]).double())
    return torch.cat(out).to(adapter.w_out_device(layer))
