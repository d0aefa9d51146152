"""What ``factedit ui`` and ``factedit shell`` do with their one model, without any web or terminal code:
locate, edit, batch-edit, the stack of edits (inspect, revert, download, upload) and evaluation. A form's
values become :class:`~factedit.app.settings.Settings` as a command line's do (what the ``ui`` or ``shell``
command was given — statistics, side-effect bank — fills in what a form lacks), and every call goes through the same
functions as the command line (:mod:`factedit.app.edit`, :func:`~factedit.trace.causal.trace_prompt`,
:func:`~factedit.evaluation.run_eval`, :mod:`factedit.patch`), holding the session's lock while it
reads or writes the model: two browser tabs never interleave half-applied edits.

Errors the user can fix raise :class:`~factedit.core.errors.FactEditError` (the page shows the
message); the model is then as it was before the call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Union

from ..core.errors import FactEditError, RequestError
from ..core.progress import reporting
from .settings import Settings

__all__ = ["Session", "Progress"]

Form = Union[Settings, Mapping[str, Any]]

#: ``progress(fraction, message)``: how far a long call is (``fraction`` None: no measure yet)
Progress = Callable[[Optional[float], str], None]


def _quiet(fraction, message) -> None:
    pass


class Session:
    """The model the page edits, its editor, and the lock that serialises work on them.

    Args:
        editor: an :class:`~factedit.Editor` over the loaded model.
        settings: the ``factedit ui`` command's :class:`~factedit.app.settings.Settings` (statistics, side-effect
            bank, the Evaluate tab's data set); a form's settings fall back on them.
        workdir: where heatmaps, downloads and evaluation runs are written (default: a temporary folder).
        bank: the side-effect probes' :class:`~factedit.app.side_effects.Bank` (default: the settings' file, else
            the built-in one).
    """

    def __init__(self, editor, settings: Optional[Settings] = None, workdir=None, bank=None):
        from .side_effects import load_bank

        self.editor = editor
        self.settings = settings or Settings("ui")
        self.bank = bank or load_bank(self.settings.edit.bank_path)
        self.dataset = self.settings.get("eval_dataset") or os.environ.get("FACTEDIT_DATASET") or ""
        self.workdir = Path(workdir or self.settings.get("workdir") or tempfile.mkdtemp(prefix="factedit-ui-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._n = 0  # files written, for unique names
        self._chat = None  # the editor of chat-turn edits (made on first use)

    def form(self, name: str, values: Form) -> Settings:
        """The settings of page form ``name`` (``"page.edit"``, ...) from its values."""
        if isinstance(values, Settings):
            return values
        return Settings(name, values, base=self.settings)

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

    def config(self, method: str, **values):
        """The config of ``method`` as the Edit form makes it (the session's statistics; ``values``: other
        fields of the form, e.g. ``layer=3``); bad methods and layers raise here."""
        return self.editor.make_config(self.form("page.edit", {"method": method, **values}).method)

    def default_layers(self, method: str) -> List[int]:
        """The layers ``method`` edits by default on this model (the depth rule)."""
        return list(self.config(method).layers)

    # ------------------------------------------------------------------ locate
    def locate(self, values: Form, progress: Progress = _quiet) -> dict:
        """Causal trace of one prompt (form ``page.locate``): the trace (``factedit trace --json``), the three
        heatmaps' paths and the recommended layer (the strongest MLP effect at the last subject token)."""
        from ..trace.causal import TraceConfig, trace_prompt
        from ..trace.plots import plot_trace

        f = self.form("page.locate", values)
        prompt, subject = _text(f["prompt"], "prompt"), _text(f["subject"], "subject")
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject)
        if subject not in prompt:
            raise RequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        cfg = TraceConfig(samples=f["samples"]).check(self.editor.adapter.n_layers)
        with self.exclusive(progress):
            t = time.perf_counter()
            progress(0.0, "tracing")
            result = trace_prompt(self.editor.adapter, prompt, subject, (f["answer"] or "").strip() or None, cfg,
                                  on_progress=lambda d, n: progress(d / n, f"restored {d} of {n} states"))
            obj = {"model": self.model_name, **result.to_dict(), "seconds": round(time.perf_counter() - t, 2)}
        out = self._path("trace.json")
        out.write_text(json.dumps(obj), encoding="utf-8")
        obj["images"] = {k: str(plot_trace(obj, k, out.parent / f"{k}.png", model=obj["model"])) for k in cfg.kinds}
        return obj

    # ------------------------------------------------------------------ edit
    def edit(self, values: Form, progress: Progress = _quiet):
        """One edit with its before/after report (form ``page.edit``; :func:`factedit.app.edit.edit_fact`, what
        ``factedit edit --json`` prints). An edit that did not take is reverted unless ``allow_unverified``
        (the command line refuses it the same way); ``report.kept`` says which."""
        from .edit import edit_fact, flagged, request_of, save_outputs

        f = self.form("page.edit", values)
        es, options = f.edit, f.method
        request_of(es)  # a bad request fails before the lock
        cfg = self.editor.make_config(options)
        if es.chat and not self.has_chat_template:
            raise RequestError("this model's tokenizer has no chat template; edit without 'as a chat turn'")
        with self.exclusive(progress):
            editor = self._chat_editor() if es.chat else self.editor
            if es.chat:  # the session's edits changed the weights behind the chat editor's guard
                editor.guard.forget()
            progress(None, "optimising the new value and applying the edit")
            with reporting(_steps(progress)):
                result, report = edit_fact(editor, options, es, config=cfg, bank=self.bank)
            if es.chat:  # the chat editor shares the model; its edit (and method state) joins the session's history
                self.editor.adopt(editor)
            report.kept = (bool(result.verified) or es.allow_unverified) and not flagged(result, es)
            if not report.kept:
                self.editor.revert()
            elif es.save_patch or es.save_model:  # the shell's `edit --save-patch`
                report.saved = save_outputs(self.editor, result, es)
        return report

    def _chat_editor(self):
        """An editor over the same model that reads prompts without a prefix (chat markup starts them)."""
        from ..core.tokens import source_tokenizer
        from ..editor import Editor

        if self._chat is None:
            self._chat = Editor(self.editor.model, source_tokenizer(self.editor.tokenizer),
                                arch=self.editor.adapter.spec, progress=self.editor.progress, prompt_prefix="none")
        return self._chat

    def batch(self, values: Form, progress: Progress = _quiet):
        """Edit the requests of a file (form ``page.batch``: JSONL/JSON, factedit or either CounterFact layout)
        in one call (:func:`factedit.app.edit.edit_batch`, what ``factedit edit --requests --json`` prints)."""
        from ..core.request_files import load_requests
        from .edit import edit_batch

        f = self.form("page.batch", values)
        es, options = f.edit, f.method
        if not es.requests:
            raise RequestError("choose a requests file first")
        requests = load_requests(es.requests, limit=es.limit)  # a bad file fails before the lock
        cfg = self.editor.make_config(options)
        with self.exclusive(progress):
            progress(None, f"editing {len(requests)} requests")
            with reporting(_steps(progress)):
                _, report = edit_batch(self.editor, options, es, config=cfg, requests=requests)
        return report

    # ------------------------------------------------------------------ audit
    def audit(self, values: Form, progress: Progress = _quiet):
        """Audit a suspect checkpoint (form ``page.audit``; :func:`factedit.app.audit.audit_checkpoint`, what
        ``factedit audit --json`` prints) against the base given, else the files this page's model was loaded
        from. Returns ``(report, path of the extracted patch or None)``. The explanation reads the page's model
        when it is the base and holds no edits; otherwise the base is loaded beside it."""
        from ..core.models import model_source
        from .audit import audit_checkpoint

        f = self.form("page.audit", values)  # checked by audit_checkpoint before any work
        own = not f["base"]
        if own:
            where = model_source(self.editor.model).get("local_path")
            if not where:
                raise FactEditError("this page's model was not loaded from files factedit knows; give the base "
                                    "model's path")
            f = self.form("page.audit", {**f.values, "base": where})
        target = self._path("audit-extracted.safetensors")
        with self.exclusive(progress):
            progress(None, "comparing the checkpoints tensor by tensor")
            here = own and not self.editor.history
            return audit_checkpoint(f, model=self.editor.model if here else None,
                                    tokenizer=self.editor.tokenizer if here else None, extract_to=target)

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

    def upload_patch(self, paths, force: bool = False, progress: Progress = _quiet) -> dict:
        """Apply an uploaded patch file (``paths``: the patch, and its ``.sig`` when signed) on top of the
        session's edits, as ``factedit apply`` does: its signature checked against the ``ui`` command's trusted
        keys (refused when invalid, or when missing under ``--require-signature``), its claims replayed
        (refused when its delta does not do what it says, unless ``force``), shapes and base fingerprints
        checked; a refused patch leaves the model as it was. It joins the stack."""
        from ..core.signing import require, signature_path, trust_anchors
        from ..patch.claims import check_claims
        from ..patch.files import Patch, PatchError

        files = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else list(paths or []))]
        patches = [f for f in files if f.suffix != ".sig"]
        if len(patches) != 1:
            raise FactEditError("choose one patch file (and its .sig file, when it is signed)")
        path = patches[0]
        for sig in (f for f in files if f.suffix == ".sig"):  # uploads land in separate folders: put it beside
            if sig.resolve() != signature_path(path).resolve():
                shutil.copyfile(sig, signature_path(path))
        status = require(path, trust_anchors(self.settings.get("trust") or ()),
                         bool(self.settings.get("require_signature")))
        patch = Patch.load(path)
        with self.exclusive(progress):
            claims = check_claims(self.editor.adapter, patch)
            if claims.checked and not claims.ok and not force:
                raise PatchError(f"{path.name}: {claims.describe()}; nothing was applied (tick 'apply anyway' to "
                                 "force it)")
            self.editor.apply_patches([patch], force=force)
        return {**patch.describe(), "signature": status.to_dict(), "claims": claims.to_dict()}

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, values: Form, on_update: Optional[Callable[[dict, List[dict]], None]] = None,
                 progress: Progress = _quiet) -> dict:
        """Evaluate a method on the first ``limit`` records of a CounterFact / zsRE file (form ``page.evaluate``),
        each edit from the session's weights (``factedit eval``; a run directory under the work folder).
        ``on_update(summary, records)`` is called as cases complete. The session must hold no edits (as
        ``factedit eval`` evaluates the model it loads)."""
        from ..evaluation import run_eval
        from ..evaluation.scoring import summarize_records
        from ..evaluation.store import read_jsonl

        cfg = self.form("page.evaluate", values).eval
        if not cfg.dataset:
            raise RequestError("choose a CounterFact or zsRE file first")
        n = cfg.limit
        if n is None or n < 1:
            raise RequestError(f"the number of records must be at least 1, got {n}")
        cfg = replace(cfg, chunk=min(5, n))  # the page shows progress every few cases
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
