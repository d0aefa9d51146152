"""Scoring cases on the model as it is now: every prompt × target of a group of cases in as few
batched forward passes as possible, and the generations behind GE.

    rows = score_cases(adapter, cases)            # one dict of metrics per case
    rows = score_cases(adapter, cases, ge=GenerationConfig(length=100))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from ..generation import target_token_scores
from .datasets import Case, ZsRECase
from .scoring import counterfact_case, text_entropy, token_accuracy

__all__ = ["GenerationConfig", "score_cases", "sample_texts"]


@dataclass(frozen=True)
class GenerationConfig:
    """Generations for GE (ROME: top-k 5 sampling up to 100 tokens including the prompt).

    Attributes:
        length: total tokens per text (prompt included); 0 disables GE.
        top_k: sample from the k most likely tokens.
        max_prompts: use at most this many generation prompts per case (CounterFact has 10).
        seed: base seed; each case samples with ``seed + case_id`` (reproducible, resumable).
    """

    length: int = 100
    top_k: int = 5
    max_prompts: int = 10
    seed: int = 0


@torch.no_grad()
def sample_texts(adapter, prompts: Sequence[str], length: int, seed: int, top_k: int = 5) -> List[str]:
    """Top-k samples continuing each prompt (batched, left-padded, KV cache) to ``length`` tokens in
    all, prompt included; returns prompt + continuation as text. A private generator seeds the sampling."""
    tok, model, dev = adapter.tokenizer, adapter.model, adapter.device
    enc = [list(tok(p)["input_ids"]) for p in prompts]
    width = max(len(e) for e in enc)
    steps = max(0, length - min(len(e) for e in enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(enc):
        ids[r, width - len(e):] = torch.tensor(e)
        mask[r, width - len(e):] = 1
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new = []
    for _ in range(steps):
        vals, idx = out.logits[:, -1, :].float().cpu().topk(top_k, dim=-1)
        nxt = idx.gather(1, torch.multinomial(F.softmax(vals, dim=-1), 1, generator=gen)).to(dev)
        new.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)
    cont = torch.cat(new, dim=1).tolist() if new else [[] for _ in enc]
    return [tok.decode(e + c[: max(0, length - len(e))], skip_special_tokens=True) for e, c in zip(enc, cont)]


def _generation_prompts(case: Case, cfg: GenerationConfig) -> List[str]:
    if isinstance(case, ZsRECase):
        return [case.request.text]
    return list(case.generation_prompts[: cfg.max_prompts])


def score_cases(adapter, cases: Sequence[Case], ge: GenerationConfig = GenerationConfig(length=0),
                batch_size: int = 64) -> List[Dict]:
    """Metrics of each case on the current weights.

    CounterFact: ES/PS/NS, EM/PM/NM per case and the raw ``(log P(o*), log P(o_c))`` pairs per prompt
    (``rewrite_lp``, ``paraphrase_lp``, ``neighborhood_lp``); zsRE: token accuracy of
    ``alt`` on the question (efficacy) and its rephrase (paraphrase), and of ``loc_ans`` on ``loc?``
    (specificity). All rows of all cases go through one call of :func:`target_token_scores`.
    """
    prompts: List[str] = []
    targets: List[str] = []
    spans = []  # per case: list of (name, start, stop) of its rows
    for c in cases:
        mine = []
        if isinstance(c, ZsRECase):
            for name, p, t in (("efficacy", c.request.text, c.request.target_new),
                               ("paraphrase", c.rephrase, c.request.target_new),
                               ("specificity", c.loc + "?", c.loc_ans)):
                mine.append((name, len(prompts), len(prompts) + 1))
                prompts.append(p), targets.append(t)
        else:
            r = c.request
            for name, ps in (("rewrite", [r.text]), ("paraphrase", c.paraphrase_prompts),
                             ("neighborhood", c.neighborhood_prompts)):
                start = len(prompts)
                for p in ps:  # rows interleaved: (p, new), (p, true)
                    prompts += [p, p]
                    targets += [r.target_new, r.target_true]
                mine.append((name, start, len(prompts)))
        spans.append(mine)
    scores = target_token_scores(adapter, prompts, targets, batch_size)
    out = []
    for c, mine in zip(cases, spans):
        rec: Dict = {}
        if isinstance(c, ZsRECase):
            for name, a, _ in mine:
                lp, hits = scores[a]
                rec[name] = token_accuracy(hits.tolist())
                rec[f"{name}_hits"] = [bool(h) for h in hits]
        else:
            for name, a, b in mine:
                rec[f"{name}_lp"] = [(float(scores[i][0].mean()), float(scores[i + 1][0].mean())) for i in range(a, b, 2)]
            rec.update(counterfact_case(rec["rewrite_lp"], rec["paraphrase_lp"], rec["neighborhood_lp"]))
        if ge.length > 0:
            gp = _generation_prompts(c, ge)
            texts = sample_texts(adapter, gp, ge.length, ge.seed + c.case_id, ge.top_k) if gp else []
            rec["GE"] = text_entropy(texts)
            rec["generations"] = texts[:2]
        out.append(rec)
    return out
