"""Every user-facing option, declared once: name, flags, type, default, help, and the commands and page
forms that have it. The command line's argparse options (:func:`add_arguments`) and the web page's
controls (:mod:`factedit.ui.controls`) are both built from :data:`OPTIONS`; what a user gave comes back as
one :class:`~factedit.app.settings.Settings` whichever front end took it.

    parser = argparse.ArgumentParser()
    add_arguments(parser, "edit")                   # --prompt ... --stats-seq-len ... --json
    settings = Settings("edit", vars(parser.parse_args(argv)))
    settings.method                                  # MethodOptions(method="r-rome", stats_seq_len=..., ...)

A name means one thing everywhere: ``--target-batch`` is "targets optimised together" and
``--cases-per-edit`` "cases edited in one call" (``eval``); the collapse guard is ``--guard`` /
``--no-guard`` in every command. Old spellings (:attr:`Option.deprecated`) still work and print a
one-line notice.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

__all__ = ["Option", "OPTIONS", "COMMANDS", "FORMS", "options_of", "option", "add_arguments", "add_program_arguments",
           "defaults_of",
           "layer_arg", "layers_arg", "method_choices"]

#: the commands of the command line, in the order ``factedit --help`` lists them
COMMANDS = ("edit", "shell", "stats", "apply", "revert", "inspect", "export", "import", "trace", "eval", "summarize",
            "capacity", "audit", "hparams", "ui", "keygen", "sign", "verify")
#: the forms of the web page (one per tab that takes input)
FORMS = ("page.locate", "page.edit", "page.batch", "page.evaluate", "page.audit")


# ---------------------------------------------------------------------- argument types
def layer_arg(text: str):
    """A layer number, or ``traced`` (the cached causal-trace recommendation)."""
    if str(text).strip() == "traced":
        return "traced"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes a layer number or 'traced', got {text!r}") from None


def layers_arg(text: str) -> Tuple[int, ...]:
    """``"3,4,5"`` -> ``(3, 4, 5)``."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None


def _kinds(text: str):
    from ..trace.causal import KINDS

    kinds = KINDS if text == "all" else tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"--kind must be hidden, mlp, attn, all or a comma list; got {text!r}")
    return tuple(kinds)


def _classes(text: str):
    from ..trace.causal import TOKEN_CLASSES

    classes = tuple(c.strip() for c in text.split(",") if c.strip())
    if not classes or set(classes) - set(TOKEN_CLASSES):
        raise argparse.ArgumentTypeError(f"--classes must be a comma list of {', '.join(TOKEN_CLASSES)}; got {text!r}")
    return classes


def method_choices(baseline: bool = False) -> List[str]:
    """The registered editing methods, the default first (``baseline``: and ``none``, the unedited model)."""
    from ..edit.methods.registry import method_names

    return method_names() + (["none"] if baseline else [])


def _method_help(where: str) -> str:
    names = method_choices()
    shown = [f"{names[0]} (default)"] + names[1:] + (["none (the unedited baseline)"] if where == "eval" else [])
    return ", ".join(shown)


def _default_method() -> str:
    from ..edit.methods.registry import default_method

    return default_method()


