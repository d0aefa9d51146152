"""Scoring cases on the model as it is now: every prompt × target of a group of cases in as few
batched forward passes as possible, and the generations behind GE.

    rows = score_cases(adapter, cases)            # one dict of metrics per case
    rows = score_cases(adapter, cases, ge=GenerationConfig(length=100))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.answers import GEN_TOKENS, greedy_answers
from ..core.batching import pad_id, pad_rows
from ..core.kv import cache_of, past
from ..core.lm import position_scores, rows_on
from ..core.tokens import encode_with_target
from .datasets import Case, KnowEditCase, MQuAKECase, ZsRECase
from .scoring import counterfact_case, generation_case, knowedit_case, mquake_case, text_entropy, token_accuracy

__all__ = ["GenerationConfig", "score_cases", "generation_scores", "sample_texts", "sample_text_groups",
           "greedy_answers", "answer_prompts", "answer_scores", "unedited_answers", "GEN_TOKENS", "qa_prompt",
           "mquake_prompts"]



@dataclass(frozen=True)
class GenerationConfig:
    """Generations for GE (ROME: top-k 5 sampling up to 100 tokens including the prompt).

    Attributes:
        length: total tokens per text (prompt included); 0 disables GE.
        top_k: sample from the k most likely tokens.
        max_prompts: use at most this many generation prompts per case (CounterFact has 10).
        seed: base seed; each case samples with ``seed + case_id`` (reproducible, resumable).
        batch_rows: generation prompts sampled together (several cases per batch; each case keeps its
            own generator, so the batching does not change what is drawn).
    """

    length: int = 100
    top_k: int = 5
    max_prompts: int = 10
    seed: int = 0
    batch_rows: int = 64


def sample_texts(adapter, prompts: Sequence[str], length: int, seed: int, top_k: int = 5) -> List[str]:
    """Top-k samples continuing each prompt to ``length`` tokens in all, prompt included; returns
    prompt + continuation as text. A private generator seeded with ``seed`` drives the sampling."""
    return sample_text_groups(adapter, [(prompts, seed)], length, top_k)[0]


@torch.no_grad()
def sample_text_groups(adapter, groups: Sequence[Tuple[Sequence[str], int]], length: int, top_k: int = 5,
                       models=None, owners: Optional[Sequence[int]] = None) -> List[List[str]]:
    """:func:`sample_texts` of several ``(prompts, seed)`` groups in one left-padded batch with a KV
    cache. Each group draws from its own generator exactly as it would alone (so batching does not
    change which token is drawn, up to the rounding of the batched forward); with ``models`` (a
    :class:`~factedit.row_deltas.RowDeltas`) group ``g`` runs on edited model ``owners[g]``."""
    tok, body, dev = adapter.tokenizer, adapter.body, adapter.input_device
    enc, group_of = [], []
    for g, (prompts, _) in enumerate(groups):
        for p in prompts:
            enc.append(list(tok(p)["input_ids"]))
            group_of.append(g)
    if not enc:
        return [[] for _ in groups]
    steps = max(0, length - min(len(e) for e in enc))
    batch = pad_rows(enc, pad_id(tok), side="left", device=dev)
    gens = [torch.Generator(device="cpu").manual_seed(int(seed)) for _, seed in groups]
    spans, r0 = [], 0
    for prompts, _ in groups:
        spans.append((r0, r0 + len(prompts)))
        r0 += len(prompts)
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    new = []
    with rows_on(models, [owners[g] for g in group_of] if models is not None else None):
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(steps):
            logits = adapter.logits(out.last_hidden_state[:, -1, :])  # only the last position's logits
            vals, idx = logits.float().cpu().topk(top_k, dim=-1)
            probs = F.softmax(vals, dim=-1)
            choice = torch.empty((len(enc), 1), dtype=torch.long)
            for (a, b), gen in zip(spans, gens):
                if b > a:
                    choice[a:b] = torch.multinomial(probs[a:b], 1, generator=gen)
            nxt = idx.gather(1, choice).to(dev)
            new.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = pos[:, -1:] + 1
            out = body(input_ids=nxt, attention_mask=mask, position_ids=pos, **past(body, cache_of(out)))
    cont = torch.cat(new, dim=1).tolist() if new else [[] for _ in enc]
    texts = [tok.decode(e + c[: max(0, length - len(e))], skip_special_tokens=True) for e, c in zip(enc, cont)]
    return [texts[a:b] for a, b in spans]


def answer_prompts(case: Case) -> Dict[str, List[str]]:
    """The prompts a case's generation-based scores answer: rewrite, paraphrase, neighbourhood."""
    if isinstance(case, ZsRECase):
        return {"rewrite": [case.request.text], "paraphrase": [case.rephrase], "neighborhood": [case.loc + "?"]}
    return {"rewrite": [case.request.text], "paraphrase": list(case.paraphrase_prompts),
            "neighborhood": list(case.neighborhood_prompts)}


