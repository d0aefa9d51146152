"""``factedit shell``: one loaded model, many commands. The model, statistics and caches load once; then each
line is a command (``edit`` with the options of ``factedit edit``, ``revert``, ``history``, ``inspect``,
``apply``, ``save``), run by the same :class:`~factedit.app.session.Session` as the web page. Lines come
from the terminal (with a prompt) or from a pipe or file (a script); a command that fails says why and
the model is as it was before it; the shell's exit status is 2 if any command failed.

    factedit shell --stats-corpus wikitext2.txt
    factedit> edit --prompt "{} is located in the city of" --subject "Eiffel Tower" --target Rome
    factedit> revert
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, TextIO

from ..app.options import options_of
from ..app.settings import Settings
from ..core.errors import FactEditError
from .common import show_progress

__all__ = ["cmd_shell", "make_shell", "Shell", "SHELL_HELP"]

SHELL_HELP = """commands (one a line; quote texts with spaces; `edit --help` lists its options):
  edit [options]   edit a fact, as `factedit edit` does: --prompt/--subject/--target/--true, --method, --layer,
                   --set KEY=VALUE, --requests FILE (a batch), --no-side-effects, --save-patch FILE, ...
  revert [N]       undo the last N edits, bit for bit (default 1)
  history          the edits of this session, oldest first
  inspect N        what edit N changes (its patch)
  apply PATCH...   apply patch files (or a folder `save` wrote) on top, in order; each one's signature and
                   claims checked as `factedit apply` checks them
  save DIR         write this session's edits as a patch stack (`factedit apply DIR/*.safetensors`, in order)
  help             this list
  quit             leave (also exit, or Ctrl-D)"""


class _Usage(FactEditError):
    """A command line the shell could not parse."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises instead of exiting (a bad line must not end the shell)."""

    def error(self, message):
        raise _Usage(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            print(message, file=sys.stderr, end="")
        raise _Usage("") if status else _Help()


class _Help(Exception):
    """``edit --help`` was shown: nothing to run."""


def _edit_parser(fixed: set) -> argparse.ArgumentParser:
    """The options of ``factedit edit`` that describe one edit (not those the shell fixed when it started: the
    model, statistics, side-effect bank; nor --save-model: a saved model records its edits, see ``save``)."""
    parser = _Parser(prog="edit", description="edit a fact (the options of factedit edit)")
    for o in options_of("edit"):
        if o.name not in fixed:
            o.add_to(parser, "edit")
    return parser


class Shell:
    """Runs shell lines on a :class:`~factedit.app.session.Session`; ``settings``: the ``shell`` command's."""

    def __init__(self, session, settings: Settings, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.session, self.settings, self.out, self.err = session, settings, out, err
        own = {o.name for o in options_of("shell")}
        self.parser = _edit_parser(own | {"save_model"})
        self.shared = own & {o.name for o in options_of("edit")}  # an edit line takes these from the shell
        self.failed = 0
        self.commands: Dict[str, Callable[[List[str]], None]] = {
            "edit": self.edit, "revert": self.revert, "history": self.history, "inspect": self.inspect,
            "apply": self.apply, "save": self.save, "help": self.help}

    # ------------------------------------------------------------------ lines
    def run(self, lines: Iterable[str]) -> int:
        """Run every line (until ``quit``); returns the number of commands that failed."""
        for line in lines:
            if not self.line(line):
                break
        return self.failed

    def line(self, text: str) -> bool:
        """Run one line; False when it asks to leave."""
        from ..core.timing import profiling

        try:
            words = shlex.split(text, comments=True)
        except ValueError as e:
            return self._failed(f"cannot read the line: {e}")
        if not words:
            return True
        name, args = words[0], words[1:]
        if name in ("quit", "exit"):
            return False
        command = self.commands.get(name)
        if command is None:
            return self._failed(f"unknown command {name!r} (help lists them)")
        with contextlib.ExitStack() as stack:
            if self.settings.get("profile"):
                prof = stack.enter_context(profiling())
                stack.callback(lambda: print(prof.render(self.settings.get("json")), file=self.err))
            try:
                command(args)
            except _Help:
                pass
            except FactEditError as e:
                return self._failed(str(e))
            except KeyboardInterrupt:
                return self._failed("interrupted; the model is as it was before the command")
        return True

    def _failed(self, message: str) -> bool:
        self.failed += 1
        if message:
            print(f"factedit: error: {message}", file=self.err, flush=True)
        return True

    def _print(self, obj, text: str) -> None:
        print(json.dumps(obj) if self.settings.get("json") else text, file=self.out, flush=True)

    # ------------------------------------------------------------------ commands
    def line_settings(self, args: List[str]) -> Settings:
        """The ``edit`` settings of an edit line: its options, the shell's statistics and bank for the rest."""
        values = vars(self.parser.parse_args(args))
        return Settings("edit", {**{n: self.settings.values[n] for n in self.shared}, **values})

    def edit(self, args: List[str]) -> None:
        settings = self.line_settings(args)
        if settings.edit.requests:
            report = self.session.batch(settings)
            self._print(report.to_dict(), report.to_text())
            return
        report = self.session.edit(settings)
        note = "" if report.kept else ("\nthe edit did not take on its own prompt and was reverted "
                                       "(--allow-unverified keeps it)")
        self._print({**report.to_dict(), "kept": report.kept}, report.to_text() + note)

    def revert(self, args: List[str]) -> None:
        if len(args) > 1:
            raise _Usage("revert takes at most one number")
        left = self.session.revert(args[0] if args else 1)
        self._print({"reverted": int(args[0]) if args else 1, "edits": left}, f"reverted; {left} edit(s) remain")

    def history(self, args: List[str]) -> None:
        rows = self.session.history()
        lines = [f"{r['edit']:>3}. {r['method']} layer(s) {r['layers']}: {r['facts']}  ||Δ|| {r['delta_norm']}"
                 + ("" if r["verified"] is not False else "  (did not take)") for r in rows]
        self._print({"edits": rows}, "\n".join(lines) if lines else "no edits yet")

    def inspect(self, args: List[str]) -> None:
        if len(args) != 1:
            raise _Usage("inspect takes one edit number (history lists them)")
        info = self.session.inspect(args[0])
        lines = [f"edit {args[0]}: {info['method']} on {info['model']}"]
        lines += [f"  layer {l}: rank {info['ranks'][str(l)]}, ||Δ|| {info['norms'][str(l)]:.4f}"
                  for l in info["layers"]]
        lines += [f"  {r['prompt'].replace('{}', r['subject'])!r} -> {r['target_new']!r}" for r in info["requests"]]
        self._print(info, "\n".join(lines))

    def apply(self, args: List[str]) -> None:
        """Patch files in order, or a folder ``save`` wrote (its stack.json's order); each one's signature
        (its ``.sig`` beside it) and claims checked as it is applied. A refused one stops there."""
        from ..patch.stack import stack_files

        if not args:
            raise _Usage("apply takes patch files or a folder that save wrote")
        files = [f for a in args for f in (stack_files(a) if Path(a).is_dir() else [Path(a)])]
        for i, f in enumerate(files):
            try:
                info = self.session.upload_patch([f])
            except FactEditError as e:
                done = f" ({i} of {len(files)} applied before it)" if i else ""
                raise FactEditError(f"{e}{done}") from None
            self._print(info, f"applied {f.name}: a {info['method']} patch ({self._claims(info)}); "
                        f"{len(self.session.editor.history)} edit(s) in the session")

    @staticmethod
    def _claims(info: dict) -> str:
        claims = info.get("claims") or {}
        return "its claims hold" if claims.get("ok") else "claims not checked" if not claims.get("checked") \
            else "applied although its claims do not hold"

    def save(self, args: List[str]) -> None:
        if len(args) != 1:
            raise _Usage("save takes one folder")
        if not self.session.editor.history:
            raise FactEditError("the session holds no edits to save")
        with self.session.exclusive():
            files = self.session.editor.save_history(args[0])
        self._print({"saved": files}, f"wrote {len(files)} patch(es) to {args[0]} (stack.json gives their order)")

    def help(self, args: List[str]) -> None:
        self._print({"help": SHELL_HELP}, SHELL_HELP)


def make_shell(settings, model, tokenizer, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Shell:
    """The shell over a loaded model, with everything the command was given (statistics, side-effect bank,
    trusted keys) in its :class:`~factedit.app.session.Session`."""
    from ..app.session import Session

    return Shell(Session(settings.model.editor(model, tokenizer, progress=show_progress(settings)), settings),
                 settings, out, err)


def cmd_shell(settings) -> int:
    shell = make_shell(settings, *settings.model.load())
    session = shell.session
    if sys.stdin.isatty():
        print(f"factedit shell: {session.model_name} loaded; `help` lists the commands, `quit` leaves", file=sys.stderr)
    failed = shell.run(_typed() if sys.stdin.isatty() else sys.stdin)
    return 2 if failed else 0


def _typed(prompt: str = "factedit> "):
    """Lines typed at a terminal, with line editing and history where the platform has readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() edits lines once it is loaded)
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
