"""The evaluation loop: edit, score, revert (or keep, ``sequential``), record; resumable.

    cfg = EvalConfig(method="r-rome", dataset="../shared/data/counterfact/counterfact_knowedit.jsonl", limit=200)
    summary = run_eval(editor, cfg, "runs/r-rome")

Cases are edited in groups of ``cases_per_edit`` (ROME variants: 1) from the original weights and
reverted after scoring; with ``sequential`` the edits accumulate, each one is saved as a patch,
and every ``downstream_every`` edits the downstream tasks and the scores of all earlier edits are
measured. The collapse guard is off unless ``guard`` (raw method behaviour is what is measured).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.errors import FactEditError, RequestError
from ..core.requests import same_prompt_message
from ..core.timing import PeakWindow
from ..edit.guard import CollapseError, GuardConfig
from ..edit.methods.options import MethodOptions
from ..edit.methods.registry import METHODS, REGISTRY, config_from_dict, method_spec
from ..edit.verify import outcome as verify_outcome
from ..edit.wear import cumulative_wear
from .ability import Ability, AbilityConfig
from .datasets import Case, load_cases, resolve_dataset, sha256_of
from .downstream import DownstreamConfig, evaluate_tasks, load_tasks
from .score_model import GEN_TOKENS, GenerationConfig, generation_scores, score_cases, unedited_answers
from .scoring import normalized_delta_norm, summarize_records
from .store import RunError, RunStore

__all__ = ["EvalConfig", "run_eval", "BASELINE", "mode_text"]

log = logging.getLogger(__name__)

#: the method name of the unedited model's row
BASELINE = "none"
#: rewrite summary.json during a run at most this often (and at checkpoints and the end)
SUMMARY_EVERY_S = 30.0


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        method: editing method, or ``"none"`` for the unedited baseline.
        dataset: path or URL of a CounterFact / zsRE file (layout auto-detected).
        dataset_sha256: expected SHA-256 of the dataset file (checked when given).
        limit, offset: evaluate records ``offset .. offset+limit``.
        cases_per_edit: cases edited in one call (batch methods; ROME variants edit one case at a time).
        sequential: keep every edit (no revert): the model accumulates them.
        downstream_dir: directory of the downstream task files (sequential runs).
        downstream_every: measure downstream tasks and earlier edits every this many edits.
        retention_sample: at those checkpoints re-score at most this many of the earlier edits, evenly
            spaced in edit order (the first and the latest included; :func:`retention_cases`); 0 (default):
            all of them. Re-scoring every earlier edit costs O(n²) over a run: 5,500 case scorings for 1,000
            edits checked every 100 (0.3–0.8 s each with both score families on a 2-core CPU).
        checkpoints: sequential runs: measure (as ``downstream_every`` does) when the number of edits reaches each
            of these counts (and at the end), instead of every ``downstream_every`` edits.
        score_every: sequential runs: score only every ``score_every``-th group right after its edit (groups 0, k,
            2k, ...); the others are edited, verified and committed with ``"scored": false`` records. Their
            checkpoints then re-score a fixed sample: the scored cases, ``retention_sample`` of them evenly spaced
            over the whole run (those edited so far), the same cases at every checkpoint.
        score_sample: score at most this many cases of each edit right after it (a batch of thousands of requests:
            scoring them all would take hours), evenly spaced in the group, first and last included; the others are
            edited, verified and recorded with ``"scored": false``; 0 (default): all. Checkpoints then re-score
            only cases that were scored right after their edit.
        stop_ppl, stop_recall: sequential runs with checkpoints: stop (the model collapsed) at the first checkpoint
            whose perplexity exceeds ``stop_ppl`` × the unedited model's, or whose known-fact recall falls below
            ``stop_recall`` (a fraction of the unedited model's); the run records why and ends there (a rerun does
            not continue it).
        downstream: settings of the downstream tasks (examples per task, shots).
        generation: GE settings (``length`` 0 disables GE).
        score_batch: rows per forward pass when scoring.
        chunk: single-edit runs (not sequential, guard off) edit this many cases (whole groups), each
            from the original weights, and score them together: case ``i`` runs on W + Δ_i through
            :class:`~factedit.row_deltas.RowDeltas` (the weights are never written), so the scoring
            and the GE generations of many edits share their forward passes. Sequential runs apply
            and score (ES/PS/NS) each edit at once, and sample the GE texts of up to this many
            consecutive edits together (each on the weights right after its edit: the later edits'
            deltas are subtracted per row), committing them together; a downstream checkpoint or
            the end of the run flushes earlier.
        prefetch_batch: ROME variants in single-edit runs optimise the δ of this many cases of a chunk
            together (:meth:`Editor.prefetch_targets`; independent per case). 1 (default): one at a
            time — on a 2-core CPU a batch of 8 took 11.1 s per case against 9.95 s alone (the work
            is compute-bound there and padding adds to it); batching is for accelerators, where
            per-forward overhead dominates.
        guard: run the collapse guard (off: measure the method as it is).
        verify: retry edits that do not take on their own prompt within the retry budget
            (:meth:`Editor.edit`'s ``verify``; off: the raw method). Every case records its
            verification outcome either way (``verified``, ``verification``).
        method_options: the method's options as ``(name, value)`` pairs
            (:meth:`MethodOptions.to_pairs <factedit.edit.methods.options.MethodOptions.to_pairs>`; :attr:`options`).
    """

    method: str = "r-rome"
    dataset: str = ""
    dataset_sha256: Optional[str] = None
    limit: Optional[int] = None
    offset: int = 0
    cases_per_edit: int = 1
    sequential: bool = False
    downstream_dir: Optional[str] = None
    downstream_every: Optional[int] = None
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    retention_sample: int = 0
    checkpoints: Tuple[int, ...] = ()
    score_every: int = 1
    score_sample: int = 0
    stop_ppl: Optional[float] = None
    stop_recall: Optional[float] = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ability: AbilityConfig = field(default_factory=AbilityConfig)
    score_batch: int = 64
    gen_tokens: int = GEN_TOKENS
    gen_chat: bool = False
    chunk: int = 25
    prefetch_batch: int = 1
    guard: bool = False
    verify: bool = False
    method_options: Tuple[Tuple[str, object], ...] = ()

    def check(self) -> None:
        """Refuse inconsistent settings before any work."""
        if self.method != BASELINE and self.method not in METHODS:
            raise RunError(f"unknown method {self.method!r}; available: {BASELINE}, {', '.join(METHODS)}")
        if self.cases_per_edit < 1:
            raise RunError("--cases-per-edit must be >= 1")
        if not isinstance(self.gen_tokens, int) or self.gen_tokens < 0:
            raise RunError(f"--gen-tokens must be a whole number >= 0, got {self.gen_tokens!r}")
        if self.chunk < 1 or self.prefetch_batch < 1:
            raise RunError("--chunk and --target-batch must be >= 1")
        if self.cases_per_edit > 1 and (self.method == BASELINE or method_spec(self.method).single_request):
            batch = ", ".join(n for n, s in REGISTRY.items() if not s.single_request)
            raise RunError(f"{self.method} edits one case at a time; --cases-per-edit is for {batch}")
        if self.sequential and self.method == BASELINE:
            raise RunError("--sequential needs an editing method (the baseline makes no edits)")
        if self.downstream_every is not None and self.downstream_every < 1:
            raise RunError("--downstream-every must be >= 1")
        if self.downstream_every is not None and self.checkpoints:
            raise RunError("give either --downstream-every K or --checkpoints N1,N2,..., not both")
        if self.checkpoints and (any(not isinstance(n, int) or n < 1 for n in self.checkpoints)
                                 or list(self.checkpoints) != sorted(set(self.checkpoints))):
            raise RunError(f"--checkpoints must be increasing edit counts >= 1, got {list(self.checkpoints)}")
        if self.measures:
            flag = "--downstream-every" if self.downstream_every is not None else "--checkpoints"
            if not self.sequential:
                raise RunError(f"{flag} needs --sequential")
            if not self.downstream_dir and not self.ability.enabled:
                raise RunError(f"{flag} needs something to measure: --downstream DIR (the task files), "
                               "--ppl-corpus FILE or --knowns FILE")
        if not isinstance(self.score_every, int) or self.score_every < 1:
            raise RunError(f"--score-every must be a whole number >= 1, got {self.score_every!r}")
        if not isinstance(self.score_sample, int) or self.score_sample < 0 or self.score_sample == 1:
            raise RunError(f"--score-sample must be 0 (every case) or a whole number >= 2 (the first and the last "
                           f"case of each edit included), got {self.score_sample!r}")
        if self.score_sample and self.score_sample >= self.cases_per_edit:
            raise RunError(f"--score-sample {self.score_sample} samples the cases of each edit: it needs "
                           f"--cases-per-edit above it (got {self.cases_per_edit})")
        if self.score_every > 1 and not self.sequential:
            raise RunError("--score-every is for --sequential runs (a single-edit run scores every case)")
        for name, value, what, need in (("--stop-ppl", self.stop_ppl, "a ratio > 1", self.ability.ppl_corpus),
                                        ("--stop-recall", self.stop_recall, "a fraction in (0, 1)",
                                         self.ability.knowns)):
            if value is None:
                continue
            if not (value > 1 if name == "--stop-ppl" else 0 < value < 1):
                raise RunError(f"{name} must be {what}, got {value!r}")
            if not self.measures or not need:
                raise RunError(f"{name} needs checkpoints (--checkpoints or --downstream-every) and "
                               + ("--ppl-corpus FILE" if name == "--stop-ppl" else "--knowns FILE"))
        if not isinstance(self.retention_sample, int) or self.retention_sample < 0:
            raise RunError(f"--retention-sample must be a whole number >= 0, got {self.retention_sample!r}")
        if self.retention_sample == 1:
            raise RunError("--retention-sample 1 cannot hold the first and the latest edit; use 0 (all) or >= 2")
        if self.retention_sample and not self.measures:
            raise RunError("--retention-sample needs checkpoints (--downstream-every or --checkpoints; it samples "
                           "their re-scoring)")
        self.ability.check()

    @property
    def measures(self) -> bool:
        """Whether the run has checkpoints (``downstream_every`` or ``checkpoints``)."""
        return bool(self.downstream_every or self.checkpoints)

    def check_data(self, n_cases: int) -> None:
        """Refuse checkpoints, and edits of more cases, beyond the data (``n_cases`` selected cases)."""
        beyond = [n for n in self.checkpoints if n > n_cases]
        if beyond:
            raise RunError(f"--checkpoints {beyond[0]} is beyond the data: the run has {n_cases} cases")
        if self.cases_per_edit > n_cases:
            raise RunError(f"--cases-per-edit {self.cases_per_edit} is larger than the data: the run has {n_cases} "
                           f"cases (a batch of all of them is --cases-per-edit {n_cases})")

    @property
    def mode(self) -> str:
        """The run's mode in one line: whether cases start from the original weights or accumulate, and how many
        are edited in one call (what the summary, ``--json`` and the page state)."""
        return mode_text(self.sequential, self.cases_per_edit)

    @property
    def options(self) -> MethodOptions:
        """The method options (:attr:`method_options` read back)."""
        return MethodOptions.from_pairs(self.method, self.method_options)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["method_options"] = {k: v for k, v in self.method_options}
        return d


