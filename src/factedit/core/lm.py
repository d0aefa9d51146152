"""What a language model says: teacher-forced target scores, greedy and sampled continuations.

    p = target_probabilities(adapter, ["Eiffel Tower is in"], ["Rome"])   # exp(mean log p)
    greedy_continuation(adapter, "The capital of Japan is", 6)

Scoring functions take an optional ``models`` object (an edit package's per-row edited models,
:class:`~factedit.edit.row_deltas.RowDeltas`): with it, row ``i`` runs on edited model ``owners[i]``.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .batching import pad_id, pad_rows
from .kv import cache_of, past
from .tokens import encode_with_target

__all__ = ["sample_continuations", "greedy_continuation", "greedy_tokens", "eos_ids", "target_probabilities",
           "probability", "target_logprobs",
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


def eos_ids(adapter, tok) -> set:
    """The token ids that end a generation: the tokenizer's EOS and the model's generation config's."""
    return {t for t in (tok.eos_token_id, getattr(adapter.model.generation_config, "eos_token_id", None))
            if isinstance(t, int)}


@torch.no_grad()
def greedy_tokens(adapter, prompts: Sequence[str], max_new_tokens: int,
                  draft: Optional[Sequence[Sequence[int]]] = None) -> List[List[int]]:
    """The greedy continuations of ``prompts`` as token ids: the tokens ``model.generate(do_sample=False,
    pad_token_id=pad)`` gives (a row that emitted EOS is padded with the pad id after it; all stop when
    every row has), in one left-padded batch with a KV cache.

    ``draft``: a guess of the continuations (e.g. the same prompts' greedy tokens before an edit). One
    teacher-forced forward over prompt + draft checks every drafted token at once; each row keeps its
    longest agreeing prefix plus the model's own token where it first disagrees, and only rows that are not
    finished then decode step by step. The result is the same tokens (greedy decoding verified, as in
    speculative decoding), at the cost of one forward when the draft holds."""
    tok = adapter.tokenizer
    eos = eos_ids(adapter, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else pad_id(tok)
    starts = [list(tok(p)["input_ids"]) for p in prompts]
    new: List[List[int]] = [[] for _ in prompts]
    if draft is not None:
        new = _verified_prefix(adapter, starts, [list(d) for d in draft], max_new_tokens, eos)

    def finished(row):
        return len(row) >= max_new_tokens or any(t in eos for t in row)

    todo = [i for i, row in enumerate(new) if not finished(row)]
    if todo:
        more = _decode(adapter, [starts[i] + new[i] for i in todo], [max_new_tokens - len(new[i]) for i in todo], eos)
        for i, m in zip(todo, more):
            new[i] = new[i] + m
    # generate's batch semantics: after its EOS a row holds pads until the longest row stops
    length = max((len(r) for r in new), default=0)
    return [row + [pad] * (length - len(row)) for row in new]


def _verified_prefix(adapter, starts, draft, max_new_tokens: int, eos: set) -> List[List[int]]:
    """Per row, the greedy tokens that one teacher-forced forward over ``start + draft`` confirms."""
    drafts = []
    for d in draft:
        d = d[:max_new_tokens]
        cut = next((j + 1 for j, t in enumerate(d) if t in eos), len(d))  # up to its EOS (pads after it)
        drafts.append(d[:cut])
    batch = pad_rows([s + d for s, d in zip(starts, drafts)], pad_id(adapter.tokenizer), device=adapter.input_device)
    h = adapter.body(**batch.inputs()).last_hidden_state
    rows, cols = [], []
    for r, (s, d) in enumerate(zip(starts, drafts)):
        for j in range(min(len(d) + 1, max_new_tokens)):  # predictions of draft token j (and of the one after)
            rows.append(r), cols.append(len(s) + j - 1)
    pred = adapter.logits(h[torch.tensor(rows, device=h.device),
                            torch.tensor(cols, device=h.device)]).argmax(-1).tolist()
    out, k = [], 0
    for s, d in zip(starts, drafts):
        n = min(len(d) + 1, max_new_tokens)
        mine, k = pred[k: k + n], k + n
        keep = []
        for j, t in enumerate(mine):
            keep.append(t)
            if t in eos or j >= len(d) or t != d[j]:
                break
        out.append(keep)
    return out


def _decode(adapter, rows: List[List[int]], steps: List[int], eos: set) -> List[List[int]]:
    """Greedy decoding of each row for at most ``steps[i]`` tokens (stopping at EOS), batched with a KV cache."""
    body = adapter.body
    batch = pad_rows(rows, pad_id(adapter.tokenizer), side="left", device=adapter.input_device)
    mask, pos = batch.attention_mask, batch.position_ids
    res = body(input_ids=batch.input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new: List[List[int]] = [[] for _ in rows]
    live = [True] * len(rows)
    for step in range(max(steps)):
        nxt = adapter.logits(res.last_hidden_state[:, -1, :]).argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if live[i]:
                new[i].append(t)
                live[i] = t not in eos and len(new[i]) < steps[i]
        if not any(live):
            break
        ids = torch.tensor([[row[-1] if row else 0] for row in new], device=mask.device)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = pos[:, -1:] + 1
        res = body(input_ids=ids, attention_mask=mask, position_ids=pos, **past(body, cache_of(res)))
    return new


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
    return [probability(lp) for lp in target_logprobs(adapter, prompts, targets, batch_size)]


def probability(logprob: float) -> float:
    """``exp`` of a mean log-likelihood, as :func:`target_probabilities` reports it."""
    return float(torch.tensor(logprob).exp())
