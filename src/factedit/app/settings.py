"""What a user gave one command or page form, and the typed objects it becomes: the model to load
(:class:`ModelOptions`), the method (:class:`~factedit.edit.methods.options.MethodOptions`), how an edit
is shown and kept (:class:`EditSettings`), an evaluation run (:class:`~factedit.evaluation.EvalConfig`).
The command line and the web page build these the same way, from the declarations of
:mod:`factedit.app.options`.

    settings = Settings("edit", {"method": "memit", "stats_seq_len": 128})
    settings.method.stats_seq_len == 128
    model, tok = settings.model.load()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ..core.errors import FactEditError, MethodError
from ..edit.methods.options import MethodOptions, parse_options
from .options import defaults_of, options_of

__all__ = ["Settings", "ModelOptions", "EditSettings"]


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how (every command that loads one; ``factedit edit --help`` explains each)."""

    model: Optional[str] = None
    dtype: str = "float32"
    device: Optional[str] = None
    device_map: Optional[str] = None
    max_memory: Optional[str] = None
    offload_folder: Optional[str] = None
    arch_spec: Optional[str] = None
    prompt_prefix: str = "auto"

    def load(self):
        """``(model, tokenizer)``; placement options checked before anything loads."""
        from ..core.errors import ModelLoadError
        from ..core.models import load_model, parse_device_map, parse_max_memory

        device_map = parse_device_map(self.device_map)
        max_memory = parse_max_memory(self.max_memory)
        if max_memory and device_map is None:
            raise ModelLoadError("--max-memory needs --device-map (e.g. --device-map auto)")
        if device_map is not None and self.device is not None:
            raise ModelLoadError("give --device or --device-map, not both")
        device = self.device
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: each rank its own GPU
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return load_model(self.model, dtype=self.dtype, device=device, device_map=device_map,
                          max_memory=max_memory, offload_folder=self.offload_folder)

    def arch(self):
        """The :class:`~factedit.core.arch.ArchSpec` in the ``arch_spec`` JSON file, or ``None``."""
        if not self.arch_spec:
            return None
        import json

        from ..core.arch import ArchSpec
        from ..core.errors import ArchitectureError

        try:
            return ArchSpec(**json.loads(open(self.arch_spec, encoding="utf-8").read()))
        except (OSError, ValueError, TypeError) as e:
            raise ArchitectureError(f"cannot read architecture spec {self.arch_spec}: {e}") from None

    def adapter(self, model, tokenizer):
        from ..core.arch import ModelAdapter

        return ModelAdapter(model, tokenizer, self.arch(), self.prompt_prefix)

    def editor(self, model, tokenizer, progress: bool = True, prompt_prefix: Optional[str] = None):
        """An :class:`~factedit.Editor` over the loaded model (``prompt_prefix`` overrides the option)."""
        from ..editor import Editor

        return Editor(model, tokenizer, arch=self.arch(), progress=progress,
                      prompt_prefix=self.prompt_prefix if prompt_prefix is None else prompt_prefix)


@dataclass(frozen=True)
class EditSettings:
    """What an edit shows and what is kept of it (``factedit edit`` and the page's Edit and Batch tabs).

    Attributes:
        prompt, subject, target, true: the fact (all ``None``: the demo edit); ``requests``: a file of them
            instead, ``limit``: its first N.
        paraphrases: extra prompts shown before and after (empty: two rephrasings).
        max_new_tokens: tokens of each continuation shown.
        chat: edit the fact as a chat turn.
        allow_unverified: keep (and save) an edit that did not take on its own prompt.
        side_effects: measure the blast radius; ``side_effects_bank``: its known-facts file.
        strict: refuse (exit 2, nothing saved; the page reverts it) an edit whose blast radius is flagged.
        guard: run the collapse guard.
        save_patch, save_model: where the edit is written; ``sign_key``: a private key that signs what is written.
    """

    prompt: Optional[str] = None
    subject: Optional[str] = None
    target: Optional[str] = None
    true: Optional[str] = None
    requests: Optional[str] = None
    limit: Optional[int] = None
    paraphrases: Tuple[str, ...] = ()
    max_new_tokens: int = 12
    chat: bool = False
    allow_unverified: bool = False
    side_effects: bool = True
    side_effects_bank: Optional[str] = None
    strict: bool = False
    guard: bool = True
    save_patch: Optional[str] = None
    save_model: Optional[str] = None
    sign_key: Optional[str] = None

    @property
    def bank_path(self) -> Optional[str]:
        """The known-facts file of the side-effect probes (``$FACTEDIT_KNOWNS`` when not given)."""
        return self.side_effects_bank or os.environ.get("FACTEDIT_KNOWNS")


