"""``factedit ui``: locate, edit, batch-edit, inspect/revert/ship and evaluate from a web page.

:class:`~factedit.app.session.Session` does the work (the same calls as the command line and the shell,
serialised on the one model);
:mod:`.app` is the Gradio page over it, one function per tab, its controls built from the option
declarations (:mod:`.controls`) and its HTML from the typed reports (:mod:`.render`). Gradio is an
optional extra: ``pip install 'factedit[ui]'``.
"""

from ..app.session import Session

__all__ = ["Session", "serve"]


def serve(session, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page over ``session`` (see :func:`factedit.ui.app.serve`)."""
    from .app import serve as _serve

    return _serve(session, host, port, block)