def mode_text(sequential: bool, cases_per_edit: int) -> str:
    """``"each case edited alone on the original weights"`` ... (see :attr:`EvalConfig.mode`)."""
    n = int(cases_per_edit or 1)
    if not sequential:
        return ("each case edited alone on the original weights (reverted after scoring)" if n == 1 else
                f"cases edited in batches of {n}, each batch on the original weights (reverted after scoring)")
    return ("cases edited one by one, accumulated: each on the weights the earlier edits left" if n == 1 else
            f"cases edited in batches of {n}, accumulated: each batch on the weights the earlier ones left")


#: options added after runs were written, at the value those runs had (a resume then still matches)
OPTION_DEFAULTS = {"gen_chat": False, "retention_sample": 0, "checkpoints": [], "score_every": 1, "stop_ppl": None,
                   "stop_recall": None, "score_sample": 0}
#: options renamed since runs were written: old name -> today's
RENAMED = {"batch_size": "cases_per_edit"}


def upgrade_compare(old: dict) -> dict:
    """A run's recorded configuration in today's terms: renamed options (:data:`RENAMED`) and the method's
    config as this version writes it (fields renamed or dropped since read back, new fields at their
    defaults), so that a run written by an earlier version still resumes."""
    out = {RENAMED.get(k, k): v for k, v in old.items()}
    method, mc = out.get("method"), out.get("method_config")
    if isinstance(mc, dict) and method in REGISTRY:
        from ..edit.methods.options import to_jsonable

        out["method_config"] = json.loads(json.dumps(to_jsonable(config_from_dict(method, mc)), default=str))
    return out