def _targets(case: Case) -> Tuple[List[str], List[str]]:
    """(new target and aliases, true target and aliases) of a case."""
    r = case.request
    true = [r.target_true] if r.target_true else []
    return [r.target_new], true


def _asked(adapter, prompts: List[str], chat: bool):
    """``(prompts, tokenizer)`` as the answers read them: as they are (the adapter's tokenizer, prompt prefix
    first), or with ``chat`` each prompt sent as the user's message through the chat template (read without
    the prefix: the template's markup starts the text)."""
    if not chat:
        return prompts, None
    from ..core.chat import chat_prompt
    from ..core.tokens import source_tokenizer

    tok = source_tokenizer(adapter.tokenizer)
    return [chat_prompt(tok, p) for p in prompts], tok


def _greedy_groups(adapter, cases, prompts_of, names: Sequence[str], gen_tokens: int, batch_rows: int, models,
                   owners, chat: bool) -> List[Dict[str, List[str]]]:
    """Greedy answers to the prompts ``names`` of ``prompts_of(case)`` of each case, in one batch (case ``i`` on
    edited model ``owners[i]`` of ``models``; ``chat``: through the chat template)."""
    prompts, row_owner, spans = [], [], []
    for i, c in enumerate(cases):
        ps, span = prompts_of(c), {}
        for name in names:
            span[name] = (len(prompts), len(prompts) + len(ps[name]))
            prompts += ps[name]
            row_owner += [owners[i] if models is not None else -1] * len(ps[name])
        spans.append(span)
    asked, tok = _asked(adapter, prompts, chat)
    texts = greedy_answers(adapter, asked, gen_tokens, batch_rows, models, row_owner if models is not None else None,
                           tokenizer=tok)
    return [{name: texts[a:b] for name, (a, b) in span.items()} for span in spans]


def answer_scores(adapter, cases: Sequence[Case], unedited: Dict[int, List[str]], max_new_tokens: int = GEN_TOKENS,
                  batch_rows: int = 64, models=None, owners: Optional[Sequence[int]] = None,
                  chat: bool = False) -> List[Dict]:
    """Generation-based scores of each case (:func:`~factedit.evaluation.scoring.generation_case`) from
    greedy answers on the current (or, with ``models``, case ``i``'s edited) weights; ``unedited`` maps a
    case id to the unedited model's neighbourhood answers (:func:`greedy_answers` before any edit).
    ``chat``: every prompt is asked as a user message through the tokenizer's chat template."""
    out = []
    for c, got in zip(cases, _greedy_groups(adapter, cases, answer_prompts, ("rewrite", "paraphrase", "neighborhood"),
                                            max_new_tokens, batch_rows, models, owners, chat)):
        new, true = _targets(c)
        rec = generation_case(got["rewrite"], got["paraphrase"], got["neighborhood"], unedited[c.case_id], new, true)
        rec["gen_texts"] = got
        out.append(rec)
    return out


def unedited_answers(adapter, cases: Sequence[Case], max_new_tokens: int = GEN_TOKENS, batch_rows: int = 64,
                     chat: bool = False) -> Dict[int, List[str]]:
    """Each case's neighbourhood answers on the current weights (call it before editing; ``chat`` as in
    :func:`answer_scores`). A MQuAKE case's entry is its unedited scores instead (:func:`mquake_unedited`)."""
    mq = [c for c in cases if isinstance(c, MQuAKECase)]
    ke = [c for c in cases if isinstance(c, KnowEditCase)]
    out = mquake_unedited(adapter, mq, max_new_tokens, batch_rows, chat) if mq else {}
    out.update(knowedit_unedited(adapter, ke, max_new_tokens, batch_rows, chat) if ke else {})
    plain = [c for c in cases if not isinstance(c, (MQuAKECase, KnowEditCase))]
    if plain:
        got = _greedy_groups(adapter, plain, answer_prompts, ("neighborhood",), max_new_tokens, batch_rows, None, None,
                             chat)
        out.update({c.case_id: g["neighborhood"] for c, g in zip(plain, got)})
    return out


