"""``factedit ui``: locate, edit, batch-edit, inspect/revert/ship and evaluate from a web page.

:mod:`.session` does the work (the same library calls as the command line, serialised on the one
model); :mod:`.app` is the Gradio page over it. Gradio is an optional extra: ``pip install
'factedit[ui]'``.
"""

from .session import METHOD_CHOICES, Session

__all__ = ["Session", "METHOD_CHOICES", "serve"]


def serve(session, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page over ``session`` (see :func:`factedit.ui.app.serve`)."""
    from .app import serve as _serve

    return _serve(session, host, port, block)