def retention_cases(earlier: List[Case], n: int) -> List[Case]:
    """``n`` of ``earlier`` (cases in edit order) evenly spaced, the first and the last included; all
    of them when ``n`` is 0 or not smaller. Deterministic: the same edits give the same sample."""
    if not n or len(earlier) <= n:
        return list(earlier)
    step = (len(earlier) - 1) / (n - 1)
    return [earlier[round(i * step)] for i in range(n)]


def _group_scored(cfg: "EvalConfig", g: int) -> bool:
    """Whether group ``g`` is scored right after its edit (every group unless ``score_every`` > 1)."""
    return not cfg.sequential or g % cfg.score_every == 0


def _sampled(cfg: "EvalConfig", group: List[Case]) -> List[Case]:
    """The cases of ``group`` scored right after its edit: all that can be edited, or ``score_sample`` of them
    evenly spaced (first and last included)."""
    return retention_cases([c for c in group if not _problem(c)], cfg.score_sample)


def _groups(cases: Sequence[Case], size: int) -> List[List[Case]]:
    return [list(cases[i: i + size]) for i in range(0, len(cases), size)]


class _LeftOut:
    """A case its batch cannot hold: one of its requests asks the prompt of an earlier request of the batch again,
    and a batch method writes one answer per prompt. It is recorded like a case that cannot be edited: a failed
    edit, in every score (CounterFact repeats a few prompts with other answers: 2 in its first 1,000 records, 78 in
    10,000)."""

    requests = ()

    def __init__(self, case, problem: str):
        self._case, self.problem = case, problem

    @property
    def asked(self) -> tuple:
        """The requests the case asked for (none of which it makes)."""
        return self._case.requests

    def __getattr__(self, name):
        return getattr(self._case, name)


def _one_answer_per_prompt(group: List[Case]) -> List[Case]:
    """``group`` with every case that asks again a prompt which an earlier kept case (or the case itself) asks
    left out (:class:`_LeftOut`)."""
    held: Dict[tuple, tuple] = {}  # (prompt, subject) -> (the request asking it, its case's id)
    out = []
    for c in group:
        mine: Dict[tuple, tuple] = {}
        clash = None
        for r in c.requests:
            key = (r.prompt, r.subject)
            if key in held or key in mine:
                clash = (*(held.get(key) or mine[key]), r)
                break
            mine[key] = (r, c.case_id)
        if clash is None:
            held.update(mine)
            out.append(c)
        else:
            first, first_id, r = clash
            out.append(_LeftOut(c, f"{same_prompt_message(first, r)}; case {first_id} asks it first, and a batch "
                                   "writes one answer per prompt"))
    return out


