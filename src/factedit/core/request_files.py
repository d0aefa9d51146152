"""Reading edit requests from files: factedit JSONL, CounterFact (KnowEdit JSONL and the
original ``counterfact.json`` layout). The layout is detected per record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from .errors import RequestError
from .requests import Request

__all__ = ["load_requests", "request_from_record", "read_records", "read_utf8"]


def _field(rec: dict, name: str, where: str):
    if name not in rec:
        raise RequestError(f"{where}: missing field {name!r}")
    return rec[name]


def _target(v, where: str, name: str) -> str:
    if isinstance(v, dict):
        v = v.get("str")
    if not isinstance(v, str):
        raise RequestError(f"{where}: field {name!r} must be a string (or {{'str': ...}})")
    return v


def request_from_record(rec, where: str = "record") -> Request:
    """One request from a record in any supported layout."""
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        if "requested_rewrite" in rec:  # original CounterFact
            rw = rec["requested_rewrite"]
            if not isinstance(rw, dict):
                raise RequestError(f"{where}: 'requested_rewrite' must be an object")
            return Request(_field(rw, "prompt", where), _field(rw, "subject", where),
                           _target(_field(rw, "target_new", where), where, "target_new"),
                           _target(rw["target_true"], where, "target_true") if "target_true" in rw else None)
        if "ground_truth" in rec:  # KnowEdit CounterFact: prompt with the subject filled in
            return Request.from_filled(_field(rec, "prompt", where), _field(rec, "subject", where),
                                       _target(_field(rec, "target_new", where), where, "target_new"),
                                       _target(rec["ground_truth"], where, "ground_truth"))
        true = rec.get("target_true")
        return Request.from_filled(_field(rec, "prompt", where), _field(rec, "subject", where),
                                   _target(_field(rec, "target_new", where), where, "target_new"),
                                   _target(true, where, "target_true") if true is not None else None)
    except RequestError as e:
        msg = str(e)
        raise RequestError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def read_utf8(path) -> str:
    """The text of a UTF-8 file; a clear :class:`RequestError` naming the file, line and column of
    the first byte that is not UTF-8 (e.g. a Latin-1 export) instead of a ``UnicodeDecodeError``."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RequestError(f"{path.name}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                           "save the file as UTF-8") from None


def read_records(path) -> List[Tuple[str, object]]:
    """``(where, record)`` pairs from a ``.jsonl`` (one record a line) or ``.json`` (a list of
    records, or one record) file; ``where`` names the file and line or index for error messages."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"file not found: {path}")
    text = read_utf8(path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: not valid JSON ({e})") from None
        data = data if isinstance(data, list) else [data]
        return [(f"{path.name} record {i}", r) for i, r in enumerate(data)]
    records = []
    # split on "\n" only: str.splitlines() also breaks inside strings at U+0085, U+2028, ...
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path.name}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise RequestError(f"{path.name}:{n}: not valid JSON ({e})") from None
    return records


def load_requests(path, limit: int | None = None, offset: int = 0) -> List[Request]:
    """Requests from a ``.jsonl`` (one record a line) or ``.json`` (a list of records) file."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"requests file not found: {path}")
    records = read_records(path)[offset:]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise RequestError(f"{path}: no requests")
    return [request_from_record(r, where) for where, r in records]
