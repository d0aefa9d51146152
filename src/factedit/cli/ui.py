"""``factedit ui``: the web page over one loaded model (needs the ``ui`` extra: Gradio)."""

from __future__ import annotations

import sys

__all__ = ["cmd_ui", "make_session"]


def make_session(settings, model, tokenizer):
    """The page's :class:`~factedit.app.session.Session` over a loaded model, with everything the command was
    given (statistics, side-effect bank, work folder, the Evaluate tab's data set)."""
    from ..app.session import Session

    return Session(settings.model.editor(model, tokenizer, progress=True), settings)


def cmd_ui(settings) -> int:
    from ..core.errors import FactEditError

    try:
        import gradio  # noqa: F401  (only whether it is there)
    except ImportError:
        raise FactEditError("factedit ui needs Gradio: pip install 'factedit[ui]'") from None
    host, port = settings["host"], settings["port"]
    if not 0 < port < 65536:
        raise FactEditError(f"--port must be between 1 and 65535, got {port}")
    from ..ui import serve

    session = make_session(settings, *settings.model.load())
    print(f"factedit ui: {session.model_name} on http://{host}:{port} (Ctrl-C stops it)", file=sys.stderr,
          flush=True)
    try:
        serve(session, host, port)
    except OSError as e:
        raise FactEditError(f"cannot listen on {host}:{port}: {e}") from None
    return 0
