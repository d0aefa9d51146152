"""What ``factedit ui`` does with its one model, without any web code: locate, edit, batch-edit, the
stack of edits (inspect, revert, download, upload) and evaluation. Every call goes through the same
library functions as the command line (:mod:`factedit.report`, :func:`~factedit.trace.causal.trace_prompt`,
:func:`~factedit.evaluation.run_eval`, :mod:`factedit.patch`), and holds the session's lock while it
reads or writes the model: two browser tabs never interleave half-applied edits.

Errors the user can fix raise :class:`~factedit.core.errors.FactEditError` (the page shows the
message); the model is then as it was before the call.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..core.errors import FactEditError, RequestError
from ..core.progress import reporting
from ..core.requests import Request

__all__ = ["Session", "METHOD_CHOICES", "Progress", "result_message"]

#: the methods the page offers, the default first
METHOD_CHOICES = ("r-rome", "rome", "p-rome", "memit", "emmet", "alphaedit", "ft")

#: ``progress(fraction, message)``: how far a long call is (``fraction`` None: no measure yet)
Progress = Callable[[Optional[float], str], None]


def _quiet(fraction, message) -> None:
    pass


class Session:
    """The model the page edits, its editor, and the lock that serialises work on them.

    Args:
        editor: an :class:`~factedit.Editor` over the loaded model.
        stats_corpus, stats_tokens: the statistics every edit uses (as ``--corpus`` / ``--stats-tokens``).
        bank: the side-effect probes' :class:`~factedit.side_effects.Bank` (default: the built-in one).
        workdir: where heatmaps, downloads and evaluation runs are written (default: a temporary folder).
    """

    def __init__(self, editor, stats_corpus: Optional[str] = None, stats_tokens: Optional[int] = None,
                 workdir=None, bank=None):
        from ..side_effects import load_bank

        self.editor = editor
        self.bank = bank or load_bank()  # subjects and templates of the side-effect probes
        self.stats = {"stats_corpus": stats_corpus, "stats_tokens": stats_tokens}
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="factedit-ui-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._n = 0  # files written, for unique names
        self._chat = None  # the editor of chat-turn edits (made on first use)

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def exclusive(self, progress: Progress = _quiet):
        """Hold the model: wait (saying so) while another tab's work runs."""
        if not self._lock.acquire(blocking=False):
            progress(None, "waiting for the work of another tab to finish")
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def _path(self, name: str) -> Path:
        self._n += 1
        d = self.workdir / f"{self._n:04d}"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    @property
    def model_name(self) -> str:
        from ..core.models import model_name

        return model_name(self.editor.model)

    @property
    def has_chat_template(self) -> bool:
        from ..core.chat import has_chat_template

        return has_chat_template(self.editor.tokenizer)

    def config(self, method: str, layer=None):
        """The method's config with the session's statistics (bad method or layer raise here)."""
        overrides = {k: v for k, v in self.stats.items() if v is not None}
        if layer not in (None, ""):
            overrides["layer"] = _layer(layer)
        return self.editor.make_config(method, **overrides)

    def default_layers(self, method: str) -> List[int]:
        """The layers ``method`` edits by default on this model (the depth rule)."""
        return list(self.config(method).layers)

    # ------------------------------------------------------------------ locate
    def locate(self, prompt: str, subject: str, answer: Optional[str] = None, samples: int = 10,
               progress: Progress = _quiet) -> dict:
        """Causal trace of one prompt: the trace (``factedit trace --json``), the three heatmaps' paths
        and the recommended layer (the strongest MLP effect at the last subject token)."""
        from ..trace.causal import TraceConfig, trace_prompt
        from ..trace.plots import plot_trace

        prompt, subject = _text(prompt, "prompt"), _text(subject, "subject")
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject)
        if subject not in prompt:
            raise RequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        cfg = TraceConfig(samples=int(samples)).check(self.editor.adapter.n_layers)
        with self.exclusive(progress):
            t = time.perf_counter()
            progress(0.0, "tracing")
            result = trace_prompt(self.editor.adapter, prompt, subject, (answer or "").strip() or None, cfg,
                                  on_progress=lambda d, n: progress(d / n, f"restored {d} of {n} states"))
            obj = {"model": self.model_name, **result.to_dict(), "seconds": round(time.perf_counter() - t, 2)}
        out = self._path("trace.json")
        out.write_text(json.dumps(obj), encoding="utf-8")
        obj["images"] = {k: str(plot_trace(obj, k, out.parent / f"{k}.png", model=obj["model"])) for k in cfg.kinds}
        return obj

    # ------------------------------------------------------------------ edit
    def edit(self, prompt: str, subject: str, target: str, true: Optional[str] = None, method: str = "r-rome",
             layer=None, paraphrases: Sequence[str] = (), chat: bool = False, keep_unverified: bool = False,
             guard: bool = True, max_new_tokens: int = 12, side_effects: bool = True,
             progress: Progress = _quiet) -> dict:
        """One edit with its before/after report (:func:`factedit.report.edit_report`, what
        ``factedit edit --json`` prints). An edit that did not take is reverted unless
        ``keep_unverified`` (the command line refuses it the same way); ``report["kept"]`` says which."""
        from ..edit.guard import GuardConfig
        from ..report import edit_prompts, edit_report

        shown = Request.from_filled(_text(prompt, "prompt"), _text(subject, "subject"), target or "",
                                    (true or "").strip() or None)
        paraphrases = [p.strip() for p in paraphrases if p and p.strip()]
        cfg = self.config(method, layer)
        if chat and not self.has_chat_template:
            raise RequestError("this model's tokenizer has no chat template; edit without 'as a chat turn'")
        with self.exclusive(progress):
            editor = self._chat_editor() if chat else self.editor
            if chat:  # the session's edits changed the weights behind the chat editor's guard
                editor.guard.forget()
            req, names, prompts = edit_prompts(editor, shown, chat=chat, paraphrases=paraphrases)
            progress(None, "optimising the new value and applying the edit")
            with reporting(_steps(progress)):
                result, report = edit_report(editor, req, cfg, shown=shown, prompts=prompts, chat=chat,
                                             guard=GuardConfig(enabled=guard), max_new_tokens=max_new_tokens,
                                             side_effects=side_effects, bank=self.bank)
            if chat:  # the chat editor shares the model; its edit (and method state) joins the session's history
                self.editor.adopt(editor)
            report["prompts"] = names
            report["kept"] = bool(result.verified) or keep_unverified
            if not report["kept"]:
                self.editor.revert()
        return report

    def _chat_editor(self):
        """An editor over the same model that reads prompts without a prefix (chat markup starts them)."""
        from ..core.tokens import source_tokenizer
        from ..editor import Editor

        if self._chat is None:
            self._chat = Editor(self.editor.model, source_tokenizer(self.editor.tokenizer),
                                arch=self.editor.adapter.spec, progress=self.editor.progress, prompt_prefix="none")
        return self._chat

    def batch(self, path, method: str = "memit", layer=None, limit: Optional[int] = None, guard: bool = True,
              progress: Progress = _quiet) -> dict:
        """Edit the requests of a file (JSONL/JSON, factedit or either CounterFact layout) in one call
        (:func:`factedit.report.batch_report`, what ``factedit edit --requests --json`` prints)."""
        from ..core.request_files import load_requests
        from ..edit.guard import GuardConfig
        from ..report import batch_report

        if not path:
            raise RequestError("choose a requests file first")
        reqs = load_requests(path, limit=int(limit) if limit else None)
        cfg = self.config(method, layer)
        with self.exclusive(progress):
            progress(None, f"editing {len(reqs)} requests")
            with reporting(_steps(progress)):
                _, report = batch_report(self.editor, reqs, cfg, guard=GuardConfig(enabled=guard))
        return report

    # ------------------------------------------------------------------ the stack of edits
    def history(self) -> List[dict]:
        """The applied edits, oldest first: number, method, layers, facts, ‖Δ‖, verified."""
        rows = []
        for i, r in enumerate(self.editor.history):
            facts = "; ".join(f"{q.text} -> {q.target_new}" for q in r.requests[:3])
            if len(r.requests) > 3:
                facts += f"; ... ({len(r.requests)} requests)"
            rows.append({"edit": i + 1, "method": r.method, "layers": ",".join(map(str, r.layers)), "facts": facts,
                         "delta_norm": round(r.delta_norm, 4), "verified": r.verified})
        return rows

    def _result(self, number) -> object:
        n = len(self.editor.history)
        try:
            i = int(number)
        except (TypeError, ValueError):
            raise FactEditError(f"choose an edit number (1..{n})") from None
        if not 1 <= i <= n:
            raise FactEditError(f"no edit number {i}: the session holds {n} edit(s)" if n else
                                "the session holds no edits")
        return self.editor.history[i - 1]

    def _patch(self, number):
        from ..patch.files import Patch

        return Patch.from_result(self._result(number), self.editor.adapter)

    def inspect(self, number) -> dict:
        """What edit ``number`` changes (``factedit inspect --json`` of its patch)."""
        return self._patch(number).describe()

    def revert(self, n: int = 1, progress: Progress = _quiet) -> int:
        """Undo the last ``n`` edits (bit-exact); returns how many remain."""
        from ..core.errors import MethodError

        n = _whole(n, "the number of edits to revert", MethodError, minimum=1)
        with self.exclusive(progress):
            self.editor.revert(n)
        return len(self.editor.history)

    def download_patch(self, number) -> str:
        """Edit ``number`` written as a patch file (``factedit apply`` reads it)."""
        p = self._patch(number)
        return str(p.save(self._path(f"edit{int(number)}-{p.meta.get('method', 'patch')}.safetensors")))

    def download_peft(self, vllm: bool = False, progress: Progress = _quiet) -> str:
        """Every edit of the session as one PEFT LoRA adapter (``factedit export --peft``), zipped."""
        from ..patch.files import Patch
        from ..patch.peft import export_peft

        if not self.editor.history:
            raise FactEditError("the session holds no edits to export")
        with self.exclusive(progress):
            patches = [Patch.from_result(r, self.editor.adapter) for r in self.editor.history]
            folder = self._path("adapter")
            export_peft(self.editor.adapter, patches, folder, vllm=vllm, applied=True)
        archive = shutil.make_archive(str(folder.parent / "factedit-peft-adapter"), "zip", folder)
        return archive

    def upload_patch(self, path, force: bool = False, progress: Progress = _quiet) -> dict:
        """Apply a patch file on top of the session's edits (shapes and base fingerprints checked; refused
        patches leave the model as it was); it joins the stack."""
        from ..patch.files import Patch

        if not path:
            raise FactEditError("choose a patch file first")
        patch = Patch.load(path)
        with self.exclusive(progress):
            self.editor.apply_patches([patch], force=force)
        return patch.describe()

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, dataset, n: int = 10, method: str = "r-rome", layer=None, ge: bool = False,
                 on_update: Optional[Callable[[dict, List[dict]], None]] = None, progress: Progress = _quiet) -> dict:
        """Evaluate ``method`` on the first ``n`` records of a CounterFact / zsRE file, each edit from the
        session's weights (``factedit eval``; a run directory under the work folder). ``on_update(summary,
        records)`` is called as cases complete. The session must hold no edits (as ``factedit eval``
        evaluates the model it loads)."""
        from ..evaluation import EvalConfig, GenerationConfig, run_eval
        from ..evaluation.scoring import summarize_records
        from ..evaluation.store import read_jsonl

        if not dataset:
            raise RequestError("choose a CounterFact or zsRE file first")
        n = _whole(n, "the number of records", RequestError, minimum=1)
        options = {k: v for k, v in self.stats.items() if v is not None}
        if layer not in (None, ""):
            options["layer"] = _layer(layer)
        cfg = EvalConfig(method=method, dataset=str(dataset), limit=n, chunk=min(5, n),
                         generation=GenerationConfig(length=100 if ge else 0),
                         method_options=tuple(sorted(options.items())))
        cfg.check()
        out = self._path("run")
        with self.exclusive(progress):
            if self.editor.history:
                raise FactEditError(f"the session holds {len(self.editor.history)} edit(s): revert them first, "
                                    "evaluation starts from the model's original weights")

            def group_done(done: int, total: int) -> None:
                records, _ = read_jsonl(out / "cases.jsonl")
                progress(done / total, f"{done} of {total} cases")
                if on_update is not None:
                    on_update(summarize_records(records), records)

            summary = run_eval(self.editor, cfg, out, on_group=group_done)
        return {"summary": summary, "run": str(out)}


def _steps(progress: Progress):
    """A :func:`~factedit.core.progress.reporting` listener that moves the page's progress bar."""
    return lambda stage, done, total: progress(done / max(1, total), f"{stage}: {done} of {total}")


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"the {name} is empty")
    return value


def _whole(value, name: str, error, minimum: Optional[int] = None) -> int:
    """``value`` (a form field) as an int, or ``error`` naming ``name``."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a whole number, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise error(f"{name} must be at least {minimum}, got {n}")
    return n


def _layer(value) -> int:
    from ..core.errors import LayerError

    return _whole(value, "the layer", LayerError)


def result_message(report: dict) -> str:
    """One line on whether an edit took and what happened to it."""
    if report["kept"] and report["verified"]:
        return "The edit took" + (" (after a retry)" if report.get("retried") else "") + " and is applied."
    if report["kept"]:
        return "The edit did NOT take on its own prompt; it is applied because 'keep an edit that did not take' is on."
    return ("The edit did NOT take on its own prompt (the new target is neither the greedy continuation nor likely "
            "enough, or the true target still wins); it was reverted: the model is unchanged. Try another layer, "
            "or keep it anyway.")

