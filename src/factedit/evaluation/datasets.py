"""Evaluation data: CounterFact (original ``counterfact.json`` and KnowEdit layouts), zsRE (MEND
layout), MQuAKE (multi-hop cases of 1-3 edits, original layout), the KnowEdit benchmark's files with
``portability`` / ``locality`` probes, QAEdit (real-world questions), with the layout detected from the records.

    cases = load_cases("../shared/data/counterfact/counterfact_knowedit.jsonl", limit=200)
    cases[0].request, cases[0].paraphrase_prompts, cases[0].neighborhood_prompts

A malformed record raises :class:`DatasetError` naming the file, the record and the field.
Datasets can also be given as an ``http(s)://`` or ``file://`` URL: :func:`resolve_dataset`
downloads it once into ``$FACTEDIT_HOME/datasets`` and checks its SHA-256 when one is given.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..core.errors import RequestError
from ..core.paths import atomic_path, factedit_home
from ..core.request_files import read_records, request_from_record
from ..core.requests import Request

__all__ = ["DatasetError", "CounterFactCase", "ZsRECase", "MQuAKECase", "Hop", "KnowEditCase", "QAEditCase", "Probe",
           "Case", "detect_layout", "load_cases", "resolve_dataset", "sha256_of", "COUNTERFACT_URL"]

#: where the ROME authors publish the full original CounterFact (21,919 records, ~45 MB)
COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


class DatasetError(RequestError):
    """An evaluation record or data file is malformed, missing or fails its checksum."""


class _OneEdit:
    """A case that makes one edit, its ``request`` (CounterFact, zsRE, KnowEdit)."""

    @property
    def requests(self) -> Tuple[Request, ...]:
        """The edits this case makes (one)."""
        return (self.request,)


@dataclass(frozen=True)
class CounterFactCase(_OneEdit):
    """One CounterFact case: the rewrite plus the prompts that measure it.

    Attributes:
        case_id: the record's ``case_id`` (else its index in the file).
        request: template, subject, ``target_new`` (o*) and ``target_true`` (o_c).
        paraphrase_prompts: rephrasings of the rewrite prompt (PS).
        neighborhood_prompts: other subjects with the same true object (NS).
        attribute_prompts: other subjects that have o* (kept; not scored).
        generation_prompts: prompts about the subject whose continuations give GE.
    """

    case_id: int
    request: Request
    paraphrase_prompts: Tuple[str, ...] = ()
    neighborhood_prompts: Tuple[str, ...] = ()
    attribute_prompts: Tuple[str, ...] = ()
    generation_prompts: Tuple[str, ...] = ()

    kind = "counterfact"


@dataclass(frozen=True)
class ZsRECase(_OneEdit):
    """One zsRE case (MEND layout): question ``src`` about ``subject``, new answer ``alt``.

    Attributes:
        case_id: index in the file.
        request: ``src`` as the template, ``alt`` as ``target_new``, ``answers[0]`` as ``target_true``.
        rephrase: a rephrased question (generalization).
        loc: an unrelated Natural Questions question, scored as ``loc + "?"`` (specificity).
        loc_ans: its answer.
    """

    case_id: int
    request: Request
    rephrase: str
    loc: str
    loc_ans: str

    kind = "zsre"


@dataclass(frozen=True)
class Hop:
    """One single-hop fact of a MQuAKE chain: the question, its cloze form, the answer and its aliases."""

    question: str
    cloze: str
    answer: str
    aliases: Tuple[str, ...] = ()

    @property
    def names(self) -> Tuple[str, ...]:
        """The answer and its aliases (what an answer may mention)."""
        return (self.answer, *self.aliases)


@dataclass(frozen=True)
class MQuAKECase:
    """One MQuAKE case: 1-3 edits applied together, then multi-hop questions whose answer follows from them.

    Attributes:
        case_id: the record's ``case_id``.
        requests: the edits (``requested_rewrite``), applied together (one batch, or one after another for
            single-request methods) before the case is scored.
        questions: multi-hop questions (three paraphrases of one chain) answered by ``new_answer`` after the
            edits and by ``answer`` before them.
        answer, answer_alias: the chain's answer on the unedited facts.
        new_answer, new_answer_alias: its answer once the edits hold.
        single_hops, new_single_hops: each hop of the chain before / after the edits (question, cloze, answer).
    """

    case_id: int
    requests: Tuple[Request, ...]
    questions: Tuple[str, ...]
    answer: str
    answer_alias: Tuple[str, ...]
    new_answer: str
    new_answer_alias: Tuple[str, ...]
    single_hops: Tuple[Hop, ...] = ()
    new_single_hops: Tuple[Hop, ...] = ()

    kind = "mquake"

    @property
    def request(self) -> Request:
        """The first edit (what a one-line description of the case names)."""
        return self.requests[0]

    @property
    def old_names(self) -> Tuple[str, ...]:
        return (self.answer, *self.answer_alias)

    @property
    def new_names(self) -> Tuple[str, ...]:
        return (self.new_answer, *self.new_answer_alias)

    def edited_hops(self) -> List[Tuple[Request, Hop, Tuple[str, ...]]]:
        """Each edit with the hop of ``new_single_hops`` that states it (its cloze is the edit's prompt; an edit no
        hop states gets a hop made from the request) and the names of the old object (the unedited chain's hop
        with that cloze, else the request's ``target_true``)."""
        out = []
        for r in self.requests:
            hop = next((h for h in self.new_single_hops if h.cloze.strip() == r.text.strip()), None)
            old = next((h for h in self.single_hops if h.cloze.strip() == r.text.strip()), None)
            out.append((r, hop or Hop(r.text, r.text, r.target_new), old.names if old else (r.target_true,)))
        return out

    def hop_names(self) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
        """``(new names, old names)`` of each hop of the new chain: the old names are those of the unedited
        chain's hop with the same cloze and another answer (an edited hop), else none."""
        old = {h.cloze.strip(): h for h in self.single_hops}
        out = []
        for h in self.new_single_hops:
            o = old.get(h.cloze.strip())
            out.append((h.names, o.names if o is not None and o.answer != h.answer else ()))
        return out


@dataclass(frozen=True)
class Probe:
    """A prompt of a KnowEdit record's ``portability`` or ``locality`` and its answer (with aliases)."""

    category: str
    prompt: str
    answers: Tuple[str, ...]


@dataclass(frozen=True)
class KnowEditCase(_OneEdit):
    """One record of the KnowEdit benchmark (wiki_counterfact, wiki_recent, ZsRE): an edit and its probes.

    Attributes:
        case_id: the record's ``case_id``, else its index in the file.
        request: ``prompt`` (the subject inside it), ``target_new``, ``ground_truth`` (none for an insertion).
        rephrase: ``rephrase_prompt`` (zero or one).
        portability: probes whose answer should follow the edit (Subject_Aliasing, Reasoning,
            Logical_Generalization, ...), each answered by ``answers[0]`` or an alias.
        locality: probes whose answer the edit should leave alone (Relation_Specificity, Forgetfulness, ...).
    """

    case_id: int
    request: Request
    rephrase: Tuple[str, ...] = ()
    portability: Tuple[Probe, ...] = ()
    locality: Tuple[Probe, ...] = ()

    kind = "knowedit"


@dataclass(frozen=True)
class QAEditCase(KnowEditCase):
    """One QAEdit record (the WILD evaluation's real-world questions): the question is the edit's prompt, with its
    subject located inside it; ``rephrase`` and the ``locality`` questions (category ``"QA"``) come from the file.

    Attributes:
        case_id: the record's index in the file (QAEdit's ``id`` repeats across its sources).
        source: the QA data set and the record's ``id`` there (``"NQ:1104"``).
        problem: why this case cannot be edited (its subject does not occur in its question); such a case is
            kept and counted as a failed edit, as an edit that raises is.
        question, subject, target: the record's fields as they are (what a case with a problem shows).
    """

    source: str = ""
    problem: Optional[str] = None
    question: str = ""
    subject: str = ""
    target: str = ""

    kind = "qaedit"

    @property
    def requests(self) -> Tuple[Request, ...]:
        return () if self.problem else (self.request,)


Case = Union[CounterFactCase, ZsRECase, MQuAKECase, KnowEditCase, QAEditCase]


def detect_layout(record) -> str:
    """``"counterfact"`` (original), ``"knowedit"``, ``"zsre"`` or ``"requests"`` (factedit JSONL)."""
    if isinstance(record, dict):
        if "questions" in record or isinstance(record.get("requested_rewrite"), list):
            return "mquake"  # (CounterFact's requested_rewrite is one object)
        if isinstance(record.get("portability"), dict) or isinstance(record.get("locality"), dict):
            return "knowedit-probes"
        if "requested_rewrite" in record:
            return "counterfact"
        if "ground_truth" in record:
            return "knowedit"
        if "src" in record and "alt" in record:
            return "zsre"
        if "prompt" in record and "target_new" in record:
            return "requests"
        if "prompt" in record and "target" in record and "subject" in record:
            return "qaedit"
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    raise DatasetError(f"unknown record layout (keys {keys}); expected CounterFact (requested_rewrite, ...), "
                       "KnowEdit CounterFact (prompt, ground_truth, ...), MQuAKE (requested_rewrite, questions, "
                       "new_answer, ...), zsRE (src, alt, answers, loc, ...), QAEdit (prompt, target, subject, ...) or "
                       "factedit requests (prompt, subject, target_new)")


def _where(where: str, rec) -> str:
    cid = rec.get("case_id") if isinstance(rec, dict) else None
    return f"{where} (case_id {cid})" if cid is not None else where


def _get(rec: dict, name: str, where: str, kind=str):
    if name not in rec:
        raise DatasetError(f"{where}: missing field {name!r}")
    v = rec[name]
    if kind is str and not (isinstance(v, str) and v.strip()):
        raise DatasetError(f"{where}: field {name!r} must be a non-empty string, got {v!r:.60}")
    if kind is list and not (isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v)):
        raise DatasetError(f"{where}: field {name!r} must be a list of non-empty strings")
    return v


