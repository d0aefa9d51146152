"""The files of an evaluation run, written so that an interrupted run can continue.

    DIR/config.json       the run's full configuration (atomic); a resume must match it
    DIR/cases.jsonl       one record per case, appended group by group (write, flush, fsync)
    DIR/downstream.jsonl  sequential runs: downstream accuracy and retention every K edits
    DIR/patches/          sequential runs: one patch per edit + stack.json (the commit point)
    DIR/summary.json      run-level scores (atomic)
    DIR/unedited.json     the unedited model's neighbourhood answers (generation-based scores; MQuAKE: each case's
                          unedited side, teacher-forced and answers; atomic)

A torn last line (the process died mid-write) is dropped on resume, and so are the records of a
group that is not complete (or, in a sequential run, not committed to ``stack.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from ..core.errors import FactEditError
from ..core.paths import atomic_path, atomic_write_text

__all__ = ["RunError", "RunStore"]


class RunError(FactEditError):
    """An evaluation run cannot start or continue (e.g. its directory holds a different run)."""


def read_jsonl(path: Path) -> Tuple[List[dict], bool]:
    """Records of a JSONL file written by appends, and whether a torn last line was dropped."""
    if not path.is_file():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # the file should end with a newline
    body, last = lines[:-1], lines[-1]
    out = []
    for n, line in enumerate(body, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if n == len(body) and not last:
                torn = True  # a complete-looking but broken last line
                continue
            raise RunError(f"{path}:{n}: damaged record in the middle of the file; "
                           "move the run directory away") from None
    return out, torn


def _upgraded(saved: dict, upgrade: Optional[Callable[[dict], dict]]) -> dict:
    """A saved run's ``compare`` in today's terms."""
    old = saved.get("compare", {})
    return upgrade(old) if upgrade is not None else old


def _differences(old: dict, compare: dict, defaults: Optional[dict]) -> List[str]:
    """The fields where a saved ``compare`` and today's differ, sorted; a field the saved run does not record
    matches when today's value is its default in ``defaults``."""
    defaults = defaults or {}
    return sorted(k for k in set(old) | set(compare) if old.get(k) != compare.get(k)
                  and not (k not in old and k in defaults and compare.get(k) == defaults[k]))


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.cases_path = self.dir / "cases.jsonl"
        self.downstream_path = self.dir / "downstream.jsonl"
        self.patch_dir = self.dir / "patches"

    # ------------------------------------------------------------------ config
    def check_or_write_config(self, config: dict, compare: dict, defaults: Optional[dict] = None,
                              upgrade: Optional[Callable[[dict], dict]] = None) -> bool:
        """Write ``config.json`` for a new run; for an existing one, refuse unless the ``compare`` part
        matches. ``defaults``: an option the saved run does not record (written before the option existed)
        matches when it is at this default; ``upgrade``: turns the saved ``compare`` into today's terms
        first. Returns True when resuming."""
        path = self.dir / "config.json"
        saved = self._saved()
        if saved is not None:
            old = _upgraded(saved, upgrade)
            diff = _differences(old, compare, defaults)
            if diff:
                k = diff[0]
                raise RunError(f"{self.dir} holds a run with a different configuration ({k}: saved "
                               f"{old.get(k)!r}, now {compare.get(k)!r}"
                               + (f"; {len(diff) - 1} more differences" if len(diff) > 1 else "")
                               + "); use another --out directory or remove it"
                               + (" (a run can be extended to more cases, not cut to fewer)" if k == "limit" else ""))
            return True
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**config, "compare": compare}, indent=2, default=str))
        return False

    def extend_limit(self, compare: dict, defaults: Optional[dict] = None,
                     upgrade: Optional[Callable[[dict], dict]] = None, group_size: int = 1) -> Optional[tuple]:
        """Let an existing run continue over more cases than it started with: when its saved ``compare`` differs
        from ``compare`` only by a smaller ``limit`` (or a limit where ``compare`` has none: all cases), the saved
        limit is raised in ``config.json`` (atomically; ``extended`` records each raise) so that
        :meth:`check_or_write_config` accepts the run. Its first cases, and its groups, are the same either
        way (records ``offset .. offset + limit``, cut into groups of ``group_size``), provided the old limit
        is a whole number of groups; otherwise the last group would change, which is refused. Returns
        ``(old, new)`` when extended, else None (nothing to do, or another difference that
        :meth:`check_or_write_config` then names)."""
        saved = self._saved()
        if saved is None:
            return None
        old = _upgraded(saved, upgrade)
        before, after = old.get("limit"), compare.get("limit")
        others = [k for k in _differences(old, compare, defaults) if k != "limit"]
        grows = before is not None and (after is None or int(after) > int(before))
        if before == after or others or not grows:
            return None
        if group_size > 1 and int(before) % group_size:
            raise RunError(f"{self.dir} was started with --limit {before}, not a whole number of groups of "
                           f"{group_size} cases: extending it would change its last group; use another --out")
        saved["compare"] = {**saved.get("compare", {}), "limit": after}
        saved["extended"] = list(saved.get("extended", [])) + [{"from": before, "to": after,
                                                                "at": time.strftime("%Y-%m-%dT%H:%M:%S")}]
        atomic_write_text(self.dir / "config.json", json.dumps(saved, indent=2, default=str))
        return before, after

    def _saved(self) -> Optional[dict]:
        """The run's ``config.json`` (None for a new run; a damaged one is refused)."""
        path = self.dir / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise RunError(f"{path} is damaged; move the run directory away") from None

    # ------------------------------------------------------------------ records
    def load_records(self, complete_groups) -> List[dict]:
        """Records of the groups accepted by ``complete_groups(records) -> set``; the file is rewritten
        (atomically) without a torn line or records of unfinished groups."""
        records, torn = read_jsonl(self.cases_path)
        keep_groups = complete_groups(records)
        kept = [r for r in records if r.get("group") in keep_groups]
        if torn or len(kept) != len(records):
            self._rewrite(self.cases_path, kept)
        return kept

    def append(self, path: Path, records: List[dict]) -> None:
        """Append records durably (one write, flush, fsync)."""
        text = "".join(json.dumps(r, default=_json_default) + "\n" for r in records)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def load_downstream(self) -> List[dict]:
        records, torn = read_jsonl(self.downstream_path)
        if torn:
            self._rewrite(self.downstream_path, records)
        return records

    def rewrite_downstream(self, records: List[dict]) -> None:
        self._rewrite(self.downstream_path, records)

    def _rewrite(self, path: Path, records: List[dict]) -> None:
        atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))

    def load_unedited(self) -> Dict[int, Union[List[str], dict]]:
        """case id -> the unedited model's neighbourhood answers, or for a MQuAKE case its unedited side (an
        object: :func:`~factedit.evaluation.score_model.mquake_unedited`); {} when none were written."""
        try:
            raw = json.loads((self.dir / "unedited.json").read_text(encoding="utf-8"))
            return {int(k): v if isinstance(v, dict) else [str(t) for t in v] for k, v in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def save_unedited(self, answers: Dict[int, Union[List[str], dict]]) -> None:
        atomic_write_text(self.dir / "unedited.json", json.dumps({str(k): v for k, v in answers.items()}))

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))

    # ------------------------------------------------------------------ sequential edits
    def load_stack(self) -> dict:
        path = self.patch_dir / "stack.json"
        if not path.is_file():
            return {"patches": [], "groups": [], "state": None}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise RunError(f"{path} is damaged; move the run directory away") from None

    def commit(self, stack: dict) -> None:
        """Make the stack (patches, finished groups, state file) the committed state of the run."""
        atomic_write_text(self.patch_dir / "stack.json", json.dumps(stack))

    def save_state(self, state: Optional[Dict[int, object]], stack: dict, group: int) -> Optional[str]:
        """Write a method's state (AlphaEdit's key memory) to whichever of two files the stack does not
        reference, so the committed one is never overwritten. Returns its name."""
        if not state:
            return None
        from safetensors.torch import save_file

        name = "state-b.safetensors" if stack.get("state") == "state-a.safetensors" else "state-a.safetensors"
        paths = list(_leaves(state))
        with atomic_path(self.patch_dir / name, suffix=".safetensors") as tmp:
            # keys are layers (ints) and named entries (NAS's anchor, RLS's "A"/"B" under a layer): the paths,
            # with their types, travel in the metadata
            save_file({_tensor_name(p): t.contiguous() for p, t in paths}, str(tmp),
                      metadata={"group": str(group), "paths": json.dumps([list(p) for p, _ in paths])})
        return name

    def load_state(self, stack: dict) -> Optional[Dict[int, object]]:
        if not stack.get("state"):
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.patch_dir / stack["state"]
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            if "paths" in meta:
                paths = [tuple(p) for p in json.loads(meta["paths"])]
            else:  # files written before the paths were recorded: flat, digits are layers
                paths = [(int(k) if k.isdigit() else k,) for k in tensors]
            if sorted(_tensor_name(p) for p in paths) != sorted(tensors):
                raise ValueError("its tensors are not the ones its metadata lists")
        except Exception as e:  # missing, torn, or not a state file
            raise RunError(f"{path}: the method state of this run's committed edits is missing or damaged ({e}); "
                           "the run cannot continue them: move the run directory away to start again") from None
        group = int(meta.get("group", -1))
        if stack["groups"] and group != stack["groups"][-1]["group"]:
            raise RunError(f"{path} belongs to group {group}, not to the last committed one")
        state: dict = {}
        for p in paths:
            node = state
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = tensors[_tensor_name(p)]
        return state


def _leaves(state: dict, prefix: tuple = ()):
    """``(path, tensor)`` for every tensor of a (possibly nested) method state."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _tensor_name(path) -> str:
    return "/".join(str(k) for k in path)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
