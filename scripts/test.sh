#!/usr/bin/env bash
# Set up, then lint (ruff: pycodestyle, pyflakes, import order) and run the whole test suite (unit tests on
# tiny models + integration on the embedded model). Extra arguments go to pytest (e.g. -m "not slow" for the
# unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# the browser tests of `factedit ui` drive the distribution's Chromium (Playwright's own download cannot reach
# its host from these machines): installed here, for the tests, with a notice; where it cannot be installed
# they are skipped with that reason
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1 && [ -z "${FACTEDIT_CHROMIUM:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "test: installing the distribution's chromium for the browser tests (apt-get install chromium)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    { $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }; } \
      >/dev/null 2>&1 || echo "test: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "test: no chromium and no apt-get: the browser tests will be skipped (install Chromium, or set" \
      "FACTEDIT_CHROMIUM to a Chrome/Chromium executable)" >&2
  fi
fi
export HF_HUB_OFFLINE=1
ruff check .
exec python -m pytest -q --durations=15 tests "$@"
