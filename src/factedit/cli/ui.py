"""``factedit ui``: the web page over one loaded model (needs the ``ui`` extra: Gradio)."""

from __future__ import annotations

import os
import sys

from .common import add_model_options, arch_spec, load

__all__ = ["add_parser", "cmd_ui"]


def add_parser(sub) -> None:
    u = sub.add_parser("ui", help="edit in the browser: locate, edit, batch, the session's edits, evaluate")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.add_argument("--workdir", default=None, help="where heatmaps, downloads and runs go (default: a temporary folder)")
    u.add_argument("--side-effects-bank", default=None, metavar="KNOWNS",
                   help="known facts whose subjects and templates the side-effect probes use (default: "
                        "$FACTEDIT_KNOWNS, else a built-in list)")
    add_model_options(u, json_option=False)


def cmd_ui(args) -> int:
    from ..core.errors import FactEditError

    try:
        import gradio  # noqa: F401  (only whether it is there)
    except ImportError:
        raise FactEditError("factedit ui needs Gradio: pip install 'factedit[ui]'") from None
    if not 0 < args.port < 65536:
        raise FactEditError(f"--port must be between 1 and 65535, got {args.port}")
    from ..editor import Editor
    from ..side_effects import load_bank
    from ..ui import Session, serve

    model, tok = load(args)
    editor = Editor(model, tok, arch=arch_spec(args.arch_spec), prompt_prefix=args.prompt_prefix, progress=True)
    bank = load_bank(args.side_effects_bank or os.environ.get("FACTEDIT_KNOWNS"))
    session = Session(editor, stats_corpus=args.corpus, stats_tokens=args.stats_tokens, workdir=args.workdir,
                      bank=bank)
    print(f"factedit ui: {session.model_name} on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr,
          flush=True)
    try:
        serve(session, args.host, args.port)
    except OSError as e:
        raise FactEditError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    return 0