# ---------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class Option:
    """One user-facing option.

    Attributes:
        name: the value's name in :class:`~factedit.app.settings.Settings` (argparse ``dest``); one meaning.
        flags: its spellings on the command line (``()``: a positional argument).
        help: what it does: a text, ``{command: text}`` where commands phrase it differently (``""``: the
            others), or ``where -> text`` for texts built from the registry.
        on: the commands and page forms that have it.
        type: converts a command-line text (argparse ``type``).
        default: its default (a callable: computed when used, e.g. the registry's default method).
        defaults: per command or form, a default other than ``default``.
        kind: ``"value"``; ``"flag"`` (present or not); ``"switch"`` (``--x`` / ``--no-x``); ``"append"``
            (repeatable); ``"positional"`` (``nargs`` values).
        choices: the values it takes; a callable (the registry's methods) is what the page offers, the library
            checks the command line's value (with its own error message).
        metavar, nargs: as argparse has them.
        required: the commands where it must be given.
        deprecated: old spelling -> the commands where it is still accepted (with a one-line notice).
        label: the short label of its control on the web page.
        example: a value other than the default, as the command line would give it (tests feed every
            option one, to see it reach what the command builds).
        blank: what the page's control holds when the user left it empty (a number field sends 0), read as
            ``None``.
    """

    name: str
    flags: Tuple[str, ...]
    help: Any
    on: Tuple[str, ...]
    type: Optional[Callable] = None
    default: Any = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "value"
    choices: Any = None
    metavar: Optional[str] = None
    nargs: Optional[str] = None
    required: Tuple[str, ...] = ()
    deprecated: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    label: str = ""
    example: Any = None
    blank: Any = None

    def help_text(self, where: str = "") -> str:
        if callable(self.help):
            return self.help(where)
        if isinstance(self.help, Mapping):
            return self.help.get(where, self.help.get("", ""))
        return self.help

    def default_for(self, where: str):
        value = self.defaults.get(where, self.default)
        return value() if callable(value) else value

    def choices_list(self):
        return self.choices() if callable(self.choices) else self.choices

    def from_form(self, value):
        """A page control's value as this option's value (an empty field: ``None``, the default); a value that
        does not convert is a :class:`~factedit.core.errors.FactEditError` naming the field."""
        from ..core.errors import FactEditError

        if self.kind in ("flag", "switch"):
            return bool(value)
        if self.kind == "append":
            lines = value.splitlines() if isinstance(value, str) else list(value or ())
            return [x for x in lines if x and x.strip()]
        if value is None or value == "" or (self.blank is not None and value == self.blank):
            return None
        if isinstance(value, str) and not value.strip():  # blank: empty for a number, as typed for a text
            return None if self.type is not None else value
        if isinstance(value, float) and value.is_integer() and self.type in (int, layer_arg):
            value = int(value)
        if self.type is None or not isinstance(value, str):
            return value if self.type is not int or isinstance(value, int) else _as_int(value, self)
        try:
            return self.type(value.strip())
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise FactEditError(f"{self.label or self.name}: {e}") from None

    def add_to(self, parser: argparse.ArgumentParser, command: str) -> None:
        """Add this option to ``command``'s parser (with its deprecated spellings there)."""
        old = tuple(f for f, cmds in self.deprecated.items() if command in cmds)
        kw: Dict[str, Any] = {"help": self.help_text(command).replace("%", "%%")}  # argparse formats help with %
        default = self.default_for(command)
        if self.kind == "positional":
            parser.add_argument(self.name, nargs=self.nargs, help=kw["help"], metavar=self.metavar)
            return
        kw.update(dest=self.name, default=default)
        kw["action"] = _BASE[self.kind]
        if self.kind == "value":
            kw["required"] = command in self.required
            if self.nargs is not None:
                kw["nargs"] = self.nargs
        if self.kind in ("value", "append"):
            if self.type is not None:
                kw["type"] = self.type
            if self.choices is not None and not callable(self.choices):
                kw["choices"] = self.choices
            if self.metavar is not None:
                kw["metavar"] = self.metavar
        parser.add_argument(*self.flags, **kw)
        for flag in old:  # accepted, not shown in the help
            hidden = {**kw, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS,
                      "action": _Deprecating.of((flag,), _BASE[self.kind], new=self.flags[0])}
            hidden.pop("required", None)
            parser.add_argument(flag, **hidden)


def _as_int(value, opt: "Option") -> int:
    from ..core.errors import FactEditError

    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise FactEditError(f"{opt.label or opt.name} must be a whole number, got {value!r}")


class _Deprecating:
    """An argparse action that says, once, that an old spelling was used."""

    @staticmethod
    def of(old: Tuple[str, ...], base, new: str = ""):
        if not old:
            return base

        class Action(base):
            def __call__(self, parser, namespace, values, option_string=None):
                if option_string in old:
                    print(f"factedit: note: {option_string} is deprecated; use {new}", file=sys.stderr)
                super().__call__(parser, namespace, values, option_string)

        return Action


_BASE = {"flag": argparse._StoreTrueAction, "switch": argparse.BooleanOptionalAction,
         "append": argparse._AppendAction, "value": argparse._StoreAction}


# ---------------------------------------------------------------------- the options
_MODEL = ("edit", "shell", "stats", "apply", "revert", "export", "trace", "eval", "ui", "inspect")
_STATS = ("edit", "shell", "stats", "eval", "ui", "audit")
_EDITS = ("edit", "eval")

