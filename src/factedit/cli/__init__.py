"""Command line: ``factedit edit | stats | apply | revert | inspect | export | import | trace | eval | summarize | ui``
(also ``python -m factedit``). One module per command group; :mod:`.common` holds what they share.

Errors that are the user's to fix print one message on stderr and exit with status 2;
the model and caches are left as they were.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import edit, eval as eval_cmd, export, patch, stats, trace, ui
from .common import setup_logging

__all__ = ["main", "build_parser"]

COMMANDS = {"edit": edit.cmd_edit, "stats": stats.cmd_stats, "apply": patch.cmd_apply, "revert": patch.cmd_revert,
            "inspect": patch.cmd_inspect, "export": export.cmd_export, "import": export.cmd_import, "trace": trace.cmd_trace, "eval": eval_cmd.cmd_eval,
            "summarize": eval_cmd.cmd_summarize, "ui": ui.cmd_ui}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="factedit", description="Locate and edit facts inside language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    edit.add_parser(sub)
    patch.add_parsers(sub)
    export.add_parsers(sub)
    stats.add_parser(sub)
    trace.add_parser(sub)
    eval_cmd.add_parsers(sub)
    ui.add_parser(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    from ..core.errors import FactEditError

    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except FactEditError as e:
        print(f"factedit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("factedit: interrupted; weights and caches are unchanged", file=sys.stderr)
        return 130
