"""Command line: ``factedit edit | shell | stats | apply | revert | inspect | export | import | trace | eval |
summarize | capacity | audit | hparams | ui | keygen | sign | verify``
(also ``python -m factedit``). Every option comes from the declarations of :mod:`factedit.app.options`;
each command's handler takes the :class:`~factedit.app.settings.Settings` they make. One module per
command group.

Errors that are the user's to fix print one message on stderr and exit with status 2;
the model and caches are left as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import List, Optional

from ..app.options import COMMANDS, add_arguments, add_program_arguments
from ..app.settings import Settings
from . import audit, edit, export, hparams, patch, shell, sign, stats, trace, ui
from . import eval as eval_cmd
from .common import setup_logging

__all__ = ["main", "build_parser", "parse"]

HANDLERS = {"edit": edit.cmd_edit, "shell": shell.cmd_shell, "stats": stats.cmd_stats, "apply": patch.cmd_apply,
            "revert": patch.cmd_revert,
            "inspect": patch.cmd_inspect, "export": export.cmd_export, "import": export.cmd_import,
            "trace": trace.cmd_trace, "eval": eval_cmd.cmd_eval, "summarize": eval_cmd.cmd_summarize,
            "capacity": eval_cmd.cmd_capacity,
            "audit": audit.cmd_audit, "hparams": hparams.cmd_hparams, "ui": ui.cmd_ui,
            "keygen": sign.cmd_keygen, "sign": sign.cmd_sign, "verify": sign.cmd_verify}
HELP = {
    "edit": "edit one fact and show the model before and after",
    "shell": "load the model once, then edit, revert, inspect, apply and save line by line (interactive or a script)",
    "stats": "compute and cache the key statistics C ahead of time",
    "apply": "apply patch files (in order) to a model",
    "revert": "remove patches (newest last on the command line) from a saved edited model",
    "inspect": "show what a patch file changes",
    "export": "write patches (applied in order) as a PEFT LoRA adapter or a GGUF file",
    "import": "turn an adapter that factedit exported back into patch files",
    "trace": "causal tracing: which layers and tokens carry a fact",
    "eval": "evaluate a method on CounterFact / zsRE (resumable)",
    "summarize": "compare evaluation runs: table and plots of sequential runs",
    "capacity": "how many more edits before a sequential run's recall (or another quantity) passes a threshold",
    "audit": "compare a checkpoint with its base: which tensors changed, and which changes are edits",
    "hparams": "show what a ROME/MEMIT-repository or EasyEdit hparams file maps to here (--hparams FILE uses it)",
    "ui": "edit in the browser: locate, edit, batch, the session's edits, evaluate",
    "keygen": "make a key pair for signing patches, adapters and saved models (offline)",
    "sign": "sign a patch, adapter, GGUF file or saved model (OpenSSF model signing format)",
    "verify": "verify a signature against trusted public keys (exit 2 unless verified)",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="factedit", description="Locate and edit facts inside language models.")
    add_program_arguments(ap)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        extra = {"epilog": shell.SHELL_HELP, "formatter_class": argparse.RawDescriptionHelpFormatter} \
            if name == "shell" else {}
        add_arguments(sub.add_parser(name, help=HELP[name], description=HELP[name], **extra), name)
    return ap


def parse(argv: List[str]) -> Settings:
    """The settings of a command line (``["edit", "--target", ...]``); argparse exits on a usage error."""
    values = vars(build_parser().parse_args(argv))
    return Settings(values.pop("command"), values)


#: commands whose process ends without the interpreter's teardown once their output is out (see :func:`main`)
QUICK_EXIT = ("edit", "shell")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: the process's own) and return its exit status. Run as the
    process's own command line, ``edit`` and ``shell`` end the process themselves once their output is
    flushed: the interpreter's teardown (freeing a loaded model, 0.9 s on the 2-core machine) does nothing
    their user waits for (they write every file atomically and closed before they print)."""
    from ..core.timing import seconds_since_process_start

    startup = seconds_since_process_start() if argv is None else None  # the interpreter and imports so far
    settings = parse(sys.argv[1:] if argv is None else argv)
    rc = _run(settings, startup)
    if argv is None and settings.where in QUICK_EXIT and not sys.flags.interactive:
        _quick_exit(rc)
    return rc


def _quick_exit(rc: int) -> None:
    import logging
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    except (OSError, ValueError):  # a closed pipe: nothing more to say
        pass
    os._exit(rc)


def _run(settings: Settings, startup: Optional[float] = None) -> int:
    """The command of ``settings``; ``startup``: the seconds the process took to get here (for --profile)."""
    from ..core.errors import FactEditError
    from ..core.timing import phase, profiling

    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(profiling()) if settings.get("profile") else None
        if prof is not None:
            stack.callback(lambda: print(("" if settings.get("json") else "\n") + prof.render(settings.get("json")),
                                         file=sys.stderr))
            if startup is not None:
                prof.add("start-up: interpreter, imports", startup)
        with phase("logging set-up (imports transformers)"):
            setup_logging(bool(settings.get("verbose")))
        try:
            return HANDLERS[settings.where](settings)
        except FactEditError as e:
            print(f"factedit: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("factedit: interrupted; weights and caches are unchanged", file=sys.stderr)
            return 130
