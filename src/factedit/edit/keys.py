"""Keys and residuals at the fact token, averaged over context templates (batched).

    K, Z = template_keys(adapter, requests, templates, key_layer=4, out_layer=8)
    # K: (n, d_ff) mean W_out input of layer 4; Z: (n, d_model) mean output of layer 8

The math, with the deviations from the papers: docs/ALGORITHMS.md §2.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch

from ..core.batching import pad_id, pad_rows
from ..core.hooks import Hook, RawOutput, start_at_layer, unwrap
from ..core.tokens import encode_request

__all__ = ["TemplateKeys", "template_keys", "w_out_outputs", "RESUME_BUDGET"]


def _at(x: torch.Tensor, positions) -> torch.Tensor:
    """Row ``i`` of ``x`` (batch, seq, d) at position ``positions[i]`` (indices made on ``x``'s device)."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, torch.as_tensor(positions, device=x.device)]


#: the most bytes of residual stream a :class:`TemplateKeys` keeps between layers (rows beyond it are run from the
#: embeddings again): the rows of 1,000 requests × 6 templates on the embedded model take about 0.4 GB
RESUME_BUDGET = 1 << 30


class TemplateKeys:
    """Per request, the mean over templates of the key entering W_out at a layer and (optionally) of the residual
    output of a later layer, at the fact token — for one layer, or for the layers of a span edited bottom-up.

    The rows (every request in every template, cut after the fact token) are encoded and right-padded once, in
    chunks of ``batch_rows`` so that memory stays bounded for thousands of requests. Each call runs the forward
    to the last layer it needs and stops there; it also keeps each chunk's output of the layer below its key
    layer (within ``budget`` bytes), so that the next call, for a higher key layer, starts there instead of at the
    embeddings. That is exact as long as, between two calls, only weights at or above the earlier call's key
    layer change — what an edit of a span does (MEMIT's layer-by-layer update writes layer l, then asks for the
    keys of layer l + 1). A call for a lower key layer than the last one starts from the embeddings again.
    """

    def __init__(self, adapter, requests: Sequence, templates: Sequence[str], fact_token: str = "subject_last",
                 batch_rows: int = 128, budget: int = 0):
        self.adapter, self.n, self.budget = adapter, len(requests), budget
        tok, dev = adapter.tokenizer, adapter.input_device
        rows = []
        for r, req in enumerate(requests):
            for ctx in templates:
                ids, fact, _ = encode_request(tok, ctx.replace("{}", req.prompt), req.subject, None, fact_token)
                rows.append((ids[: fact + 1], fact, r))
        pad = pad_id(tok)
        self.chunks = [(pad_rows([ids for ids, _, _ in c], pad, device=dev), [f for _, f, _ in c],
                        torch.tensor([r for _, _, r in c])) for c in
                       (rows[b: b + batch_rows] for b in range(0, len(rows), batch_rows))]
        self.counts = torch.zeros(self.n, dtype=torch.float64)
        for _, _, req_idx in self.chunks:
            self.counts.index_add_(0, req_idx, torch.ones(len(req_idx), dtype=torch.float64))
        # per chunk: (layer j, its raw output, its hidden state) recorded by the last call, or None
        self.resume: list = [None] * len(self.chunks)

    @torch.no_grad()
    def __call__(self, key_layer: int, out_layer: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``K`` (n, d_ff) on the device of W_out at ``key_layer`` and ``Z`` (n, d_model) on that of layer
        ``out_layer`` (None without it), both float32, summed in float64."""
        ad = self.adapter
        k_dev = ad.w_out_device(key_layer)
        z_dev = ad.layer_device(out_layer) if out_layer is not None else k_dev
        K = torch.zeros(self.n, ad.d_ff, dtype=torch.float64, device=k_dev)
        Z = torch.zeros(self.n, ad.d_model, dtype=torch.float64, device=z_dev) if out_layer is not None else None
        stop_module = ad.layers[out_layer] if out_layer is not None and out_layer >= key_layer else ad.w_out(key_layer)
        keep = self.budget > 0 and key_layer > 0
        kept = 0
        for c, (batch, facts, req_idx) in enumerate(self.chunks):
            start, self.resume[c] = self.resume[c], None
            with contextlib.ExitStack() as stack:
                if start is not None and start[0] < key_layer:  # the layers below it are as they were then
                    stack.enter_context(start_at_layer(ad.layers, start[0], start[2], start[1]))
                raw = stack.enter_context(RawOutput(ad.layers[key_layer - 1])) if keep else None
                tk = stack.enter_context(Hook(ad.w_out(key_layer), retain_input=True))
                tz = stack.enter_context(Hook(ad.layers[out_layer] if out_layer is not None else ad.w_out(key_layer),
                                              retain_output=out_layer is not None))
                stack.enter_context(Hook(stop_module, stop=True))
                ad.body(**batch.inputs(), use_cache=False)
            K.index_add_(0, req_idx.to(k_dev), _at(tk.input, facts).to(k_dev, torch.float64))
            if Z is not None:
                Z.index_add_(0, req_idx.to(z_dev), _at(tz.output, facts).to(z_dev, torch.float64))
            if raw is not None:
                hidden = unwrap(raw.output)
                size = hidden.numel() * hidden.element_size()
                if kept + size <= self.budget:
                    self.resume[c], kept = (key_layer - 1, raw.output, hidden), kept + size
        K /= self.counts[:, None].to(k_dev)
        if Z is not None:
            Z /= self.counts[:, None].to(z_dev)
        return K.float(), (Z.float() if Z is not None else None)


def template_keys(adapter, requests: Sequence, templates: Sequence[str], key_layer: int,
                  out_layer: Optional[int] = None, fact_token: str = "subject_last",
                  batch_rows: int = 128) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per request, the mean over templates of the key entering W_out at ``key_layer`` and
    (optionally) of the residual output of ``out_layer``, at the fact token: one call of
    :class:`TemplateKeys` (the forward stops after the last layer needed; rows right-padded in chunks of
    ``batch_rows``). K is summed (float64) on the device of W_out at ``key_layer``, Z on that of layer
    ``out_layer``; both are returned there, float32.
    """
    return TemplateKeys(adapter, requests, templates, fact_token, batch_rows)(key_layer, out_layer)


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
