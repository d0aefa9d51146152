"""The evaluation harness: datasets, metrics, batched scoring, downstream tasks, resumable runs,
summaries (``factedit eval`` / ``factedit summarize``). See ``docs/EVALUATION.md``.

    from factedit.evaluation import EvalConfig, run_eval
    summary = run_eval(editor, EvalConfig(method="r-rome", dataset="counterfact_knowedit.jsonl", limit=200), "runs/r")
"""

from .ability import AbilityConfig, fact_recall, perplexity
from .datasets import CounterFactCase, DatasetError, ZsRECase, load_cases, resolve_dataset
from .downstream import DownstreamConfig, evaluate_tasks, load_tasks
from .runner import BASELINE, EvalConfig, run_eval
from .score_model import GenerationConfig, score_cases
from .store import RunError

__all__ = ["CounterFactCase", "ZsRECase", "DatasetError", "load_cases", "resolve_dataset",
           "DownstreamConfig", "evaluate_tasks", "load_tasks", "EvalConfig", "run_eval", "BASELINE",
           "GenerationConfig", "score_cases", "RunError", "AbilityConfig", "perplexity", "fact_recall"]