class _Rows:
    """Token sequences and the (position, token) queries on them, for one :func:`position_scores` call.

    A CounterFact prompt is scored for o* and o_c. When the two share the prompt's tokens and one of
    them is a single token, one sequence serves both: the single token is read at the position that
    predicts the other target's first token (a causal model sees the same prefix there).
    """

    def __init__(self, tok):
        self.tok, self.seqs, self.queries = tok, [], []

    def _add(self, ids, queries) -> int:
        self.seqs.append(ids)
        self.queries.append(queries)
        return len(self.seqs) - 1

    def target(self, prompt: str, target: str) -> tuple:
        ids, idx = encode_with_target(self.tok, prompt, target)
        return ("one", self._add(ids, [(j, ids[j]) for j in idx]))

    def pair(self, prompt: str, new: str, true: str) -> tuple:
        (ids_n, idx_n), (ids_t, idx_t) = (encode_with_target(self.tok, prompt, t) for t in (new, true))
        if ids_n[: idx_n[0]] == ids_t[: idx_t[0]] and min(len(idx_n), len(idx_t)) == 1:
            swap = len(idx_t) > 1  # the multi-token target (if any) gets the sequence
            ids, idx, other = (ids_t, idx_t, ids_n[idx_n[0]]) if swap else (ids_n, idx_n, ids_t[idx_t[0]])
            row = self._add(ids, [(j, ids[j]) for j in idx] + [(idx[0], other)])
            return ("shared", row, len(idx), swap)
        return ("two", self._add(ids_n, [(j, ids_n[j]) for j in idx_n]),
                self._add(ids_t, [(j, ids_t[j]) for j in idx_t]))

    @staticmethod
    def new_is_top1(plan, scores) -> bool:
        """Whether o*'s first token is the top-1 prediction (greedy) after the prompt of a planned pair."""
        if plan[0] == "two":
            return bool(scores[plan[1]][1][0])
        hits = scores[plan[1]][1]
        return bool(hits[-1]) if plan[3] else bool(hits[0])  # swapped: o* is the single extra query

    @staticmethod
    def pair_result(plan, scores) -> tuple:
        """``(mean log P(o*), mean log P(o_c))`` of a pair planned by :meth:`pair`."""
        if plan[0] == "two":
            return float(scores[plan[1]][0].mean()), float(scores[plan[2]][0].mean())
        lp = scores[plan[1]][0]
        own, other = float(lp[: plan[2]].mean()), float(lp[plan[2]])
        return (other, own) if plan[3] else (own, other)


def _generation_prompts(case: Case, cfg: GenerationConfig) -> List[str]:
    if isinstance(case, (MQuAKECase, KnowEditCase)):  # no GE: these score answers, not free text about the subject
        return []
    if isinstance(case, ZsRECase):
        return [case.request.text]
    return list(case.generation_prompts[: cfg.max_prompts])