def _config(editor, cfg: EvalConfig, dataset_path) -> Tuple[dict, dict, object]:
    from ..core.fingerprints import model_fingerprint
    from ..core.models import model_name
    from ..core.version import __version__
    from ..edit.methods.options import to_jsonable

    method_cfg = None if cfg.method == BASELINE else editor.make_config(cfg.options)
    compare = {**cfg.to_dict(), "model_fingerprint": model_fingerprint(editor.model),
               "prompt_prefix": editor.adapter.prompt_prefix,
               "dataset_sha256_actual": sha256_of(dataset_path),
               "method_config": to_jsonable(method_cfg) if method_cfg is not None else None}
    compare = json.loads(json.dumps(compare, default=str))  # as it reads back from config.json
    config = {"factedit_version": __version__, "model": model_name(editor.model), "dataset_path": str(dataset_path),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return config, compare, method_cfg


def run_eval(editor, cfg: EvalConfig, out_dir, on_group: Optional[Callable[[int, int], None]] = None,
             world=None) -> dict:
    """Run (or continue) an evaluation into ``out_dir``; returns the summary (also in ``summary.json``).

    Sequential runs leave their edits applied (``editor.history``); other runs leave the weights as
    they found them.

    ``world`` (a :class:`~factedit.core.distributed.World` of torchrun processes): the groups are shared out
    round-robin; rank ``r`` runs its own resumable run in ``out_dir/rank{r}`` and rank 0 then merges every
    rank's per-case records into ``out_dir`` (``cases.jsonl``, ``unedited.json``, ``summary.json``), the
    files one process writes. All ranks must agree on the configuration (checked before anything is
    written). Sequential runs cannot be split.
    """
    cfg.check()
    if editor.history:
        raise RunError("the editor already holds edits; evaluate from the model's original weights")
    if cfg.gen_chat and cfg.gen_tokens:
        from ..core.chat import has_chat_template

        if not has_chat_template(editor.tokenizer):
            raise RunError("--chat: this model's tokenizer has no chat template; evaluate without --chat")
    split = world is not None and world.distributed
    if split and cfg.sequential:
        raise RunError("a sequential run applies its edits one after another to one model, so it cannot be shared "
                       "between torchrun ranks; run it in one process")
    path = resolve_dataset(cfg.dataset, cfg.dataset_sha256)
    cases = load_cases(path, cfg.limit, cfg.offset)
    cfg.check_data(len(cases))
    config, compare, method_cfg = _config(editor, cfg, path)
    if split:
        world.agree("evaluation configuration (options, model fingerprint, dataset)",
                    json.dumps(compare, sort_keys=True))
        if world.main:  # the merged directory must not hold another run
            merged = RunStore(out_dir)
            merged.extend_limit(compare, OPTION_DEFAULTS, upgrade_compare, cfg.cases_per_edit)
            merged.check_or_write_config({**config, "world_size": world.size}, compare, OPTION_DEFAULTS,
                                         upgrade_compare)
        world.barrier()
    store = RunStore(Path(out_dir) / f"rank{world.rank}" if split else out_dir)
    _warm_up(editor, method_cfg)
    if method_cfg is not None:  # the statistics actually used (corpus, how it was chosen, tokens)
        config["statistics"] = editor.caches.sources(method_cfg)
    extended = store.extend_limit(compare, OPTION_DEFAULTS, upgrade_compare, cfg.cases_per_edit)
    if extended:
        log.info("%s: extended from %s to %s cases", store.dir, *extended)
    store.check_or_write_config(config, compare, OPTION_DEFAULTS, upgrade_compare)
    groups = _groups(cases, cfg.cases_per_edit)
    if cfg.method != BASELINE and method_spec(cfg.method).distinct_prompts:
        groups = [_one_answer_per_prompt(g) for g in groups]
    mine = [g for g in range(len(groups)) if not split or world.owns(g)]
    # the cases ever scored (right after their edit; the checkpoints re-score only those): the unedited side of
    # the others is never read
    mine_cases = [c for g in mine if _group_scored(cfg, g) for c in _sampled(cfg, groups[g])]
    probes = any(c.kind in ("mquake", "knowedit", "qaedit") for c in cases)  # their unedited side is teacher-forced too
    unedited = _unedited(editor, store, mine_cases, cfg) if cfg.gen_tokens or probes else None  # before any edit
    ability = Ability(editor.adapter, cfg.ability) if cfg.measures and cfg.ability.enabled else None
    state = _resume(editor, store, cfg, groups)
    tasks = load_tasks(cfg.downstream_dir, cfg.downstream) if cfg.measures and cfg.downstream_dir else []
    run = _Run(editor, cfg, store, method_cfg, groups, tasks, *state, unedited=unedited, ability=ability)
    run.checkpoint()
    todo = [] if run.stopped else [g for g in mine if g not in run.done]  # a stopped run has ended
    # each edit applied for real, one after another; and where a single-request method must make several edits
    # of one group one on the weights the others left (the chunked path computes each group from the originals)
    several = method_cfg is not None and method_spec(cfg.method).single_request and any(
        len(_requests(g)) > 1 for g in groups)
    applied = cfg.sequential or cfg.guard or cfg.verify or several
    for part in ([[g] for g in todo] if applied else _chunks(todo, groups, cfg.chunk)):
        if applied:
            run.one_group(part[0], groups[part[0]])
        else:
            run.one_chunk(part)
        run.checkpoint()
        if on_group is not None:  # groups edited so far (a sequential run commits them a chunk at a time)
            on_group(len(run.done) + len(run.pending), len(mine))
        if run.stopped:
            log.warning("the run stopped at %d edits: %s", run.n_edits, run.stopped)
            break
    summary = run.summary()
    if not split:
        return summary
    world.barrier()  # every rank's records are on disk
    if world.main:
        summary = _merge_ranks(RunStore(out_dir), world.size, groups, cfg)
    world.barrier()
    return summary


def _merge_ranks(store: RunStore, size: int, groups, cfg: EvalConfig) -> dict:
    """The run directory one process would have written, from the ranks' ``rank{r}`` runs: every group's
    records exactly once, in group order."""
    records, unedited = [], {}
    for r in range(size):
        part = RunStore(store.dir / f"rank{r}")
        records += part.load_records(lambda recs: {x.get("group") for x in recs})
        unedited.update(part.load_unedited())
    by_group: Dict[int, List[dict]] = {}
    for rec in records:
        by_group.setdefault(rec["group"], []).append(rec)
    missing = [g for g in range(len(groups)) if len(by_group.get(g, [])) != len(groups[g])]
    if missing:
        raise RunError(f"{store.dir}: the ranks' runs lack the records of {len(missing)} group(s) "
                       f"(first: {missing[0]}); run the same torchrun command again to finish them")
    order = {c.case_id: i for i, c in enumerate(c for g in groups for c in g)}
    merged = sorted(records, key=lambda rec: (rec["group"], order.get(rec.get("case_id"), 0)))
    store._rewrite(store.cases_path, merged)
    if unedited:
        store.save_unedited(unedited)
    s = {**_summary_of(merged, cfg, groups, complete=True), "world_size": size}
    store.write_summary(s)
    return s


def _summary_of(records: List[dict], cfg: EvalConfig, groups, complete: bool) -> dict:
    """Run-level scores of ``records`` (what ``summary.json`` holds)."""
    s = summarize_records(records)
    ok = [r for r in records if "error" not in r]
    s["seconds_per_edit"] = sum(r["edit_seconds"] for r in ok) / len(ok) if ok else None
    s["seconds_per_case"] = sum(r["edit_seconds"] + r["score_seconds"] for r in ok) / len(ok) if ok else None
    s.update(method=cfg.method, dataset=cfg.dataset, sequential=cfg.sequential, mode=cfg.mode, complete=complete,
             n_cases=sum(len(g) for g in groups))
    if cfg.score_every > 1:  # which edits were scored right after them
        k = cfg.score_every
        s.update(score_every=k, n_scored=sum(1 for r in records if r.get("scored", True)),
                 scored=f"every {k}th group right after its edit (groups 0, {k}, {2 * k}, ...)")
    if cfg.score_sample:
        k = cfg.score_sample
        s.update(score_sample=k, n_scored=sum(1 for r in records if r.get("scored", True) and "error" not in r),
                 scored=f"{k} cases of each edit right after it, evenly spaced (first and last included)"
                        + (f", in every {cfg.score_every}th group" if cfg.score_every > 1 else ""))
    anchored = [a for r in records for a in ([r["anchor"]] if isinstance(r.get("anchor"), dict) else
                                             r.get("anchor") or [])]
    left_out = sum(bool(r.get("left_out")) for r in records)
    if left_out:  # cases a batch could not hold (a prompt asked twice): failures, counted apart too
        s["left_out"] = left_out
    if anchored:  # norm anchoring: requests whose target was too far above the anchor to be written
        s.update(anchor_skipped=sum(bool(a.get("skipped")) for a in anchored), anchored_requests=len(anchored))
    return s


def _unedited(editor, store: RunStore, cases, cfg: EvalConfig) -> Dict[int, List[str]]:
    """Each case's neighbourhood answers on the unedited weights (the reference of gen_NS and gen_leak):
    read from the run directory when an earlier call wrote them (a resumed run may hold edits by now),
    else generated now and written there."""
    got = store.load_unedited()
    missing = [c for c in cases if c.case_id not in got]
    if missing:  # run_eval starts from the original weights (a resumed run re-applies its edits after this)
        got.update(unedited_answers(editor.adapter, missing, cfg.gen_tokens, cfg.generation.batch_rows,
                                    chat=cfg.gen_chat))
        store.save_unedited(got)
    return got


def _requests(group: Sequence[Case]) -> list:
    """The edits of a group of cases, in order (a MQuAKE case makes several)."""
    return [r for c in group for r in c.requests]


def _problem(case) -> Optional[str]:
    """Why a case cannot be edited (a QAEdit question without its subject), or ``None``; such a case is recorded
    as an edit that failed (it counts 0 in every success rate)."""
    return getattr(case, "problem", None)


def _request_dict(case) -> dict:
    """A case's request as its record holds it (a case with a problem: the record's own fields)."""
    if case.request is not None:
        return case.request.to_dict()
    return {"prompt": case.question, "subject": case.subject, "target_new": case.target, "target_true": None}


def _case_verification(outcomes: Sequence[dict]) -> Optional[dict]:
    """A case's verification outcome from those of its edits (one edit: its own; several: all must take)."""
    if not outcomes:
        return None
    if len(outcomes) == 1:
        return outcomes[0]
    return {"verified": all(o["verified"] for o in outcomes), "edits": list(outcomes)}


def _verification(scores: dict) -> Optional[dict]:
    """The verification outcome of a case from its scores on the edited model (the rule of
    :mod:`factedit.edit.verify`: o* beats o_c on the rewrite prompt and is greedy or at P >= 0.5)."""
    if "rewrite_lp" not in scores or "rewrite_new_top1" not in scores:
        return None
    lp_new, lp_true = scores["rewrite_lp"][0]
    return verify_outcome(lp_new, scores["rewrite_new_top1"], lp_true)


def _chunks(todo: List[int], groups, size: int) -> List[List[int]]:
    """Consecutive groups of ``todo`` with at least ``size`` cases per chunk (the last may have fewer)."""
    parts: List[List[int]] = []
    n = size
    for g in todo:
        if n >= size:
            parts.append([])
            n = 0
        parts[-1].append(g)
        n += len(groups[g])
    return parts


def _warm_up(editor, method_cfg) -> None:
    """Fill the editor's caches (context templates, statistics) from the original weights, as the first
    edit of an uninterrupted run does, so that a resumed sequential run edits exactly like it."""
    if method_cfg is None:
        return
    if hasattr(method_cfg, "context_lengths"):
        editor.templates(getattr(method_cfg, "seed", 0), method_cfg.context_lengths)
    if hasattr(method_cfg, "stats_args"):
        for layer in method_cfg.layers:
            editor.stats(layer, **method_cfg.stats_args)


def _resume(editor, store: RunStore, cfg: EvalConfig, groups) -> tuple:
    """Done groups, their records, the sequential stack (re-applied) and downstream records."""
    stack = store.load_stack() if cfg.sequential else None
    want = {g: {c.case_id for c in group} for g, group in enumerate(groups)}

    def complete(records) -> set:
        seen: Dict[int, set] = {}
        for r in records:
            seen.setdefault(r.get("group"), set()).add(r.get("case_id"))
        ok = {g for g, ids in want.items() if seen.get(g) == ids}
        if stack is not None:
            ok &= {e["group"] for e in stack["groups"]}
        return ok

    records = store.load_records(complete)
    done = {r["group"] for r in records}
    if stack is not None and stack["groups"]:
        if {e["group"] for e in stack["groups"]} - done:
            raise RunError(f"{store.dir}: committed edits without their records; move the run directory away")
        if stack["patches"]:
            editor.load_history(store.patch_dir)
        saved = store.load_state(stack)
        if saved is not None:
            editor.state[cfg.method] = saved
        log.info("resumed a sequential run: %d edits re-applied", len(stack["patches"]))
    downstream = store.load_downstream() if cfg.sequential else []
    committed = sum(len(groups[g]) for g in done)
    if any(d.get("n_edits", 0) > committed for d in downstream):
        # checkpoints of edits that are no longer committed (their stack was lost, e.g. not kept with the
        # records): the run continues from the committed edits, so those checkpoints are measured again
        downstream = [d for d in downstream if d.get("n_edits", 0) <= committed]
        store.rewrite_downstream(downstream)
        log.info("dropped the checkpoints after the %d committed edits", committed)
    return done, records, stack, downstream


class _Run:
    """The state of a run in progress (one instance per :func:`run_eval` call)."""

    def __init__(self, editor, cfg: EvalConfig, store: RunStore, method_cfg, groups, tasks, done, records, stack,
                 downstream, unedited=None, ability=None):
        self.editor, self.cfg, self.store, self.method_cfg = editor, cfg, store, method_cfg
        self.unedited = unedited  # case id -> the unedited model's neighbourhood answers (generation scores)
        self.ability = ability  # perplexity / known-fact recall, references taken on the unedited weights
        self.groups, self.tasks = groups, tasks
        self.done, self.records, self.stack, self.downstream = set(done), list(records), stack, list(downstream)
        # sequential runs: edits applied and scored (ES/PS/NS) whose GE and commit wait for the next flush
        self.pending: List[tuple] = []
        self.guard = GuardConfig(enabled=cfg.guard)
        self._summary_at = float("-inf")
        # why a stop rule ended the run (recorded with the checkpoint that triggered it), else None
        self.stopped = next((d["stopped"] for d in self.downstream if d.get("stopped")), None)

    @property
    def n_edits(self) -> int:
        return sum(len(self.groups[g]) for g in self.done) + sum(len(p[1]) for p in self.pending)

    def one_group(self, g: int, group: List[Case]) -> None:
        ed, cfg = self.editor, self.cfg
        n_before = self.n_edits if cfg.sequential else 0
        base = {"group": g, "method": cfg.method, "n_edits_before": n_before}
        result, error, t0 = None, None, time.perf_counter()
        if cfg.method != BASELINE and _requests(group):  # (a group of cases that cannot be edited makes no edit)
            try:
                with PeakWindow() as memory:
                    result = ed.edit(_requests(group), config=self.method_cfg, guard=self.guard, verify=cfg.verify)
                if memory.peak is not None:  # the edit's own peak resident memory, not the scoring's
                    base["edit_peak_rss_mib"] = round(memory.peak, 1)
            except CollapseError as e:
                error = {"rolled_back": str(e)}
            except RequestError as e:  # this case cannot be edited; configuration errors stop the run
                error = {"error": f"{type(e).__name__}: {e}"}
        t_edit = time.perf_counter() - t0
        try:
            rows = self._score(group, error, result, base, t_edit, ge=not cfg.sequential, scored=self.scored(g))
        finally:
            if result is not None and not cfg.sequential:
                ed.revert()
        if cfg.sequential:
            self.pending.append((g, group, result, rows))
            n = self.n_edits
            if (cfg.generation.length == 0 or sum(len(p[1]) for p in self.pending) >= cfg.chunk
                    or self._checkpoint_due(n) or len(self.done) + len(self.pending) == len(self.groups)):
                self.flush()
        else:
            self.store.append(self.store.cases_path, rows)
            self.records += rows
            self.done.add(g)

    def scored(self, g: int) -> bool:
        return _group_scored(self.cfg, g)

    def sampled(self, group: List[Case]) -> List[Case]:
        return _sampled(self.cfg, group)

    def _score(self, group, error, result, base, t_edit, ge: bool = True, scored: bool = True) -> List[dict]:
        """The records of ``group`` after its edit: scored now, or (``scored`` False: a sampled run) edited,
        verified and committed with ``"scored": false``."""
        t0 = time.perf_counter()
        gen = self.cfg.generation if ge else replace(self.cfg.generation, length=0)
        usable = self.sampled(group)
        chosen = {c.case_id for c in usable}
        blank = {} if scored else {"scored": False}
        got = iter([dict(blank) for _ in usable] if not scored or error and "error" in error or not usable else
                   score_cases(self.editor.adapter, usable, gen, self.cfg.score_batch, unedited=self.unedited,
                               gen_tokens=self.cfg.gen_tokens, gen_chat=self.cfg.gen_chat))
        scores = [dict(blank) if _problem(c) else next(got) if c.case_id in chosen else {"scored": False}
                  for c in group]
        t_score = (time.perf_counter() - t0) / len(group) if scored else 0.0
        return self._rows(group, scores, error, base, result.deltas if result is not None else None, t_edit,
                          t_score, result.guard if result is not None else None,
                          result.fingerprints if result is not None else None,
                          result.verification if result is not None else None,
                          result.retried if result is not None else False,
                          result.wear if result is not None else None,
                          result.info if result is not None else None,
                          result.timings if result is not None else None)

    @staticmethod
    def _rows(group, scores, error, base, deltas, t_edit, t_score, guard, fingerprints, verification=None,
              retried: bool = False, wear: Optional[dict] = None, info: Optional[list] = None,
              timings: Optional[dict] = None) -> List[dict]:
        norm, fro = normalized_delta_norm(deltas) if deltas is not None else (None, None)
        rows, n0 = [], 0
        for c, s in zip(group, scores):
            k = len(c.requests)
            v = _case_verification(verification[n0: n0 + k]) if verification else _verification(s)
            # norm anchoring: each request's ‖v*‖ before anchoring, the anchor, and whether it was not written
            anchor = [x["anchor"] for x in (info or [])[n0: n0 + k] if isinstance(x, dict) and "anchor" in x]
            n0 += k
            asked = c.asked if isinstance(c, _LeftOut) else c.requests  # (a left-out case edits nothing)
            many = {"requests": [r.to_dict() for r in asked]} if len(asked) > 1 or c.kind == "mquake" else {}
            problem = _problem(c)
            failed = {"error": f"RequestError: {problem}"} if problem else error or {}
            if isinstance(c, _LeftOut):
                failed["left_out"] = True
            rows.append({"case_id": c.case_id, "kind": c.kind, **base, "request": _request_dict(c), **many, **s,
                         **failed, "delta_norm": norm, "delta_fro": fro, "edit_seconds": t_edit / len(group),
                         "score_seconds": t_score,
                         # the edit's phases (seconds of the whole group: statistics, templates, values, solve)
                         **({"edit_timings": {k: round(v, 3) for k, v in timings.items()}} if timings else {}),
                         "guard": guard, "base_fingerprints": fingerprints,
                         "verified": None if v is None or failed else v["verified"], "verification": v,
                         "retried": retried, **({"wear": wear} if wear else {}),
                         **({"anchor": anchor[0] if k == 1 else anchor} if anchor and not failed else {})})
        return rows

    def one_chunk(self, gs: List[int]) -> None:
        """Single-edit runs: edit each group of ``gs`` from the original weights (computed, never
        written into the model), then score all their cases together, each on its own W + Δ."""
        from ..core.fingerprints import matrix_fingerprint
        from ..edit.row_deltas import RowDeltas

        ed, cfg = self.editor, self.cfg
        cases = [c for g in gs for c in self.groups[g]]
        t_pre = 0.0
        if cfg.method != BASELINE and len(cases) > 1 and cfg.prefetch_batch > 1:
            try:
                t_pre = ed.prefetch_targets([c.request for c in cases], self.method_cfg, cfg.prefetch_batch)
            except RequestError as e:  # one bad request: every case is optimised (and fails) on its own
                log.info("prefetch of targets skipped: %s", e)
        fingerprints = None
        if self.method_cfg is not None:
            fingerprints = {ed.adapter.w_out_name(l): matrix_fingerprint(ed.adapter.w_out_stored(l))
                            for l in self.method_cfg.layers}
        edits: Dict[int, tuple] = {}
        for g in gs:
            group = self.groups[g]
            t0 = time.perf_counter()
            computed, error = None, None
            if cfg.method != BASELINE and _requests(group):
                try:
                    computed = ed.compute(_requests(group), config=self.method_cfg)
                except RequestError as e:
                    error = {"error": f"{type(e).__name__}: {e}"}
                if computed is not None:
                    for d in computed.deltas:  # as apply_deltas would refuse it
                        if not d.is_finite():
                            raise FactEditError(f"the update for layer {d.layer} contains NaN/Inf (cases "
                                                f"{[c.case_id for c in group]})")
            t_edit = time.perf_counter() - t0 + t_pre * len(group) / len(cases)
            edits[g] = (computed, error, t_edit)
        owner = {g: i for i, g in enumerate(gs)}
        scored = [(g, c) for g in gs for c in self.sampled(self.groups[g]) if edits[g][1] is None]
        t0 = time.perf_counter()
        models = RowDeltas(ed.adapter, [edits[g][0].deltas if edits[g][0] is not None else [] for g in gs])
        with models:
            scores = score_cases(ed.adapter, [c for _, c in scored], cfg.generation, cfg.score_batch, models,
                                 [owner[g] for g, _ in scored], self.unedited, cfg.gen_tokens, gen_chat=cfg.gen_chat)
        t_score = (time.perf_counter() - t0) / max(1, len(scored))
        by_case = {(g, c.case_id): s for (g, c), s in zip(scored, scores)}
        for g in gs:
            group, (computed, error, t_edit) = self.groups[g], edits[g]
            base = {"group": g, "method": cfg.method, "n_edits_before": 0}
            # an editable case of an edit that was made is scored, or left out of the sample
            got = [by_case[g, c.case_id] if (g, c.case_id) in by_case else
                   {"scored": False} if error is None and not _problem(c) else {} for c in group]
            rows = self._rows(group, got, error, base,
                              computed.deltas if computed is not None else None, t_edit,
                              t_score if error is None else 0.0, None, fingerprints,
                              timings=computed.timings if computed is not None else None)
            self.store.append(self.store.cases_path, rows)
            self.records += rows
            self.done.add(g)

    def flush(self) -> None:
        """Sequential runs: GE of the pending edits, then their commit.

        The edits were applied one after another and each scored (ES/PS/NS) right after it; their GE
        generations run now, together: the weights are those after the last pending edit, and the
        rows of edit m subtract the deltas of the pending edits after m (:class:`RowDeltas`), i.e.
        run on the weights right after edit m (up to float rounding)."""
        from ..edit.row_deltas import RowDeltas

        if not self.pending:
            return
        ge = self.cfg.generation
        if ge.length > 0:
            t0 = time.perf_counter()
            models, cases, owners, slots = [], [], [], []
            for m, (_, group, _, rows) in enumerate(self.pending):
                models.append([d.negated() for _, _, r, _ in self.pending[m + 1:] if r is not None for d in r.deltas])
                for c, row in zip(group, rows):
                    if "error" not in row and row.get("scored", True):
                        cases.append(c), owners.append(m), slots.append(row)
            with RowDeltas(self.editor.adapter, models) as rd:
                texts = generation_scores(self.editor.adapter, cases, ge, rd, owners)
            t = (time.perf_counter() - t0) / max(1, len(cases))
            for row, rec in zip(slots, texts):
                row.update(rec)
                row["score_seconds"] += t
        self._commit(self.pending)
        self.pending = []

    def _commit(self, pending) -> None:
        """Sequential: patch files, records, then the stack (the commit point)."""
        from ..patch.files import Patch

        names, n0 = [], len(self.stack["patches"])
        for g, _, result, _ in pending:
            name = None
            if result is not None:
                name = f"{n0 + sum(1 for x in names if x):05d}-{g:05d}.safetensors"
                Patch.from_result(result, self.editor.adapter).save(self.store.patch_dir / name)
            names.append(name)
        state_name = self.store.save_state(self.editor.state.get(self.cfg.method), self.stack, pending[-1][0])
        rows = [r for p in pending for r in p[3]]
        self.store.append(self.store.cases_path, rows)
        for (g, group, _, _), name in zip(pending, names):
            if name is not None:
                self.stack["patches"].append(name)
            self.stack["groups"].append({"group": g, "cases": [c.case_id for c in group], "patch": name})
        self.stack["state"] = state_name or self.stack.get("state")
        self.store.commit(self.stack)
        self.records += rows
        self.done.update(p[0] for p in pending)

    def _checkpoint_due(self, n: int) -> bool:
        k, marks = self.cfg.downstream_every, self.cfg.checkpoints
        last = max((d["n_edits"] for d in self.downstream), default=None)
        if marks:  # a listed count reached or passed since the last checkpoint (0 edits: the first one)
            return last is None or any(last < m <= n for m in marks)
        return bool(k) and (last is None or n // k > last // k)

    def _retention(self, edited: List[Case]) -> List[Case]:
        """The earlier edits a checkpoint re-scores: a sample evenly spaced in edit order (the first and the latest
        included); with ``score_every`` > 1 or ``score_sample`` a fixed sample instead, the cases scored right after
        their edit evenly spaced over the whole run, those edited so far (the same cases at every checkpoint)."""
        usable = [c for c in edited if not _problem(c)]
        if self.cfg.score_every <= 1 and not self.cfg.score_sample:
            return retention_cases(usable, self.cfg.retention_sample)
        pool = [c for g, group in enumerate(self.groups) if self.scored(g) for c in self.sampled(group)]
        fixed = {c.case_id for c in retention_cases(pool, self.cfg.retention_sample)}
        return [c for c in usable if c.case_id in fixed]

    def _stop_reason(self, ability: Optional[dict]) -> Optional[str]:
        """Why the stop rule ends the run at this checkpoint (``None``: it goes on)."""
        cfg = self.cfg
        if not ability:
            return None
        first = next((d.get("ability") for d in self.downstream if d.get("n_edits") == 0 and d.get("ability")), None)
        ppl, ppl0 = ability.get("perplexity"), (first or {}).get("perplexity")
        if cfg.stop_ppl is not None and ppl is not None and ppl0 and ppl > cfg.stop_ppl * ppl0:
            return f"perplexity {ppl:.4g} is above {cfg.stop_ppl:g} × the unedited model's {ppl0:.4g} (--stop-ppl)"
        recall = ability.get("known_recall")
        if cfg.stop_recall is not None and recall is not None and recall < cfg.stop_recall:
            return (f"known-fact recall {100 * recall:.1f} % of the unedited model's is below "
                    f"{100 * cfg.stop_recall:g} % (--stop-recall)")
        return None

    def checkpoint(self) -> None:
        """Sequential runs: downstream accuracy and the scores of all earlier edits at 0 edits, whenever
        the count reaches or passes a multiple of ``downstream_every``, and at the end."""
        if self.pending:  # a checkpoint sees committed edits only (one_group flushes before one is due)
            return
        n = self.n_edits
        last = max((d["n_edits"] for d in self.downstream), default=None)
        finished = len(self.done) == len(self.groups)
        if self.cfg.measures and (self._checkpoint_due(n) or (finished and n != last)):
            t0 = time.perf_counter()
            # the same weights give the same accuracy: runs in one process share it (all runs at 0 edits)
            acc = None
            if self.tasks:
                memo = self.editor.weights_memo("downstream", self.cfg.downstream_dir, self.cfg.downstream)
                if "acc" not in memo:
                    memo["acc"] = evaluate_tasks(self.editor.adapter, self.tasks, self.cfg.downstream.batch_size)
                acc = dict(memo["acc"])
            edited = [c for g in sorted(self.done) for c in self.groups[g]]
            ability = None
            if self.ability is not None:
                subjects = sorted({r.subject for c in edited for r in c.requests})
                memo = self.editor.weights_memo("ability", json.dumps(asdict(self.cfg.ability)), tuple(subjects))
                if "got" not in memo:
                    memo["got"] = self.ability.measure(exclude_subjects=subjects)
                ability = dict(memo["got"])
            earlier = self._retention(edited)
            retention = (summarize_records(score_cases(self.editor.adapter, earlier, batch_size=self.cfg.score_batch,
                                                       unedited=self.unedited, gen_tokens=self.cfg.gen_tokens,
                                                       gen_chat=self.cfg.gen_chat))
                         if earlier else None)
            rec = {"n_edits": n, "tasks": acc, "retention": retention, "ability": ability,
                   "wear": cumulative_wear(self.editor.adapter, self.editor.history),
                   "retention_cases": [c.case_id for c in earlier] if len(earlier) < len(edited) else None,
                   "seconds": time.perf_counter() - t0}
            stop = self._stop_reason(ability) if n else None
            if stop:
                rec["stopped"] = stop
                self.stopped = stop
            self.store.append(self.store.downstream_path, [rec])
            self.downstream.append(rec)
            self.summary()
        elif finished or time.perf_counter() - self._summary_at > SUMMARY_EVERY_S:
            self.summary()

    def summary(self) -> dict:
        """Run-level scores so far, written to ``summary.json``."""
        self._summary_at = time.perf_counter()
        s = _summary_of(self.records, self.cfg, self.groups, complete=len(self.done) == len(self.groups))
        if self.stopped:
            s["stopped"] = {"n_edits": self.n_edits, "reason": self.stopped}
        if self.downstream:
            s["downstream"] = self.downstream[-1]
        self.store.write_summary(s)
        return s
