"""Drive ``factedit ui`` from a real browser: start the server on a free localhost port and open the
page in headless Chromium through Playwright. Used by the test suite and by
``scripts/ui_screenshots.py``; Playwright's own browser download is not needed (the distribution's
Chromium is driven through ``executable_path``).

    with running_ui(["--model", "dir/"]) as url, chromium_page() as page:
        page.goto(url)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, Optional, Sequence

__all__ = ["find_chromium", "free_port", "running_ui", "chromium_page", "CHROMIUM_ARGS"]

#: flags for Chromium on a machine with a closed network (no background connections, no sandbox as root)
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")


def find_chromium() -> Optional[str]:
    """The path of a Chromium or Chrome executable (``FACTEDIT_CHROMIUM`` first), or ``None``."""
    for name in (os.environ.get("FACTEDIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_ui(args: Sequence[str] = (), port: Optional[int] = None, env: Optional[dict] = None,
               timeout: float = 300.0, log=None) -> Iterator[str]:
    """Run ``python -m factedit ui ARGS --port PORT`` until the page answers; yield its URL; stop it."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "factedit", "ui", *args, "--port", str(port)],
                            env={**os.environ, **(env or {})}, stdout=log or subprocess.DEVNULL,
                            stderr=log or subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"factedit ui exited with status {proc.returncode} before serving")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"factedit ui did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def chromium_page(executable: Optional[str] = None, width: int = 1400, height: int = 1000):
    """A Playwright page in headless Chromium (the distribution's executable)."""
    from playwright.sync_api import sync_playwright

    exe = executable or find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (install the distribution's package: apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
            yield context.new_page()
        finally:
            browser.close()