def score_cases(adapter, cases: Sequence[Case], ge: GenerationConfig = GenerationConfig(length=0),
                batch_size: int = 64, models=None, owners: Optional[Sequence[int]] = None,
                unedited: Optional[Dict[int, List[str]]] = None, gen_tokens: int = GEN_TOKENS,
                gen_chat: bool = False) -> List[Dict]:
    """Metrics of each case on the current weights.

    CounterFact: ES/PS/NS, EM/PM/NM per case and the raw ``(log P(o*), log P(o_c))`` pairs per prompt
    (``rewrite_lp``, ``paraphrase_lp``, ``neighborhood_lp``); zsRE: token accuracy of ``alt`` on the
    question (efficacy) and its rephrase (paraphrase), and of ``loc_ans`` on ``loc?`` (specificity).
    All prompts of all cases go through one batched :func:`position_scores` call; GE (if on) samples
    the generation prompts of several cases per batch (``ge.batch_rows``). With ``models`` (a
    :class:`~factedit.row_deltas.RowDeltas`), case ``i`` is scored on edited model ``owners[i]``.
    With ``unedited`` (case id -> the unedited model's neighbourhood answers) and ``gen_tokens`` > 0,
    the generation-based scores too (:func:`answer_scores`; ``gen_chat``: asked through the chat template).
    """
    rows = _Rows(adapter.tokenizer)
    plans, row_owner = [], []
    for i, c in enumerate(cases):
        n0 = len(rows.seqs)
        if isinstance(c, ZsRECase):
            plans.append({name: rows.target(p, t) for name, p, t in (
                ("efficacy", c.request.text, c.request.target_new), ("paraphrase", c.rephrase, c.request.target_new),
                ("specificity", c.loc + "?", c.loc_ans))})
        elif isinstance(c, MQuAKECase):
            plans.append(_mquake_plan(rows, c))
        elif isinstance(c, KnowEditCase):
            plans.append(_knowedit_plan(rows, c))
        else:
            r = c.request
            plans.append({name: [rows.pair(p, r.target_new, r.target_true) for p in ps] for name, ps in (
                ("rewrite", [r.text]), ("paraphrase", c.paraphrase_prompts), ("neighborhood", c.neighborhood_prompts))})
        row_owner += [owners[i] if models is not None else -1] * (len(rows.seqs) - n0)
    # the top-1 tokens only where a locality is read (KnowEdit probes)
    top1 = {"top1": True} if any(isinstance(c, KnowEditCase) for c in cases) else {}
    scores = position_scores(adapter, rows.seqs, rows.queries, batch_size, models, row_owner, **top1)
    out = []
    for c, plan in zip(cases, plans):
        rec: Dict = {}
        if isinstance(c, ZsRECase):
            for name, (_, i) in plan.items():
                hits = scores[i][1].tolist()
                rec[name] = token_accuracy(hits)
                rec[f"{name}_hits"] = [bool(h) for h in hits]
        elif isinstance(c, MQuAKECase):
            rec.update(_mquake_tf(plan, scores))
        elif isinstance(c, KnowEditCase):
            rec.update(_knowedit_tf(plan, scores))
        else:
            for name, pairs in plan.items():
                rec[f"{name}_lp"] = [_Rows.pair_result(p, scores) for p in pairs]
            rec["rewrite_new_top1"] = _Rows.new_is_top1(plan["rewrite"][0], scores)
            rec.update(counterfact_case(rec["rewrite_lp"], rec["paraphrase_lp"], rec["neighborhood_lp"]))
        out.append(rec)
    plain = [i for i, c in enumerate(cases) if not isinstance(c, (MQuAKECase, KnowEditCase))]
    mq = [i for i, c in enumerate(cases) if isinstance(c, MQuAKECase)]
    ke = [i for i, c in enumerate(cases) if isinstance(c, KnowEditCase)]

    def sub(idx):
        return [cases[i] for i in idx], [owners[i] for i in idx] if models is not None else None

    if ge.length > 0 and plain:
        cs, ow = sub(plain)
        for i, g in zip(plain, generation_scores(adapter, cs, ge, models, ow)):
            out[i].update(g)
    if unedited is not None and gen_tokens > 0 and plain:
        cs, ow = sub(plain)
        for i, g in zip(plain, answer_scores(adapter, cs, unedited, gen_tokens, ge.batch_rows, models, ow,
                                             chat=gen_chat)):
            out[i].update(g)
    if mq:
        cs, ow = sub(mq)
        texts = mquake_answers(adapter, cs, gen_tokens, ge.batch_rows, models, ow, gen_chat) if gen_tokens else None
        for k, (i, c) in enumerate(zip(mq, cs)):
            rec = out[i]
            base = (unedited or {}).get(c.case_id)
            if isinstance(base, dict) and texts is None:
                base = {"tf": base.get("tf", [])}  # no generations in this run: the teacher-forced baseline only
            rec.update(mquake_case(rec["edit_lp"], rec["question_lp"], rec["portability_hits"],
                                   texts[k] if texts else None, _mquake_names(c) if texts else None,
                                   _with_hop_names(base, c)))
            if texts:
                rec["gen_texts"] = texts[k]
    if ke:
        cs, ow = sub(ke)
        texts = knowedit_answers(adapter, cs, gen_tokens, ge.batch_rows, models, ow, gen_chat) if gen_tokens else None
        for k, (i, c) in enumerate(zip(ke, cs)):
            rec, base = out[i], (unedited or {}).get(c.case_id) or {}
            before = base.get("locality_top1") or []
            locality = [(p.category, now, b) for p, now, b in zip(c.locality, rec["locality_top1"], before)] \
                if len(before) == len(c.locality) else []
            rec.update(knowedit_case(rec["rewrite_hits"], rec["rephrase_hits"],
                                     [(p.category, h) for p, h in zip(c.portability, rec["portability_hits"])],
                                     locality,
                                     texts[k] if texts else None, _knowedit_names(c) if texts else None,
                                     base.get("locality")))
            if texts:
                rec["gen_texts"] = texts[k]
    return out