class Settings:
    """The values of one command's (or page form's) options, every declared option present (at its default
    when not given), and the typed objects they make. ``base``: the settings a page form inherits what it
    lacks from (the ``factedit ui`` command's: statistics, side-effect bank)."""

    def __init__(self, where: str, values: Mapping[str, Any] = (), base: Optional["Settings"] = None):
        values = dict(values)
        names = {o.name for o in options_of(where)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FactEditError(f"{where} has no option {unknown[0]!r}")
        self.where = where
        self.base = base
        self.values = {**defaults_of(where), **values}

    def get(self, name: str, default: Any = None) -> Any:
        """The value of option ``name`` (``default`` when it is ``None`` or the form does not have it; a page
        form falls back on :attr:`base`)."""
        if name in self.values:
            value = self.values[name]
            return default if value is None else value
        if self.base is not None:
            return self.base.get(name, default)
        return default

    def has(self, name: str) -> bool:
        """The form (or its :attr:`base`) has option ``name``."""
        return name in self.values or (self.base is not None and self.base.has(name))

    def __getitem__(self, name: str) -> Any:
        if not self.has(name):
            raise KeyError(f"{self.where} has no option {name!r}")
        return self.get(name)

    def _pick(self, names) -> dict:
        """The options among ``names`` that have a value (the others keep the typed object's defaults)."""
        return {n: self.get(n) for n in names if self.get(n) is not None}

    # ------------------------------------------------------------------ typed views
    @property
    def model(self) -> ModelOptions:
        return ModelOptions(**self._pick(ModelOptions.__dataclass_fields__))

    @property
    def method(self) -> MethodOptions:
        """The method options (what :meth:`Editor.make_config` takes). In ``eval``, ``--target-batch`` of a
        single-request method sets the run's prefetch instead (:attr:`prefetch_batch`)."""
        own = self._pick(("layer", "layers", "steps", "seed", "stats_corpus", "stats_tokens", "stats_seq_len",
                          "stats_dtype"))
        method = self.get("method")
        batch = self.get("target_batch")
        if batch is not None and not (self.where == "eval" and self._single_request(method)):
            own["target_batch"] = batch
        if own.get("layer") == "":
            own.pop("layer")
        hparams = self.get("hparams")
        if hparams:  # the file names the method (read now: a bad file fails before any work); a --method other
            from ..edit.methods.hparams import read_hparams  # than the default must agree with it
            from ..edit.methods.registry import default_method

            found = read_hparams(hparams).method
            if not method or method == default_method():
                method = found
        return MethodOptions(method=method or "r-rome", fields=parse_options(self.get("fields") or ()), hparams=hparams,
                             **own)

    @property
    def prefetch_batch(self) -> int:
        """``eval``: targets of this many single edits optimised together (``--target-batch`` of a
        single-request method; 1 otherwise)."""
        batch = self.get("target_batch")
        return batch if batch is not None and self._single_request(self.get("method")) else 1

    @staticmethod
    def _single_request(method: Optional[str]) -> bool:
        from ..edit.methods.registry import REGISTRY

        spec = REGISTRY.get(method or "")
        return spec is not None and spec.single_request

    @property
    def edit(self) -> EditSettings:
        values = self._pick(EditSettings.__dataclass_fields__)
        values["paraphrases"] = tuple(p for p in (self.get("paraphrases") or ()) if p and p.strip())
        return EditSettings(**values)

    @property
    def eval(self):
        """The :class:`~factedit.evaluation.EvalConfig` of ``factedit eval`` (and the page's Evaluate tab)."""
        from ..evaluation import DownstreamConfig, EvalConfig, GenerationConfig
        from ..evaluation.ability import AbilityConfig

        g = self.get
        method = g("method")
        if g("hparams") and method != "none":
            method = self.method.method  # the file's method unless --method names another
        if method != "none" and self._batchless(method) and g("target_batch") is not None:
            raise MethodError(f"{method} optimises no targets together; --target-batch is for the other methods")
        return EvalConfig(
            method=method, dataset=g("dataset") or "", dataset_sha256=g("dataset_sha256"), limit=g("limit"),
            offset=g("offset", 0), cases_per_edit=g("cases_per_edit", 1), sequential=bool(g("sequential")),
            downstream_dir=g("downstream_dir"), downstream_every=g("downstream_every"),
            downstream=DownstreamConfig(n=g("downstream_n", 100), shots=g("downstream_shots", 3)),
            retention_sample=g("retention_sample", 0), checkpoints=tuple(g("checkpoints") or ()),
            score_every=g("score_every", 1), score_sample=g("score_sample", 0), stop_ppl=g("stop_ppl"),
            stop_recall=g("stop_recall"),
            generation=GenerationConfig(length=g("ge_length", 100), max_prompts=g("ge_prompts", 10), seed=g("seed", 0)),
            ability=AbilityConfig(ppl_corpus=g("ppl_corpus"), ppl_tokens=g("ppl_tokens", 20_000), knowns=g("knowns")),
            score_batch=g("score_batch", 64), gen_tokens=g("gen_tokens", 50), gen_chat=bool(g("gen_chat")),
            chunk=g("chunk", 25), prefetch_batch=self.prefetch_batch, guard=bool(g("guard")), verify=bool(g("verify")),
            method_options=self.method.to_pairs())

    @staticmethod
    def _batchless(method: str) -> bool:
        from ..edit.methods.registry import REGISTRY

        spec = REGISTRY.get(method)
        return spec is not None and not spec.single_request and "batch_size" not in spec.field_names

