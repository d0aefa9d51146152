"""General ability during sequential editing: SST-2, MRPC, CoLA, RTE, NLI and MMLU subsets,
few-shot prompts, the label with the highest log-probability wins.

    tasks = load_tasks("../shared/data/downstream", DownstreamConfig(n=100, shots=3))
    evaluate_tasks(adapter, tasks)          # {"sst2": 0.71, ..., "mean": 0.55}

Each task file is JSONL. Demonstrations come from the end of the file, evaluated examples from
its start; both are picked round-robin over the classes, so a subset is class-balanced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.batching import pad_id, pad_rows
from ..core.errors import RequestError
from ..core.kv import cache_of
from ..core.kv import past as past_kv
from ..core.lm import target_token_scores
from ..core.request_files import read_records
from ..core.tokens import encode_with_target
from .datasets import DatasetError

#: share a common token prefix through the KV cache only from this length on
MIN_SHARED_PREFIX = 8

__all__ = ["TaskSpec", "TASKS", "DownstreamConfig", "Task", "load_task", "load_tasks", "task_prompts",
           "label_logprobs", "evaluate_task", "evaluate_tasks"]


def _s(rec: dict, name: str, where: str) -> str:
    v = rec.get(name)
    if not isinstance(v, str) or not v.strip():
        raise DatasetError(f"{where}: field {name!r} must be a non-empty string")
    return v.strip()


def _int_label(n: int) -> Callable[[dict, str], int]:
    def label(rec: dict, where: str) -> int:
        v = rec.get("label")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise DatasetError(f"{where}: field 'label' must be an integer 0..{n - 1}, got {v!r}")
        return v
    return label


def _nli_label(rec: dict, where: str) -> int:
    v = rec.get("label")
    if v not in ("entailment", "not_entailment", 0, 1):
        raise DatasetError(f"{where}: field 'label' must be 'entailment' or 'not_entailment', got {v!r}")
    return 0 if v in ("entailment", 0) else 1


def _mmlu_label(rec: dict, where: str) -> int:
    v, choices = rec.get("answer"), rec.get("choices")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise DatasetError(f"{where}: field 'choices' must be a list of 4 strings")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 4:
        raise DatasetError(f"{where}: field 'answer' must be an integer 0..3, got {v!r}")
    return v


def _pair(question: str) -> Callable[[dict, str], str]:
    return lambda r, w: (f"Sentence 1: {_s(r, 'sentence1', w)}\nSentence 2: {_s(r, 'sentence2', w)}\n"
                         f"Question: {question}\nAnswer:")


def _entail(r: dict, w: str) -> str:
    return f"{_s(r, 'sentence1', w)}\nQuestion: Does this imply that \"{_s(r, 'sentence2', w)}\"? Yes or No?\nAnswer:"


def _mmlu(r: dict, w: str) -> str:
    opts = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(r["choices"]))
    return f"Question: {_s(r, 'question', w)}\n{opts}\nAnswer:"


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: how to render an example (up to ``Answer:``), its label words and label."""

    name: str
    labels: Tuple[str, ...]
    render: Callable[[dict, str], str]
    label_of: Callable[[dict, str], int]


TASKS: Dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("sst2", ("negative", "positive"),
             lambda r, w: f"Review: {_s(r, 'sentence', w)}\nSentiment:", _int_label(2)),
    TaskSpec("mrpc", ("No", "Yes"), _pair("Do both sentences mean the same thing?"), _int_label(2)),
    TaskSpec("cola", ("No", "Yes"),
             lambda r, w: f"Sentence: {_s(r, 'sentence', w)}\nQuestion: Is this sentence grammatical?\nAnswer:",
             _int_label(2)),
    TaskSpec("rte", ("Yes", "No"), _entail, _int_label(2)),  # GLUE RTE: 0 = entailment
    TaskSpec("nli", ("Yes", "No"), _entail, _nli_label),
    TaskSpec("mmlu", ("A", "B", "C", "D"), _mmlu, _mmlu_label),
)}


@dataclass(frozen=True)
class DownstreamConfig:
    """Downstream evaluation settings.

    Attributes:
        tasks: task names (files ``<name>.jsonl`` in the data directory).
        n: evaluated examples per task (class-balanced).
        shots: demonstrations in each prompt (one per class in turn).
        batch_size: prompts per forward pass.
    """

    tasks: Tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
    n: int = 100
    shots: int = 3
    batch_size: int = 16


@dataclass(frozen=True)
class Task:
    """A loaded task: rendered demonstrations and examples with their labels."""

    spec: TaskSpec
    demos: Tuple[Tuple[str, int], ...]
    examples: Tuple[Tuple[str, int], ...]


def _round_robin(items: Sequence[Tuple[str, int]], n: int, n_classes: int) -> List[int]:
    """Indices of up to ``n`` items taken in order, cycling through the classes."""
    queues = {c: [i for i, (_, l) in enumerate(items) if l == c] for c in range(n_classes)}
    out: List[int] = []
    while len(out) < n and any(queues.values()):
        for c in range(n_classes):
            if queues[c] and len(out) < n:
                out.append(queues[c].pop(0))
    return out