# ---------------------------------------------------------------------- MQuAKE
def qa_prompt(question: str) -> str:
    """A question as a base model is asked it (``Question: ...`` then ``Answer:`` on the next line; a chat model
    gets the question alone, as the user's message)."""
    return f"Question: {question.strip()}\nAnswer:"


def _mquake_plan(rows: "_Rows", c: MQuAKECase) -> dict:
    return {"edit": [rows.pair(r.text, r.target_new, r.target_true) for r in c.requests],
            "question": [rows.pair(qa_prompt(q), c.new_answer, c.answer) for q in c.questions],
            "portability": [rows.target(qa_prompt(q), c.new_answer) for q in c.questions]}


def _mquake_tf(plan: dict, scores) -> dict:
    return {"edit_lp": [_Rows.pair_result(p, scores) for p in plan["edit"]],
            "question_lp": [_Rows.pair_result(p, scores) for p in plan["question"]],
            "portability_hits": [[bool(h) for h in scores[i][1].tolist()] for _, i in plan["portability"]]}


def mquake_prompts(case: MQuAKECase, chat: bool = False) -> Dict[str, List[str]]:
    """The prompts a MQuAKE case's answers are read from on the edited model: each edit's cloze (``edits``) and
    question (``edits_q``), the cloze of every hop of the new chain (``hops``), the multi-hop questions
    (``multihop``); and on the unedited model (``base_multihop``, ``base_hops``: the old chain). Questions are
    framed by :func:`qa_prompt` unless ``chat`` (the chat template frames them)."""
    def ask(q: str) -> str:
        return q if chat else qa_prompt(q)

    hops = case.edited_hops()
    return {"edits": [h.cloze for _, h, _ in hops], "edits_q": [ask(h.question) for _, h, _ in hops],
            "hops": [h.cloze for h in case.new_single_hops], "multihop": [ask(q) for q in case.questions],
            "base_multihop": [ask(q) for q in case.questions], "base_hops": [h.cloze for h in case.single_hops]}


def _mquake_names(c: MQuAKECase) -> dict:
    return {"edits": [(h.names, old) for _, h, old in c.edited_hops()], "hops": c.hop_names(),
            "multihop": (c.new_names, c.old_names)}


def _with_hop_names(base: Optional[dict], c: MQuAKECase) -> Optional[dict]:
    if not isinstance(base, dict):
        return None
    return {**base, "hop_names": [h.names for h in c.single_hops]} if "hops" in base else base


def mquake_answers(adapter, cases: Sequence[MQuAKECase], gen_tokens: int = GEN_TOKENS, batch_rows: int = 64,
                   models=None, owners: Optional[Sequence[int]] = None, chat: bool = False
                   ) -> List[Dict[str, List[str]]]:
    """Each case's greedy answers on the (edited) weights: ``edits``, ``edits_q``, ``hops``, ``multihop``."""
    return _greedy_groups(adapter, cases, lambda c: mquake_prompts(c, chat), ("edits", "edits_q", "hops", "multihop"),
                          gen_tokens, batch_rows, models, owners, chat)


@torch.no_grad()
def mquake_unedited(adapter, cases: Sequence[MQuAKECase], gen_tokens: int = GEN_TOKENS, batch_rows: int = 64,
                    chat: bool = False, batch_size: int = 64) -> Dict[int, dict]:
    """The unedited model's side of each MQuAKE case (call before editing): ``tf`` the question pairs
    (log P(new answer), log P(old answer)), and with ``gen_tokens`` its answers to the questions (``multihop``)
    and to the old chain's hops (``hops``)."""
    rows = _Rows(adapter.tokenizer)
    plans = [[rows.pair(qa_prompt(q), c.new_answer, c.answer) for q in c.questions] for c in cases]
    scores = position_scores(adapter, rows.seqs, rows.queries, batch_size)
    out = {c.case_id: {"tf": [list(_Rows.pair_result(p, scores)) for p in plan]} for c, plan in zip(cases, plans)}
    if gen_tokens:
        for c, got in zip(cases, _greedy_groups(adapter, cases, lambda c: mquake_prompts(c, chat),
                                                ("base_multihop", "base_hops"), gen_tokens, batch_rows, None, None,
                                                chat)):
            out[c.case_id].update(multihop=got["base_multihop"], hops=got["base_hops"])
    return out