def _request(rec: dict, where: str) -> Request:
    try:
        return request_from_record(rec, where)
    except RequestError as e:
        raise DatasetError(str(e)) from None


def _case_id(rec: dict, where: str, default: int) -> int:
    cid = rec.get("case_id", default)
    if isinstance(cid, bool) or not isinstance(cid, int):
        raise DatasetError(f"{where}: field 'case_id' must be an integer, got {cid!r}")
    return cid


def _counterfact(rec: dict, where: str, index: int) -> CounterFactCase:
    req = _request(rec, where)
    if req.target_true is None:
        raise DatasetError(f"{where}: field 'requested_rewrite.target_true' is needed for evaluation")
    lists = {k: tuple(_get(rec, k, where, list)) for k in
             ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")}
    return CounterFactCase(_case_id(rec, where, index), req, **lists)


def _knowedit(rec: dict, where: str, index: int) -> CounterFactCase:
    req = _request(rec, where)
    para = _get(rec, "rephrase_prompt", where)
    neigh = _get(rec, "locality_prompt", where)
    loc_truth = _get(rec, "locality_ground_truth", where)
    if loc_truth.strip() != req.target_true.strip():
        raise DatasetError(f"{where}: field 'locality_ground_truth' ({loc_truth!r}) differs from 'ground_truth' "
                           f"({req.target_true!r}); CounterFact neighbours share the true object")
    # no generation prompts in this layout: GE uses the rewrite and paraphrase prompts
    return CounterFactCase(_case_id(rec, where, index), req, (para,), (neigh,), (), (req.text, para))


def _zsre(rec: dict, where: str, index: int) -> ZsRECase:
    src, subject, alt = (_get(rec, k, where) for k in ("src", "subject", "alt"))
    answers = _get(rec, "answers", where, list)
    if not answers:
        raise DatasetError(f"{where}: field 'answers' is empty")
    if subject not in src:
        raise DatasetError(f"{where}: field 'subject' ({subject!r}) does not occur in field 'src'")
    true = answers[0] if answers[0].strip() != alt.strip() else None
    try:
        req = Request.from_filled(src, subject, alt, true)
    except RequestError as e:
        raise DatasetError(f"{where}: {e}") from None
    rephrase, loc, loc_ans = (_get(rec, k, where) for k in ("rephrase", "loc", "loc_ans"))
    return ZsRECase(_case_id(rec, where, index), req, rephrase, loc, loc_ans)


def _requests(rec: dict, where: str, index: int) -> CounterFactCase:
    req = _request(rec, where)
    if req.target_true is None:
        raise DatasetError(f"{where}: field 'target_true' is needed for evaluation")
    return CounterFactCase(_case_id(rec, where, index), req, generation_prompts=(req.text,))


def _aliases(rec: dict, name: str, where: str) -> Tuple[str, ...]:
    v = rec.get(name, [])
    if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise DatasetError(f"{where}: field {name!r} must be a list of strings")
    return tuple(x for x in v if x.strip())


def _hops(rec: dict, name: str, where: str) -> Tuple[Hop, ...]:
    v = rec.get(name)
    if not isinstance(v, list) or not v:
        raise DatasetError(f"{where}: field {name!r} must be a non-empty list of hops (question, cloze, answer)")
    out = []
    for i, h in enumerate(v):
        w = f"{where}: {name}[{i}]"
        if not isinstance(h, dict):
            raise DatasetError(f"{w}: expected an object")
        out.append(Hop(*(_get(h, k, w) for k in ("question", "cloze", "answer")), _aliases(h, "answer_alias", w)))
    return tuple(out)


def _mquake(rec: dict, where: str, index: int) -> MQuAKECase:
    rewrites = rec.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise DatasetError(f"{where}: field 'requested_rewrite' must be a non-empty list of edits")
    requests = []
    for i, rw in enumerate(rewrites):
        req = _request({"requested_rewrite": rw}, f"{where}: requested_rewrite[{i}]")
        if req.target_true is None:
            raise DatasetError(f"{where}: requested_rewrite[{i}]: field 'target_true' is needed for evaluation")
        requests.append(req)
    questions = _get(rec, "questions", where, list)
    if not questions:
        raise DatasetError(f"{where}: field 'questions' is empty")
    return MQuAKECase(_case_id(rec, where, index), tuple(requests), tuple(questions), _get(rec, "answer", where),
                      _aliases(rec, "answer_alias", where), _get(rec, "new_answer", where),
                      _aliases(rec, "new_answer_alias", where), _hops(rec, "single_hops", where),
                      _hops(rec, "new_single_hops", where))


def _names(v, where: str, field: str = "ground_truth") -> Tuple[str, ...]:
    """A KnowEdit ``ground_truth``: a string, a list of strings, or a list of alias lists, flattened."""
    flat = [v] if isinstance(v, str) else [y for x in v for y in ([x] if isinstance(x, str) else x)] \
        if isinstance(v, list) and all(isinstance(x, (str, list)) for x in v) else None
    if not flat or not all(isinstance(x, str) for x in flat) or not any(x.strip() for x in flat):
        raise DatasetError(f"{where}: field {field!r} must be a string, a list of strings or a list of lists "
                           f"of strings, got {v!r:.60}")
    return tuple(x for x in flat if x.strip())


def _probes(rec: dict, name: str, where: str) -> Tuple[Probe, ...]:
    groups = rec.get(name) or {}
    if not isinstance(groups, dict):
        raise DatasetError(f"{where}: field {name!r} must be an object of categories (e.g. Reasoning: [...])")
    out = []
    for cat, items in groups.items():
        if not isinstance(items, list):
            raise DatasetError(f"{where}: {name}.{cat} must be a list of {{prompt, ground_truth}}")
        for i, it in enumerate(items):
            w = f"{where}: {name}.{cat}[{i}]"
            if not isinstance(it, dict):
                raise DatasetError(f"{w}: expected an object")
            prompt = _get(it, "prompt", w)
            if "ground_truth" not in it:
                raise DatasetError(f"{w}: missing field 'ground_truth'")
            out.append(Probe(str(cat), prompt, _names(it["ground_truth"], w)))
    return tuple(out)


def _knowedit_probes(rec: dict, where: str, index: int) -> KnowEditCase:
    prompt, subject = _get(rec, "prompt", where), _get(rec, "subject", where)
    target = _get(rec, "target_new", where)
    true = rec.get("ground_truth")
    true = _names(true, where)[0] if true not in (None, "", []) else None
    if true is not None and true.strip() == target.strip():
        true = None  # the edit restates what the record says is true (an insertion)
    try:
        req = Request.from_filled(prompt, subject, target, true)
    except RequestError as e:
        raise DatasetError(f"{where}: {e}") from None
    rephrase = rec.get("rephrase_prompt")
    if rephrase is not None and not (isinstance(rephrase, str) and rephrase.strip()):
        raise DatasetError(f"{where}: field 'rephrase_prompt' must be a non-empty string")
    portability, locality = _probes(rec, "portability", where), _probes(rec, "locality", where)
    if not portability and not locality:
        raise DatasetError(f"{where}: no portability or locality probe to score")
    return KnowEditCase(_case_id(rec, where, index), req, (rephrase,) if rephrase else (), portability, locality)


def _locate(question: str, subject: str) -> Optional[str]:
    """The subject as the question spells it (a case-insensitive match), or ``None`` when it does not occur."""
    if subject in question:
        return subject
    i = question.lower().rfind(subject.lower())
    return question[i: i + len(subject)] if i >= 0 else None


def _qaedit(rec: dict, where: str, index: int) -> QAEditCase:
    question, subject, target = (_get(rec, k, where) for k in ("prompt", "subject", "target"))
    rephrase = _get(rec, "rephrase", where) if rec.get("rephrase") is not None else None
    loc = rec.get("locality", [])
    if not isinstance(loc, list):
        raise DatasetError(f"{where}: field 'locality' must be a list of {{loc, loc_ans}}")
    probes = []
    for i, item in enumerate(loc):
        w = f"{where}: locality[{i}]"
        if not isinstance(item, dict):
            raise DatasetError(f"{w}: expected an object")
        probes.append(Probe("QA", _get(item, "loc", w), (_get(item, "loc_ans", w),)))
    source = ":".join(str(rec[k]) for k in ("source", "id") if rec.get(k) is not None)
    spelled = _locate(question, subject)
    problem, req = None, None
    if spelled is None:
        problem = f"subject {subject!r} does not occur in the question {question!r}"
    else:
        try:
            req = Request.from_filled(question, spelled, target)
        except RequestError as e:
            problem = str(e)
    return QAEditCase(index, req, (rephrase,) if rephrase else (), (), tuple(probes), source=source,
                      problem=problem, question=question, subject=subject, target=target)


_PARSERS = {"counterfact": _counterfact, "knowedit": _knowedit, "zsre": _zsre, "requests": _requests,
            "mquake": _mquake, "knowedit-probes": _knowedit_probes, "qaedit": _qaedit}


def load_cases(path, limit: Optional[int] = None, offset: int = 0) -> List[Case]:
    """Evaluation cases ``offset .. offset+limit`` of a dataset file, layout auto-detected from its
    first record (all records must share it). Only the selected records are parsed."""
    try:
        records = read_records(path)
    except RequestError as e:
        raise DatasetError(str(e)) from None
    if not records:
        raise DatasetError(f"{path}: no records")
    where0, first = records[0]
    layout = detect_layout(first)
    if offset < 0 or (limit is not None and limit < 0):
        raise DatasetError("offset and limit must be >= 0")
    chosen = list(enumerate(records))[offset:]
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise DatasetError(f"{path}: no records at offset {offset} (the file has {len(records)})")
    cases = []
    for index, (where, rec) in chosen:
        w = _where(where, rec)
        if not isinstance(rec, dict):
            raise DatasetError(f"{w}: expected a JSON object, got {type(rec).__name__}")
        if detect_layout(rec) != layout:
            raise DatasetError(f"{w}: layout {detect_layout(rec)!r} differs from the file's ({layout!r})")
        cases.append(_PARSERS[layout](rec, w, index))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{path}: case_id {dup} occurs more than once")
    return cases


def sha256_of(path) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_dataset(spec: str, sha256: Optional[str] = None, cache_dir: Optional[Path] = None) -> Path:
    """A local dataset path for ``spec``: a path as is, or a URL downloaded once (atomically) into
    ``cache_dir`` (default ``$FACTEDIT_HOME/datasets``). ``sha256`` is checked in both cases."""
    scheme = urllib.parse.urlparse(spec).scheme
    if scheme in ("http", "https", "file"):
        name = Path(urllib.parse.urlparse(spec).path).name or "dataset.json"
        digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
        path = (cache_dir or factedit_home() / "datasets") / f"{digest}-{name}"
        if not path.is_file():
            try:
                with urllib.request.urlopen(spec, timeout=60) as resp, atomic_path(path) as tmp:
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(resp, out)
            except OSError as e:
                raise DatasetError(f"cannot download {spec}: {e}") from None
    else:
        path = Path(spec)
        if not path.is_file():
            raise DatasetError(f"dataset not found: {path}")
    if sha256 is not None:
        got = sha256_of(path)
        if got.lower() != sha256.lower():
            if scheme:
                path.unlink(missing_ok=True)  # a bad download is not kept
            raise DatasetError(f"{spec}: SHA-256 is {got}, expected {sha256}")
    return path
