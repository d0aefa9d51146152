"""Padded batches of tokenized rows: the one place that lays token lists out for a forward pass.

    batch = pad_rows([[5, 6, 7], [8]], pad_id(tok), side="right", device=dev)
    adapter.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    last = batch.last_index            # (B,) position of each row's last real token

Right padding (the default) keeps every row's real tokens at positions ``0..n-1`` of the tensor;
left padding puts them at the end (what incremental decoding and KV-cache prefixes need), with
``position_ids`` counting the real tokens from 0 so that a padded row computes exactly like the
unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

__all__ = ["pad_id", "Batch", "pad_rows"]


def pad_id(tok) -> int:
    """The id used for padding: the tokenizer's pad token, else 0 (padding is always masked out)."""
    return tok.pad_token_id if tok.pad_token_id is not None else 0


@dataclass
class Batch:
    """Token rows padded to one width.

    Attributes:
        input_ids: (B, W) long, padding filled with the pad id.
        attention_mask: (B, W) long, 1 on real tokens.
        position_ids: (B, W) long, ``0..n-1`` on each row's real tokens, 0 on padding.
        lengths: real tokens per row.
        side: ``"right"`` or ``"left"``: where the padding is.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: List[int]
    side: str

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def last_index(self) -> torch.Tensor:
        """(B,) tensor position of each row's last real token."""
        lengths = torch.tensor(self.lengths, device=self.input_ids.device)
        return lengths - 1 if self.side == "right" else torch.full_like(lengths, self.width - 1)

    def inputs(self, positions: bool = False) -> dict:
        """Keyword arguments of a forward pass (``position_ids`` too with ``positions``)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if positions:
            out["position_ids"] = self.position_ids
        return out


def pad_rows(rows: Sequence[Sequence[int]], pad: int, side: str = "right", device=None,
             width: Optional[int] = None) -> Batch:
    """Lay out token rows as a :class:`Batch` (``width`` defaults to the longest row; an empty row
    is allowed and is all padding)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    lengths = [len(r) for r in rows]
    W = max(lengths, default=0) if width is None else width
    if lengths and max(lengths) > W:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit width {W}")
    ids = torch.full((len(rows), W), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), W), dtype=torch.long)
    pos = torch.zeros((len(rows), W), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        if not n:
            continue
        sl = slice(0, n) if side == "right" else slice(W - n, W)
        ids[b, sl] = torch.as_tensor(list(row), dtype=torch.long)
        mask[b, sl] = 1
        pos[b, sl] = torch.arange(n)
    if device is not None:
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    return Batch(ids, mask, pos, lengths, side)
