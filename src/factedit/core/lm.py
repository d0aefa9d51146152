"""What a language model says: teacher-forced target scores, greedy and sampled continuations.

    p = target_probabilities(adapter, ["Eiffel Tower is in"], ["Rome"])   # exp(mean log p)
    greedy_continuation(adapter, "The capital of Japan is", 6)

Scoring functions take an optional ``models`` object (an edit package's per-row edited models,
:class:`~factedit.edit.row_deltas.RowDeltas`): with it, row ``i`` runs on edited model ``owners[i]``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .batching import pad_id, pad_rows
from .kv import cache_of, past
from .tokens import encode_with_target

__all__ = ["sample_continuations", "greedy_continuation", "greedy_rows", "greedy_tokens", "pad_finished", "eos_ids",
           "target_probabilities", "probability", "target_logprobs", "target_token_scores", "position_scores",
           "rows_on"]


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


#: a row's own stopping rule: called with the row's new tokens after each one, True to stop there
Stop = Callable[[List[int]], bool]


@torch.no_grad()
def greedy_rows(adapter, starts: Sequence[Sequence[int]], limits: Union[int, Sequence[int]],
                stops: Optional[Sequence[Optional[Stop]]] = None, drafts: Optional[Sequence[Sequence[int]]] = None,
                eos: Optional[set] = None, batch_rows: int = 128, models=None,
                owners: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Greedy decoding of token rows, batched: per row the new tokens, at most ``limits[i]`` (an int: the same
    for every row), ending at the first EOS (kept, as ``model.generate`` keeps it) or where the row's
    ``stops[i]`` first says so. Rows of different prompts and lengths decode together in one KV cache
    (right-padded, each row's padding masked out of the cache and its positions its own: every row computes
    what its prompt alone computes, up to the rounding of batched matrix products; a model whose sliding
    window is shorter than the rows decodes them left-padded instead); a row that has stopped leaves the
    batch, so the cost follows the rows' own lengths.

    ``drafts``: a guess of each row's tokens (e.g. the greedy tokens of the weights before an edit). One
    teacher-forced forward over prompt + draft checks every drafted token at once; a row keeps its longest
    agreeing prefix plus the model's own token where it first disagrees, and only the rows not finished then
    decode step by step. The tokens are the same (greedy decoding verified, as in speculative decoding), at
    the cost of one forward where the draft holds. ``eos``: the ids that end a row (default
    :func:`eos_ids`). With ``models`` (a :class:`~factedit.edit.row_deltas.RowDeltas`), row ``i`` runs on
    edited model ``owners[i]``."""
    n = len(starts)
    limits = [int(limits)] * n if isinstance(limits, int) else [int(x) for x in limits]
    stops = list(stops) if stops is not None else [None] * n
    eos = eos_ids(adapter, adapter.tokenizer) if eos is None else set(eos)
    if not (len(limits) == len(stops) == n) or (drafts is not None and len(drafts) != n) or (
            models is not None and (owners is None or len(owners) != n)):
        raise ValueError("greedy_rows: starts, limits, stops, drafts and owners must have one entry per row")
    new: List[List[int]] = [[] for _ in range(n)]
    todo = [i for i in range(n) if limits[i] > 0]
    window = _sliding_window(adapter.model)
    for a in range(0, len(todo), max(1, batch_rows)):
        part = todo[a: a + batch_rows]
        st, lim, sp = [list(starts[i]) for i in part], [limits[i] for i in part], [stops[i] for i in part]
        dr = [list(drafts[i]) if drafts is not None else [] for i in part]
        own = [owners[i] for i in part] if models is not None else None
        widest = max(len(s) + len(d) for s, d in zip(st, dr)) + max(lim)
        if window is None or widest <= window:  # one pass: masked cache entries cannot shift a window
            got, _ = _decode(adapter, st, dr, lim, sp, eos, models, own)
        else:  # a sliding window counts cache entries: verify the drafts, then decode left-padded (no gaps)
            got, going = _decode(adapter, st, dr, lim, sp, eos, models, own, first_only=True) if any(dr) \
                else ([[] for _ in part], list(range(len(part))))
            if going:
                more, _ = _decode(adapter, [st[r] + got[r] for r in going], [[] for _ in going],
                                  [lim[r] - len(got[r]) for r in going],
                                  [None if sp[r] is None else (lambda m, r=r: sp[r](got[r] + m)) for r in going],
                                  eos, models, [own[r] for r in going] if own is not None else None, side="left")
                for r, m in zip(going, more):
                    got[r] = got[r] + m
        for i, row in zip(part, got):
            new[i] = row
    return new


def _sliding_window(model) -> Optional[int]:
    """The model's attention window in cache entries, when it has one (Mistral, Gemma 2/3 ...)."""
    cfg = model.config
    w = getattr(cfg, "sliding_window", None)
    return int(w) if isinstance(w, int) and w > 0 and getattr(cfg, "use_sliding_window", True) is not False \
        else None


def pad_finished(rows: Sequence[Sequence[int]], pad: int) -> List[List[int]]:
    """Rows of new tokens as a batched ``model.generate`` returns them: a row that stopped early is padded
    with ``pad`` until the longest row stops."""
    length = max((len(r) for r in rows), default=0)
    return [list(r) + [pad] * (length - len(r)) for r in rows]


def greedy_tokens(adapter, prompts: Sequence[str], max_new_tokens: int,
                  draft: Optional[Sequence[Sequence[int]]] = None) -> List[List[int]]:
    """The greedy continuations of ``prompts`` as token ids: the tokens ``model.generate(do_sample=False,
    pad_token_id=pad)`` gives (a row that emitted EOS is padded with the pad id after it; all stop when
    every row has), in one batch (:func:`greedy_rows`; ``draft``: a guess of the tokens, verified)."""
    tok = adapter.tokenizer
    starts = [list(tok(p)["input_ids"]) for p in prompts]
    return pad_finished(greedy_rows(adapter, starts, max_new_tokens, drafts=draft), pad_id(tok))  # pads follow EOS


