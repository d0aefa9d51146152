"""What a language model says: teacher-forced target scores, greedy and sampled continuations.

    p = target_probabilities(adapter, ["Eiffel Tower is in"], ["Rome"])   # exp(mean log p)
    greedy_continuation(adapter, "The capital of Japan is", 6)

Scoring functions take an optional ``models`` object (an edit package's per-row edited models,
:class:`~factedit.edit.row_deltas.RowDeltas`): with it, row ``i`` runs on edited model ``owners[i]``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import contextlib

from .batching import pad_id, pad_rows
from .kv import cache_of, past
from .tokens import encode_with_target

__all__ = ["sample_continuations", "greedy_continuation", "target_probabilities", "target_logprobs",
           "target_token_scores", "position_scores", "rows_on"]


def rows_on(models, owners: Optional[Sequence[int]]):
    """The context in which the next forward passes' rows run on edited models ``owners`` of
    ``models`` (anything with a ``rows(owners)`` context, e.g. ``RowDeltas``); a no-op context when
    ``models`` is None: the current weights."""
    return contextlib.nullcontext() if models is None else models.rows(owners)


def _start_ids(tok) -> List[int]:
    """What a text starts with: the tokenizer's own start (its BOS, or the prompt prefix), else
    its BOS or EOS token."""
    start = list(tok("")["input_ids"])
    if start:
        return start
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return [int(t)]
    raise ValueError("tokenizer has neither a BOS nor an EOS token to start sampling from")


@torch.no_grad()
def sample_continuations(
    adapter,
    n: int,
    length: int,
    seed: int,
    top_k: int = 5,
    prompt_ids: Optional[List[int]] = None,
) -> List[List[int]]:
    """``n`` sampled continuations of ``length`` tokens (top-k sampling, seeded, batched).

    Reproducible for a given seed, model and device: the generator is private, global RNG
    state is not touched.
    """
    model, device = adapter.model, adapter.input_device
    start = prompt_ids if prompt_ids is not None else _start_ids(adapter.tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    ids = torch.tensor([start] * n, device=device)
    out = model(input_ids=ids, use_cache=True)
    cache, logits = cache_of(out), out.logits[:, -1, :]
    new = []
    for _ in range(length):
        logits = logits.float().cpu()
        if top_k:
            vals, idx = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(F.softmax(vals, dim=-1), 1, generator=gen)
            nxt = idx.gather(1, choice)
        else:
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
        new.append(nxt)
        out = model(input_ids=nxt.to(device), **past(model, cache))
        cache, logits = cache_of(out), out.logits[:, -1, :]
    return torch.cat(new, dim=1).tolist()


@torch.no_grad()
def greedy_continuation(adapter, prompt: str, max_new_tokens: int = 12, tokenizer=None) -> str:
    """Greedy continuation of ``prompt`` (the generated text only), tokenized by ``tokenizer`` (default
    the adapter's, which puts the prompt prefix first)."""
    tok, model = tokenizer or adapter.tokenizer, adapter.model
    enc = tok(prompt, return_tensors="pt").to(adapter.input_device)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
        top_p=None, top_k=None, temperature=None,
    )
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def position_scores(adapter, seqs: Sequence[Sequence[int]], queries: Sequence[Sequence[Tuple[int, int]]],
                    batch_size: int = 32, models=None,
                    owners: Optional[Sequence[int]] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """For each token sequence and each ``(j, t)`` of its queries: the log-probability that token ``t``
    comes at position ``j`` (predicted at ``j - 1``, teacher forcing) and whether ``t`` is the top-1 there.

    Sequences are batched by length (little padding); logits are formed only at queried positions.
    With ``models`` (a :class:`~factedit.row_deltas.RowDeltas`), sequence ``i`` is scored on edited
    model ``owners[i]``. Returns ``(logprobs, hits)`` per sequence, float32 and bool on the CPU, in input order.
    """
    pad = pad_id(adapter.tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    result: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(seqs)
    dev = adapter.input_device
    for b in range(0, len(order), batch_size):
        chunk = order[b: b + batch_size]
        batch = pad_rows([seqs[i] for i in chunk], pad, device=dev)
        rows, cols, tgt = [], [], []
        for r, i in enumerate(chunk):
            for j, t in queries[i]:
                rows.append(r), cols.append(j - 1), tgt.append(t)
        with rows_on(models, [owners[i] for i in chunk] if models is not None else None):
            hidden = adapter.body(**batch.inputs()).last_hidden_state
        sel = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        logp = F.log_softmax(adapter.logits(sel).float(), dim=-1)  # on the head's device
        tgt_t = torch.tensor(tgt, device=logp.device)
        tok_lp = logp[torch.arange(len(tgt), device=logp.device), tgt_t].cpu()
        hits = (logp.argmax(dim=-1) == tgt_t).cpu()
        rows_t = torch.tensor(rows)
        for r, i in enumerate(chunk):
            result[i] = (tok_lp[rows_t == r], hits[rows_t == r])
    return result  # type: ignore[return-value]


def target_token_scores(adapter, prompts: Sequence[str], targets: Sequence[str],
                        batch_size: int = 32) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per (prompt, target) pair: the log-likelihood of each token of the space-prefixed target
    and whether that token is the model's top-1 prediction, both under teacher forcing
    (see :func:`position_scores`)."""
    items = [encode_with_target(adapter.tokenizer, p, t) for p, t in zip(prompts, targets)]
    return position_scores(adapter, [ids for ids, _ in items], [[(j, ids[j]) for j in idx] for ids, idx in items],
                           batch_size)


def target_logprobs(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[float]:
    """Mean per-token log-likelihood of each space-prefixed target after its prompt.

    Teacher forcing; logits are computed only at the positions that predict target tokens.
    """
    return [float(lp.mean()) for lp, _ in target_token_scores(adapter, prompts, targets, batch_size)]


def target_probabilities(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[float]:
    """``exp`` of :func:`target_logprobs`: the per-token geometric-mean probability."""
    return [float(torch.tensor(lp).exp()) for lp in target_logprobs(adapter, prompts, targets, batch_size)]