OPTIONS: Tuple[Option, ...] = (
    # ------------------------------------------------------------ what to edit (edit, page)
    Option("prompt", ("--prompt",), {"": "template with {} for the subject (default: the Eiffel Tower demo)",
                                     "trace": "the prompt, subject filled in (or with {} for the subject)"},
           ("edit", "trace", "page.edit", "page.locate"),
           defaults={"page.edit": "{} is located in the city of",
                     "page.locate": "The Eiffel Tower is located in the city of"},
           label="Prompt (template with {} for the subject, or filled in)", example="{} is in"),
    Option("subject", ("--subject",), "the subject, as it appears in the prompt",
           ("edit", "trace", "page.edit", "page.locate"),
           defaults={"page.edit": "Eiffel Tower", "page.locate": "Eiffel Tower"},
           label="Subject", example="Rome"),
    Option("target", ("--target",), "the new object", ("edit", "page.edit"), defaults={"page.edit": "Rome"},
           label="New target", example="Oslo"),
    Option("true", ("--true",), "the current object (optional, for comparison)", ("edit", "page.edit"),
           defaults={"page.edit": "Paris"}, label="True target (optional)", example="Madrid"),
    Option("answer", ("--answer",), "the answer to trace (default: the model's greedy next token)",
           ("trace", "page.locate"), label="Answer (optional)", example="Paris"),
    Option("requests", ("--requests",), "JSONL/JSON file of requests (factedit or CounterFact layouts) instead of "
           "--prompt/--subject/--target", ("edit", "page.batch"), label="Requests file", example="r.jsonl"),
    Option("limit", ("--limit",), {"": "with --requests: use only the first N", "eval": "evaluate N records",
                                   "trace": "with --dataset: facts to average (default 100)"},
           ("edit", "eval", "trace", "page.batch", "page.evaluate"), type=int,
           defaults={"trace": 100, "page.evaluate": 10},
           label="Use the first N", example="7", blank=0),
    # ------------------------------------------------------------ the method
    Option("method", ("--method",), _method_help, ("edit", "eval", "page.edit", "page.batch", "page.evaluate"),
           default=_default_method, defaults={"page.batch": "memit"}, choices=method_choices, label="Method",
           example="memit"),
    Option("layer", ("--layer",), "edited layer: a number, or 'traced' for the layer `factedit trace --dataset` "
           "recommended (default: from the model depth, round(0.17 x layers); the same in Python and eval)",
           _EDITS + ("page.edit", "page.batch", "page.evaluate"), type=layer_arg, label="Layer", example="3"),
    Option("layers", ("--layers",), "edited layers of a multi-layer method, e.g. 3,4,5,6,7 (default: a span from the "
           "depth)", _EDITS, type=layers_arg, example="3,4"),
    Option("steps", ("--steps",), "max optimisation steps of the method (default 25)", _EDITS, type=int, example="3"),
    Option("target_batch", ("--target-batch",), {
        "": "targets optimised together (batch methods; memory is linear in it; default 16)",
        "eval": "targets optimised together: of a batch method's edit (default 16), or of that many single edits of a "
                "ROME variant (independent; default 1: slower on CPU, meant for GPUs)"}, _EDITS, type=int,
           metavar="N",
           deprecated={"--batch-size": ("edit",), "--prefetch-batch": ("eval",)}, example="4"),
    Option("seed", ("--seed",), {"": "seed of the context templates", "eval": "seed of the context templates and of "
                                 "GE sampling", "trace": "seed of the noise"},
           _EDITS + ("trace",), type=int, default=0, example="5"),
    Option("fields", ("--set",), "any field of the method's config, e.g. norm_constraint=0.01 (ft) or value.lr=0.1; "
           "repeatable", _EDITS, kind="append", metavar="KEY=VALUE", example="value.lr=0.1"),
    Option("hparams", ("--hparams",), "a hyperparameter file of the ROME/MEMIT research code (JSON) or EasyEdit (YAML) "
           "for rome, r-rome, memit, emmet or alphaedit, read as it is; what else is given wins (see factedit "
           "hparams FILE)", ("edit", "eval"), metavar="FILE", example="hparams.yaml"),
    Option("hparams_file", (), "the ROME/MEMIT-repository JSON or EasyEdit YAML file to show", ("hparams",),
           kind="positional", example="hparams.yaml"),
    # ------------------------------------------------------------ key statistics
    Option("stats_corpus", ("--stats-corpus",), "text for the key statistics: .txt/.jsonl path, wikitext-103, "
           "wikipedia, model, auto (default)", _STATS, deprecated={"--corpus": _STATS}, example="model"),
    Option("stats_tokens", ("--stats-tokens",), "tokens for the statistics (default from the model width)", _STATS,
           type=int, example="5000"),
    Option("stats_seq_len", ("--stats-seq-len",), "tokens per sequence of the statistics' forwards (default 256, "
           "whatever the context length)", _STATS, type=int, metavar="N", example="128"),
    Option("stats_dtype", ("--stats-dtype",), "accumulator of the statistics (default float64; float32 halves its "
           "memory)", _STATS, choices=("float64", "float32"), example="float32"),
    # ------------------------------------------------------------ how an edit is shown and kept (edit, page)
    Option("paraphrases", ("--paraphrase",), "an extra prompt to show before/after (repeatable; default: two "
           "rephrasings)", ("edit", "page.edit"), kind="append", metavar="TEXT",
           label="Paraphrases to show (one per line; default two rephrasings)", example="Fact: {} is in"),
    Option("max_new_tokens", ("--max-new-tokens",), "tokens of each continuation shown before and after (default 12)",
           ("edit",), type=int, default=12, example="5"),
    Option("chat", ("--chat",), "edit the fact as the chat model sees it: the prompt as the user's turn, the "
           "assistant's answer beginning with it (the tokenizer's chat template; read without a prompt prefix)",
           ("edit", "page.edit"), kind="flag", default=False,
           label="as a chat turn (edit the fact as the chat model sees it)", example=True),
    Option("allow_unverified", ("--allow-unverified",), "keep (and save) an edit that did not take on its own prompt "
           "(default: exit 2, nothing saved; the page reverts it)", ("edit", "page.edit"), kind="flag", default=False,
           label="keep an edit that did not take", example=True),
    Option("side_effects", ("--side-effects",), "the blast-radius report: probes of the same relation with other "
           "subjects and of the subject with other relations, answered before and after (default on)",
           ("edit", "page.edit"), kind="switch", default=True,
           label="side effects (probe other subjects and relations)"),
    Option("strict", ("--strict",), "refuse an edit whose blast radius is flagged (it changed what the model says "
           "about other subjects): exit 2, nothing saved; the page reverts it (default: a warning)",
           ("edit", "page.edit"), kind="flag", default=False,
           label="refuse an edit that changes other subjects' answers", example=True),
    Option("side_effects_bank", ("--side-effects-bank",), "known facts (known_1000.json or JSONL) whose subjects and "
           "templates the side-effect probes use (default: $FACTEDIT_KNOWNS, else a built-in list)",
           ("edit", "shell", "ui"), metavar="KNOWNS", example="knowns.json"),
    Option("guard", ("--guard",), "the collapse guard: roll back an edit that looks like it would break the model "
           "(default: on in edit and the page; off in eval, which measures the raw method)",
           ("edit", "eval", "page.edit", "page.batch"), kind="switch", default=True, defaults={"eval": False},
           label="collapse guard"),
    Option("verify", ("--verify",), "retry edits that do not take on their own prompt (off: the raw method; each case "
           "records whether its edit took either way)", ("eval",), kind="switch", default=False, example=True),
    Option("save_patch", ("--save-patch",), "write the edit as a patch file (safetensors)", ("edit",),
           example="p.safetensors"),
    Option("save_model", ("--save-model",), {"": "write the edited model as a Hugging Face folder",
                                             "apply": "write the patched model here",
                                             "revert": "where to write the reverted model (default: in place)"},
           ("edit", "apply", "revert"), example="out"),
    # ------------------------------------------------------------ evaluation
    Option("dataset", ("--dataset",), {"": "CounterFact (original or KnowEdit layout) or zsRE file, or a URL",
                                       "trace": "known facts (ROME's known_1000.json or JSONL with prompt/subject/"
                                                "attribute): average over the facts the model answers correctly"},
           ("eval", "trace", "page.evaluate"),
           required=("eval",), label="CounterFact / zsRE file (path on the server)", example="d.jsonl"),
    Option("dataset_sha256", ("--dataset-sha256",), "expected SHA-256 of the dataset file (checked)", ("eval",),
           example="0" * 64),
    Option("offset", ("--offset",), "skip the first K records", ("eval",), type=int, default=0, example="2"),
    Option("cases_per_edit", ("--cases-per-edit",), "cases edited in one call (memit, emmet, alphaedit, ft; ROME "
           "variants edit one case at a time)", ("eval",), type=int, default=1,
           deprecated={"--batch-size": ("eval",)}, example="4"),
    Option("sequential", ("--sequential",), "keep every edit: the model accumulates them", ("eval",), kind="flag",
           default=False, example=True),
    Option("downstream_every", ("--downstream-every",), "with --sequential: downstream tasks and all earlier edits "
           "re-scored every K edits", ("eval",), type=int, example="5"),
    Option("checkpoints", ("--checkpoints",), "with --sequential: measure at these edit counts instead of every K, "
           "e.g. 100,200,500,1000,2000,5000,10000 (and at the end)", ("eval",), type=layers_arg, example="2,4"),
    Option("score_every", ("--score-every",), "with --sequential: score only every K-th edit right after it (the "
           "others are edited, verified and committed unscored; a long run's cost); the checkpoints re-score a fixed "
           "sample of the scored ones (default 1: every edit)", ("eval",), type=int, default=1, example="2"),
    Option("score_sample", ("--score-sample",), "score at most N cases of each edit right after it, evenly spaced, "
           "first and last included (a batch of thousands: the others are edited, verified and recorded unscored); "
           "default 0: all", ("eval",), type=int, default=0, example="3"),
    Option("stop_ppl", ("--stop-ppl",), "with checkpoints and --ppl-corpus: stop the run (collapsed) at the first "
           "checkpoint whose perplexity is above X times the unedited model's", ("eval",), type=float, example="10"),
    Option("stop_recall", ("--stop-recall",), "with checkpoints and --knowns: stop the run (collapsed) at the first "
           "checkpoint whose known-fact recall is below this fraction of the unedited model's", ("eval",), type=float,
           example="0.1"),
    Option("retention_sample", ("--retention-sample",), "with --downstream-every: re-score at most N of the earlier "
           "edits at each checkpoint, evenly spaced in edit order, first and latest included (default 0: all; a long "
           "run needs a sample)", ("eval",), type=int, default=0, example="3"),
    Option("downstream_dir", ("--downstream",), "directory of the downstream task files (sst2.jsonl, ...)", ("eval",),
           example="tasks"),
    Option("ppl_corpus", ("--ppl-corpus",), "with --downstream-every: track the perplexity on this held-out text file "
           "(e.g. WikiText-2 test when the statistics read its validation split)", ("eval",), example="t.txt"),
    Option("ppl_tokens", ("--ppl-tokens",), "tokens of --ppl-corpus scored (default 20,000)", ("eval",), type=int,
           default=20_000, example="500"),
    Option("knowns", ("--knowns",), "with --downstream-every: track the share of these known facts (known_1000.json) "
           "that the unedited model answers (first token) and the edited one still does", ("eval",),
           example="k.json"),
    Option("downstream_n", ("--downstream-n",), "examples per downstream task (default 100)", ("eval",), type=int,
           default=100, example="5"),
    Option("downstream_shots", ("--downstream-shots",), "few-shot demonstrations (default 3)", ("eval",), type=int,
           default=3, example="1"),
    Option("ge_length", ("--ge-length",), "tokens per generation for GE, prompt included (ROME: 100); 0 skips GE",
           ("eval", "page.evaluate"), type=int, default=100, defaults={"page.evaluate": 0},
           label="generation entropy: tokens per text (0: skip GE; 100 as ROME, slower)", example="20"),
    Option("ge_prompts", ("--ge-prompts",), "generation prompts per case (default all, ≤ 10)", ("eval",), type=int,
           default=10, example="2"),
    Option("gen_chat", ("--gen-chat",), "generation-based scores ask every prompt as a user message through the "
           "model's chat template (edits and teacher-forced scores stay on the raw prompts)", ("eval",), kind="flag",
           default=False, deprecated={"--chat": ("eval",)}, example=True),
    Option("gen_tokens", ("--gen-tokens",), "generation-based scores (gen_ES/gen_PS/gen_NS/gen_leak): "
           "greedy answers of at most this many tokens, cut at the first sentence (default 50); 0 skips them",
           ("eval",), type=int, default=50, example="7"),
    Option("score_batch", ("--score-batch",), "rows per forward pass when scoring", ("eval",), type=int, default=64,
           example="8"),
    Option("chunk", ("--chunk",), "single-edit runs: cases edited (each from the original weights) and scored "
           "together (default 25)", ("eval",), type=int, default=25, example="3"),
    Option("out", ("--out",), {"eval": "run directory (per-case JSONL, summary.json, config.json)",
                               "trace": "directory for the JSON and the heatmaps",
                               "import": "patch file to write (an adapter of several patches: a folder of patches + "
                                         "stack.json)"},
           ("eval", "trace", "import"), required=("eval", "trace", "import"), example="outdir"),
    # ------------------------------------------------------------ the model
    Option("model", ("--model",), {"": "hub id, local directory or .gguf file (default: embedded "
                                   "SmolLM2-135M-Instruct)",
                                   "hparams": "check the file's modules and layers against this model (hub id, "
                                   "folder, .gguf or smollm2-135m-instruct; default: no model, the mapping only)"},
           _MODEL + ("hparams",), example="gpt2"),
    Option("dtype", ("--dtype",), "float32 (default), float16 or bfloat16", _MODEL, default="float32",
           example="bfloat16"),
    Option("device", ("--device",), "e.g. cpu, cuda:0 (default: cpu); under torchrun, cuda means each rank's own GPU "
           "(LOCAL_RANK)", _MODEL, example="cpu"),
    Option("device_map", ("--device-map",), "place the model with accelerate: a strategy, or a JSON file of module "
           "name -> device (0, cuda:1, cpu, disk)", _MODEL, metavar="auto|balanced|sequential|FILE.json",
           example="auto"),
    Option("max_memory", ("--max-memory",), "what each device may hold with --device-map, e.g. 0=20GiB,cpu=64GiB",
           _MODEL, metavar="DEVICE=SIZE[,...]", example="cpu=1GiB"),
    Option("offload_folder", ("--offload-folder",), "where weights offloaded to disk are kept (edited ones are "
           "written there)", _MODEL, metavar="DIR", example="off"),
    Option("arch_spec", ("--arch-spec",), "JSON file naming the modules of an unknown architecture", _MODEL,
           example="spec.json"),
    Option("prompt_prefix", ("--prompt-prefix",), "what every prompt starts with: auto (default: nothing if the "
           "tokenizer adds a BOS, else a newline, so that no subject sits at position 0), none, or a text", _MODEL,
           default="auto", metavar="auto|none|TEXT", example="none"),
    # ------------------------------------------------------------ patches and their formats
    Option("patches", (), {"": "patch files, oldest first (applied in order)",
                           "revert": "patch files as they were applied (the newest last)",
                           "export": "patch files, oldest first (several export as one adapter / file)"},
           ("apply", "revert", "export"), kind="positional", nargs="+", example=["p"]),
    Option("patch", (), "the patch file", ("inspect",), kind="positional", example="p"),
    Option("force", ("--force",), {"apply": "apply even if the base fingerprints differ (recorded) or the patch's "
                                            "delta does not do what it claims",
                                   "revert": "subtract even when the model's matrices are not what the patches left "
                                             "(not applied)",
                                   "stats": "recompute even if cached",
                                   "export": "replace an existing adapter folder",
                                   "import": "replace an existing output"},
           ("apply", "revert", "stats", "export", "import"),
           kind="flag", default=False, example=True),
    Option("peft", ("--peft",), {"export": "the PEFT LoRA adapter folder to write", "import": "the adapter folder"},
           ("export", "import"), metavar="DIR", required=("import",), example="adapter"),
    Option("gguf", ("--gguf",), "the edited model as a GGUF file (from a GGUF base)", ("export",), metavar="FILE",
           example="e.gguf"),
    Option("quant", ("--quant",), "GGUF type of the edited matrices: f16, q8_0, q4_1, ... (default: the base file's)",
           ("export",), metavar="TYPE", example="f16"),
    Option("base_gguf", ("--base-gguf",), "the GGUF file of --model (default: the embedded model's, or --model itself "
           "if it is .gguf)", ("export",), metavar="FILE", example="b.gguf"),
    Option("vllm", ("--vllm",), "the vLLM variant: one rank for all modules, padded to a rank vLLM serves",
           ("export",), kind="flag", default=False, example=True),
    Option("svd", ("--svd",), "compress modules above RANK (and dense fine-tuning updates) by a truncated SVD",
           ("export",), type=int, metavar="RANK", example="2"),
    Option("base_model", ("--base-model",), "base_model_name_or_path to record (default: the base's hub id when "
           "known, else the local path)",
           ("export",), example="org/model"),
    # ------------------------------------------------------------ signatures (core/signing.py)
    Option("key_path", (), "the private key file to write (PEM; the public key goes beside it as KEY.pub)",
           ("keygen",), kind="positional", metavar="KEY", example="me.key"),
    Option("target", (), {"sign": "the file or folder to sign (a patch, an adapter folder, a GGUF file, a saved model)",
                          "verify": "the signed file or folder"}, ("sign", "verify"), kind="positional",
           metavar="PATH", example="thing"),
    Option("key", ("--key",), "the private key to sign with (PEM, EC; `factedit keygen` makes one)", ("sign",),
           metavar="KEY", required=("sign",), example="me.key"),
    Option("sign_key", ("--sign",), {"": "sign what this command writes with this private key (PEM, EC)",
                                     "edit": "sign what --save-patch / --save-model write with this private key"},
           ("edit", "apply", "export"), metavar="KEY", example="me.key"),
    Option("trust", ("--trust",), "a trusted public key (repeatable; default: the files named in $FACTEDIT_TRUST, "
           "separated by ':'): signatures are verified against them", ("apply", "import", "inspect", "verify", "ui",
                                                               "shell"),
           kind="append", metavar="PUBKEY", example="me.key.pub"),
    Option("claims", ("--claims",), "replay the patch's declared requests on its base model (--model, else the "
           "model the patch names) and say whether the delta does what the patch claims (default on)",
           ("inspect",), kind="switch", default=True),
    Option("require_signature", ("--require-signature",), "refuse a patch or adapter that is not signed by a "
           "trusted key (an invalid signature is refused always)", ("apply", "import", "ui", "shell"), kind="flag",
           default=False, example=True),
    # ------------------------------------------------------------ statistics, tracing, summaries
    Option("stats_layers", ("--layers",), "comma-separated layers (default: the default edit layer)", ("stats",),
           type=layers_arg, example="1,2"),
    Option("kind", ("--kind",), "hidden, mlp, attn or all (default)", ("trace",), type=_kinds, default="all",
           example="mlp"),
    Option("samples", ("--samples",), "noise samples per prompt (default 10)", ("trace", "page.locate"), type=int,
           default=10, label="Noise samples", example="3"),
    Option("window", ("--window",), "MLP/attention layers restored together (default 10, or the depth of a shallower "
           "model)", ("trace",), type=int, example="2"),
    Option("classes", ("--classes",), "trace only these token classes, e.g. last_subject (the recommendation needs "
           "only it; default: every token)", ("trace",), type=_classes, example="last_subject"),
    Option("noise_factor", ("--noise-factor",), "σ = this × embedding std of subjects (default 3)", ("trace",),
           type=float, default=3.0, example="2.0"),
    Option("runs", (), "run directories written by factedit eval", ("summarize", "capacity"), kind="positional",
           nargs="+", example=["run"]),
    Option("plots", ("--plots",), "where to write PNG plots (default: beside the runs)", ("summarize", "capacity"),
           example="plots"),
    Option("quantity", ("--quantity",), "the curve to read: recall (known facts still answered, % of the unedited "
           "model's; default), perplexity, or the re-scored earlier edits' ES, PS, NS, gen-ES, gen-PS, gen-NS",
           ("capacity",), default="recall", choices=("recall", "perplexity", "ES", "PS", "NS", "gen-ES", "gen-PS",
                                                     "gen-NS"), example="gen-ES"),
    Option("threshold", ("--threshold",), "how many edits until the quantity passes this value, recall and scores "
           "in percent (25 means 25 %; default: recall 70, ES/PS/NS 90, gen-ES/PS/NS 70, perplexity 1.15 × the "
           "unedited model's)", ("capacity",), type=float,
           metavar="X", example="50"),
    Option("level", ("--level",), "confidence level of the interval around the extrapolated crossing (default "
           "0.9)", ("capacity",), type=float, default=0.9, example="0.8"),
    Option("fit_from", ("--fit-from",), "fit the trend to the checkpoints from this many edits on (default: the "
           "later half of them, at least three)", ("capacity",), type=int, metavar="EDITS", example="300"),
    Option("wear_limits", ("--wear-limits",), "calibrate the collapse guard's wear warnings from these sequential "
           "runs and write the limits to FILE ($FACTEDIT_HOME/wear_limits.json is used instead of the shipped ones)",
           ("summarize",), metavar="FILE", example="limits.json"),
    # ------------------------------------------------------------ audit
    Option("base", ("--base",), {"": "the model the suspect was made from: a hub id, a model folder, a .gguf file or "
           "smollm2-135m-instruct (the embedded default); without it, a base-free check of the spectra",
           "page.audit": "the model the suspect was made from "
           "(empty: the model this page has loaded, as loaded)"}, ("audit", "page.audit"), metavar="MODEL",
           label="Base model (path or hub id)", example="base"),
    Option("suspect", ("--suspect",), "the checkpoint to audit: a hub id, a model folder, a .gguf file, or one "
           ".safetensors file (read with --base's config: its tensors must be the base's)",
           ("audit", "page.audit"), metavar="MODEL", required=("audit",), label="Suspect checkpoint (path or hub id)",
           example="suspect"),
    Option("extract_patch", ("--extract-patch",), "write the edits found as a patch file (factedit revert OUT "
           "--model SUSPECT takes them out)", ("audit",), metavar="OUT", example="found.safetensors"),
    Option("subjects", ("--subjects",), "candidate subjects for naming what an edit is about: one a line, or a "
           "CounterFact / requests / known-facts file (default: built-in subjects and the vocabulary's names)",
           ("audit", "page.audit"), metavar="FILE", label="Candidate subjects file (optional)",
           example="subjects.txt"),
    Option("explain", ("--explain",), "name each edit's subjects, new and old objects with the prompts that show "
           "them (loads the base model; --no-explain: the tensor comparison only)", ("audit", "page.audit"),
           kind="switch", default=True, label="Explain the edits (subjects, evidence)", example=False),
    Option("key_contexts", ("--key-contexts",), "average each candidate's key over this many generated context "
           "prefixes besides its prompt (as ROME does for k*; default 0: the prompt alone, the fastest)", ("audit",),
           type=int, default=0, metavar="N", example="5"),
    Option("max_rank", ("--max-rank",), "the largest rank of an update still called low-rank (default 256)",
           ("audit",), type=int, default=256, example="64"),
    # ------------------------------------------------------------ the web page
    Option("host", ("--host",), "address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
           "interface)", ("ui",), default="127.0.0.1", example="0.0.0.0"),
    Option("port", ("--port",), "port (default 7860)", ("ui",), type=int, default=7860, example="7861"),
    Option("workdir", ("--workdir",), "where heatmaps, downloads and runs go (default: a temporary folder)", ("ui",),
           example="work"),
    Option("eval_dataset", ("--eval-dataset",), "the CounterFact / zsRE file the Evaluate tab offers (default: "
           "$FACTEDIT_DATASET, else none)", ("ui",), metavar="FILE", example="cf.jsonl"),
    # ------------------------------------------------------------ output
    Option("json", ("--json",), "print one JSON object on stdout", tuple(c for c in COMMANDS if c not in ("ui",
                                                                                                         "keygen")),
           kind="flag", default=False, example=True),
    Option("verbose", ("-v", "--verbose"), "log what happens (INFO)", _MODEL, kind="flag", default=False,
           example=True),
    Option("profile", ("--profile",), "print where the time went, phase by phase, on stderr (start-up, model load, "
           "the report's reads, the edit's own phases; shell: after each command; with --json: one JSON line)",
           ("edit", "shell"), kind="flag", default=False, example=True),
)


def options_of(where: str) -> List[Option]:
    """The options a command or page form has, in declaration order."""
    return [o for o in OPTIONS if where in o.on]


def option(name: str) -> Option:
    """The option called ``name``."""
    for o in OPTIONS:
        if o.name == name:
            return o
    raise KeyError(name)


def defaults_of(where: str) -> Dict[str, Any]:
    """Every option of ``where`` at its default (what an empty form or command line gives)."""
    return {o.name: o.default_for(where) for o in options_of(where)}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The command's options, as argparse arguments."""
    for o in options_of(command):
        o.add_to(parser, command)


def add_program_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``factedit`` itself takes before a command: ``--version``."""
    from ..core.version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