def load_task(directory, name: str, n: int = 100, shots: int = 3) -> Task:
    """Task ``name`` from ``directory/<name>.jsonl``: ``shots`` demos (from the end), ``n`` examples."""
    if name not in TASKS:
        raise DatasetError(f"unknown downstream task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    path = Path(directory) / f"{name}.jsonl"
    try:
        records = read_records(path)
    except RequestError as e:
        raise DatasetError(f"downstream task {name}: {e}") from None
    items = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        items.append((spec.render(rec, where), spec.label_of(rec, where)))
    k = len(spec.labels)
    demo_idx = [len(items) - 1 - i for i in _round_robin(items[::-1], shots, k)]
    taken = set(demo_idx)
    rest = [it for i, it in enumerate(items) if i not in taken]
    ex_idx = _round_robin(rest, n, k)
    if len(ex_idx) < n:
        raise DatasetError(f"{path}: only {len(ex_idx)} examples left after {shots} demonstrations, {n} asked")
    return Task(spec, tuple(items[i] for i in demo_idx), tuple(rest[i] for i in ex_idx))


def load_tasks(directory, cfg: DownstreamConfig = DownstreamConfig()) -> List[Task]:
    return [load_task(directory, t, cfg.n, cfg.shots) for t in cfg.tasks]


def _demo_prefix(task: Task) -> str:
    return "".join(f"{text} {task.spec.labels[label]}\n\n" for text, label in task.demos)


def task_prompts(task: Task) -> List[str]:
    """Few-shot prompts: each demo followed by its label word, then the example up to ``Answer:``."""
    prefix = _demo_prefix(task)
    return [prefix + text for text, _ in task.examples]


@torch.no_grad()
def _last_logprobs(adapter, rows: Sequence[List[int]], prefix_ids: List[int], batch_size: int) -> List[torch.Tensor]:
    """Log-softmax at the last token of ``prefix_ids + row`` for each row; the prefix runs once and its
    KV cache is shared by every batch."""
    import copy

    dev = adapter.input_device
    pad = pad_id(adapter.tokenizer)
    cache = None
    if prefix_ids:
        cache = cache_of(adapter.body(input_ids=torch.tensor([prefix_ids], device=dev), use_cache=True))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: List[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    for b in range(0, len(order), batch_size):
        chunk = order[b: b + batch_size]
        batch = pad_rows([rows[i] for i in chunk], pad, device=dev)
        mask, kw = batch.attention_mask, {}
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(chunk))
            kw = past_kv(adapter.body, past)
            mask = torch.cat([torch.ones(len(chunk), len(prefix_ids), dtype=torch.long, device=dev), mask], dim=1)
        hidden = adapter.body(input_ids=batch.input_ids, attention_mask=mask, **kw).last_hidden_state
        h = hidden[torch.arange(len(chunk), device=hidden.device), batch.last_index.to(hidden.device)]
        logp = F.log_softmax(adapter.logits(h).float(), dim=-1).cpu()
        for r, i in enumerate(chunk):
            out[i] = logp[r]
    return out


def _common_prefix(rows: Sequence[List[int]]) -> int:
    """Length of the longest common prefix of token lists."""
    n = min(len(r) for r in rows)
    first = rows[0]
    for other in rows[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


@torch.no_grad()
def label_logprobs(adapter, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """``(n_prompts, n_labels)`` summed log-probabilities of each space-prefixed label after each prompt.

    When every label is one token that extends the prompt's own tokens, a prompt costs one forward
    (logits at its last position), and the tokens all such prompts start with (the demonstrations) are
    run once and shared through the KV cache. Otherwise the labels are teacher-forced.
    """
    tok = adapter.tokenizer
    out = torch.empty(len(prompts), len(labels))
    fast, slow = [], []
    for i, p in enumerate(prompts):
        base = list(tok(p)["input_ids"])
        toks = []
        for lab in labels:
            ids, idx = encode_with_target(tok, p, lab)
            if len(idx) != 1 or ids[: idx[0]] != base:
                toks = None
                break
            toks.append(ids[idx[0]])
        (fast if toks else slow).append((i, base, toks))
    if fast:
        rows = [base for _, base, _ in fast]
        cut = min(_common_prefix(rows), min(len(r) for r in rows) - 1)
        cut = cut if cut >= MIN_SHARED_PREFIX else 0
        logps = _last_logprobs(adapter, [r[cut:] for r in rows], rows[0][:cut], batch_size)
        for (i, _, toks), lp in zip(fast, logps):
            out[i] = lp[toks]
    if slow:
        rows2 = [(i, j) for i, _, _ in slow for j in range(len(labels))]
        scores = target_token_scores(adapter, [prompts[i] for i, _ in rows2], [labels[j] for _, j in rows2], batch_size)
        for (i, j), (lp, _) in zip(rows2, scores):
            out[i, j] = float(lp.sum())
    return out


def evaluate_task(adapter, task: Task, batch_size: int = 16) -> Dict:
    """Accuracy of the arg-max label on the task's examples, and the predictions."""
    scores = label_logprobs(adapter, task_prompts(task), task.spec.labels, batch_size)
    pred = scores.argmax(dim=1).tolist()
    gold = [label for _, label in task.examples]
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold), "predictions": pred}


def evaluate_tasks(adapter, tasks: Sequence[Task], batch_size: int = 16) -> Dict[str, float]:
    """Accuracy per task and their mean."""
    acc = {t.spec.name: evaluate_task(adapter, t, batch_size)["accuracy"] for t in tasks}
    acc["mean"] = sum(acc.values()) / len(acc) if acc else 0.0
    return acc
