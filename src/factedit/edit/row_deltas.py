"""Many edited versions of one model in one batch: row r of a forward pass runs as if
W_out had been updated by the deltas of model ``owners[r]``.

Evaluating single edits one at a time spends most of its time in per-forward overhead (a GE
text is 100 one-token steps). Since an edit only adds ``Δ = left @ rightᵀ`` to some W_out
matrices, the output of an edited W_out is ``W x + left (rightᵀ x)``: a hook can add each row's
own Δ x, and the cases of many independent edits are scored together without touching the
weights.

    with RowDeltas(adapter, [deltas_case_0, deltas_case_1]) as models:
        models.owners = torch.tensor([0, 0, 1])      # rows 0, 1 see edit 0; row 2 edit 1
        out = adapter.model(ids)

An owner of ``-1`` (or a model with no deltas) sees the unedited weights. The result equals the
applied edit up to float rounding (``(W + Δ) x`` vs ``W x + Δ x``); tests compare both.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch

from .deltas import LayerDelta

__all__ = ["RowDeltas", "rows_on"]


class RowDeltas(contextlib.AbstractContextManager):
    """Forward hooks on the W_out modules that the models' deltas touch (see module docstring).

    Args:
        adapter: the :class:`~factedit.arch.ModelAdapter` of the unedited model.
        models: per model, the list of its :class:`~factedit.delta.LayerDelta` (several deltas on one
            layer add up).
    """

    def __init__(self, adapter, models: Sequence[Sequence[LayerDelta]]):
        self.adapter = adapter
        # per layer: per model the (left, right) factors (right None: dense Δ in left)
        self._by_layer: Dict[int, Dict[int, List[LayerDelta]]] = {}
        for m, deltas in enumerate(models):
            for d in deltas:
                adapter.check_layer(d.layer)
                self._by_layer.setdefault(d.layer, {}).setdefault(m, []).append(d)
        self.owners: Optional[torch.Tensor] = None
        self._handles: list = []

    def __enter__(self) -> "RowDeltas":
        for layer in sorted(self._by_layer):
            module = self.adapter.w_out(layer)
            dev = self.adapter.w_out_device(layer)  # the factors go there once, not on every forward
            per_model = {m: [(d.left.to(dev), None if d.right is None else d.right.to(dev)) for d in ds]
                         for m, ds in self._by_layer[layer].items()}
            self._handles.append(module.register_forward_hook(self._hook(per_model)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.owners = None

    def _hook(self, per_model: Dict[int, List[tuple]]):
        def hook(module, inputs, output):
            owners = self.owners
            if owners is None:
                raise RuntimeError("RowDeltas: set .owners (model index per batch row) before the forward pass")
            x = inputs[0]
            if owners.shape[0] != x.shape[0]:
                raise RuntimeError(f"RowDeltas: {owners.shape[0]} owners for a batch of {x.shape[0]} rows")
            add = None
            for m in owners.unique().tolist():
                if m not in per_model:
                    continue
                rows = (owners == m).nonzero()[:, 0].to(x.device)
                xm = x[rows].to(torch.float32)
                dm = 0
                for left, right in per_model[m]:
                    left = left.to(x.device)  # a no-op unless the input arrives elsewhere
                    if right is None:  # dense Δ (d_model, d_ff)
                        dm = dm + xm @ left.T
                    else:
                        dm = dm + (xm @ right.to(x.device)) @ left.T
                if add is None:
                    add = torch.zeros_like(output)
                add[rows.to(add.device)] = dm.to(device=add.device, dtype=output.dtype)
            return output if add is None else output + add
        return hook

    @contextlib.contextmanager
    def rows(self, owners: Sequence[int]):
        """Set the owners of the next forward passes' rows (restored afterwards)."""
        prev = self.owners
        self.owners = torch.as_tensor(list(owners), dtype=torch.long)
        try:
            yield self
        finally:
            self.owners = prev


def rows_on(models: Optional[RowDeltas], owners: Optional[Sequence[int]]):
    """The context in which the next forward passes' rows run on edited models ``owners`` of
    ``models`` (a no-op context when ``models`` is None: the current weights)."""
    return contextlib.nullcontext() if models is None else models.rows(owners)