def generation_scores(adapter, cases: Sequence[Case], ge: GenerationConfig, models=None,
                      owners: Optional[Sequence[int]] = None) -> List[Dict]:
    """``{"GE", "generations"}`` of each case: its generation prompts sampled (``ge.batch_rows``
    prompts of several cases per batch, each case with its own generator), optionally case ``i`` on
    edited model ``owners[i]`` of ``models``."""
    out: List[Dict] = [{} for _ in cases]
    for part in _ge_batches([_generation_prompts(c, ge) for c in cases], ge.batch_rows):
        texts = sample_text_groups(adapter, [(_generation_prompts(cases[i], ge), ge.seed + cases[i].case_id)
                                             for i in part], ge.length, ge.top_k, models,
                                   [owners[i] for i in part] if models is not None else None)
        for i, t in zip(part, texts):
            out[i] = {"GE": text_entropy(t), "generations": t[:2]}
    return out


def _ge_batches(prompts: Sequence[Sequence[str]], max_rows: int) -> List[List[int]]:
    """Consecutive cases whose generation prompts add up to at most ``max_rows`` (a case is never split)."""
    parts: List[List[int]] = []
    rows = 0
    for i, p in enumerate(prompts):
        if parts and rows + len(p) <= max(max_rows, 1):
            parts[-1].append(i)
            rows += len(p)
        else:
            parts.append([i])
            rows = len(p)
    return parts



# ---------------------------------------------------------------------- KnowEdit (portability, locality)
def _knowedit_plan(rows: "_Rows", c: KnowEditCase) -> dict:
    r = c.request
    return {"rewrite": rows.target(r.text, r.target_new),
            "rephrase": [rows.target(p, r.target_new) for p in c.rephrase],
            "portability": [rows.target(p.prompt, p.answers[0]) for p in c.portability],
            "locality": [rows.target(p.prompt, p.answers[0]) for p in c.locality]}


def _knowedit_tf(plan: dict, scores) -> dict:
    def hits(i):
        return [bool(h) for h in scores[i][1].tolist()]

    return {"rewrite_hits": hits(plan["rewrite"][1]), "rephrase_hits": [hits(i) for _, i in plan["rephrase"]],
            "portability_hits": [hits(i) for _, i in plan["portability"]],
            "locality_top1": [scores[i][2].tolist() for _, i in plan["locality"]]}


def knowedit_prompts(case: KnowEditCase) -> Dict[str, List[str]]:
    """The prompts a KnowEdit case's greedy answers are read from: its edit's prompt, its portability and locality
    probes (the locality ones also on the unedited model)."""
    return {"rewrite": [case.request.text] if case.request is not None else [], "rephrase": list(case.rephrase),
            "portability": [p.prompt for p in case.portability], "locality": [p.prompt for p in case.locality]}


def _knowedit_names(c: KnowEditCase) -> dict:
    true = (c.request.target_true,) if c.request.target_true else ()
    return {"rewrite": ((c.request.target_new,), true), "portability": [p.answers for p in c.portability]}


def knowedit_answers(adapter, cases: Sequence[KnowEditCase], gen_tokens: int = GEN_TOKENS, batch_rows: int = 64,
                     models=None, owners: Optional[Sequence[int]] = None, chat: bool = False
                     ) -> List[Dict[str, List[str]]]:
    """Each case's greedy answers on the (edited) weights: ``rewrite``, ``rephrase``, ``portability``, ``locality``."""
    return _greedy_groups(adapter, cases, knowedit_prompts, ("rewrite", "rephrase", "portability", "locality"),
                          gen_tokens, batch_rows, models, owners, chat)


@torch.no_grad()
def knowedit_unedited(adapter, cases: Sequence[KnowEditCase], gen_tokens: int = GEN_TOKENS, batch_rows: int = 64,
                      chat: bool = False, batch_size: int = 64) -> Dict[int, dict]:
    """The unedited model's side of each KnowEdit case (call before editing): ``locality_top1`` its top-1 tokens
    over each locality probe's answer (teacher-forced), and with ``gen_tokens`` its answers to those probes."""
    rows = _Rows(adapter.tokenizer)
    plans = [[rows.target(p.prompt, p.answers[0]) for p in c.locality] for c in cases]
    scores = position_scores(adapter, rows.seqs, rows.queries, batch_size, top1=True)
    out = {c.case_id: {"locality_top1": [scores[i][2].tolist() for _, i in plan]} for c, plan in zip(cases, plans)}
    if gen_tokens:
        for c, got in zip(cases, _greedy_groups(adapter, cases, knowedit_prompts, ("locality",), gen_tokens,
                                                batch_rows, None, None, chat)):
            out[c.case_id]["locality"] = got["locality"]
    return out