def _decode(adapter, starts: List[List[int]], drafts: List[List[int]], limits: List[int],
            stops: List[Optional[Stop]], eos: set, models=None, owners=None, side: str = "right",
            first_only: bool = False) -> Tuple[List[List[int]], List[int]]:
    """Greedy decoding of one batch of rows (see :func:`greedy_rows`); returns the rows' new tokens and
    which rows are unfinished (none unless ``first_only``: stop after the first forward).

    One forward over each row's prompt and draft (padded on ``side``, keeping a KV cache) predicts the first
    token and checks every drafted one; a row keeps its draft's agreeing prefix and the model's own token
    where it first disagrees. Unfinished rows then decode step by step from that same cache: the cache
    entries past a row's kept tokens (right padding, a rejected draft) are masked out and the row's positions
    go on from its own length, so a padded row computes what the unpadded one does. A finished row leaves
    the batch."""
    body, dev = adapter.body, adapter.input_device
    cut = []
    for d, limit in zip(drafts, limits):
        d = d[:limit]
        cut.append(d[: next((j + 1 for j, t in enumerate(d) if t in eos), len(d))])  # up to its EOS
    if side == "left" and any(cut):
        raise ValueError("left-padded rows take no drafts")
    batch = pad_rows([s + d for s, d in zip(starts, cut)], pad_id(adapter.tokenizer), side=side, device=dev)
    shift = [batch.width - n if side == "left" else 0 for n in batch.lengths]
    new: List[List[int]] = [[] for _ in starts]

    def take(i: int, t: int) -> bool:
        """Append token ``t`` to row ``i``; True while the row goes on."""
        new[i].append(t)
        return not (t in eos or len(new[i]) >= limits[i] or (stops[i] is not None and stops[i](new[i])))

    with contextlib.ExitStack() as stack:
        stack.enter_context(rows_on(models, owners))
        res = body(**batch.inputs(positions=True), use_cache=True)
        h = res.last_hidden_state
        checked = [min(len(d) + 1, limit) for d, limit in zip(cut, limits)]  # draft tokens and the one after
        rows = [r for r, n in enumerate(checked) for _ in range(n)]
        cols = [shift[r] + len(s) + j - 1 for r, (s, n) in enumerate(zip(starts, checked)) for j in range(n)]
        pred = adapter.logits(h[torch.tensor(rows, device=h.device),
                                torch.tensor(cols, device=h.device)]).argmax(-1).tolist()
        going, k = [], 0
        mask = batch.attention_mask.clone()
        for r, (s, d, n) in enumerate(zip(starts, cut, checked)):
            mine, k = pred[k: k + n], k + n
            on = True
            for j, t in enumerate(mine):
                on = take(r, t)
                if not on or j >= len(d) or t != d[j]:
                    break
            if on:
                going.append(r)
                mask[r, shift[r] + len(s) + len(new[r]) - 1:] = 0  # past the kept tokens: padding, rejected draft
        if not going or first_only:
            return new, going
        cache = cache_of(res)
        live = list(range(len(starts)))  # the rows in the cache, in its batch order
        pos = torch.tensor([[len(s) + len(row) - 1] for s, row in zip(starts, new)], device=dev)
        while going:
            if len(going) < len(live):  # drop the rows that stopped
                kept = set(going)
                idx = torch.tensor([j for j, r in enumerate(live) if r in kept])  # CPU indices: any cache device
                cache.batch_select_indices(idx)
                mask, pos = mask[idx.to(mask.device)], pos[idx.to(pos.device)]
                live = going
                if models is not None:
                    stack.enter_context(rows_on(models, [owners[i] for i in live]))
            ids = torch.tensor([[new[i][-1]] for i in live], device=dev)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            res = body(input_ids=ids, attention_mask=mask, position_ids=pos, **past(body, cache))
            cache, pos = cache_of(res), pos + 1
            nxt = adapter.logits(res.last_hidden_state[:, -1, :]).argmax(-1).tolist()
            going = [i for i, t in zip(live, nxt) if take(i, t)]
    return new, []


@torch.no_grad()
def position_scores(adapter, seqs: Sequence[Sequence[int]], queries: Sequence[Sequence[Tuple[int, int]]],
                    batch_size: int = 32, models=None, owners: Optional[Sequence[int]] = None,
                    top1: bool = False) -> List[Tuple[torch.Tensor, ...]]:
    """For each token sequence and each ``(j, t)`` of its queries: the log-probability that token ``t``
    comes at position ``j`` (predicted at ``j - 1``, teacher forcing) and whether ``t`` is the top-1 there.

    Sequences are batched by length (little padding); logits are formed only at queried positions.
    With ``models`` (a :class:`~factedit.row_deltas.RowDeltas`), sequence ``i`` is scored on edited
    model ``owners[i]``. Returns ``(logprobs, hits)`` per sequence, float32 and bool on the CPU, in input order;
    with ``top1`` ``(logprobs, hits, top1)``, the ids of the top-1 tokens there too.
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
        best = logp.argmax(dim=-1)
        hits = (best == tgt_t).cpu()
        best = best.cpu()
        rows_t = torch.tensor(rows)
        for r, i in enumerate(chunk):
            sel_r = rows_t == r
            result[i] = (tok_lp[sel_r], hits[sel_r], best[sel_r]) if top1 else (tok_lp[sel_r], hits[sel_r])
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
