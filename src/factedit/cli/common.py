"""What every ``factedit`` command shares: logging, and whether progress is shown."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging", "show_progress"]


def show_progress(settings) -> bool:
    """Progress bars on an interactive terminal, never with ``--json``."""
    return not settings.get("json") and sys.stderr.isatty()


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:
            pass
