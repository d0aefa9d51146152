#!/usr/bin/env bash
# Set up, then lint (ruff: pycodestyle, pyflakes, import order) and run the whole test suite (unit tests on
# tiny models + integration on the embedded model). Extra arguments go to pytest (e.g. -m "not slow" for the
# unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
exec python -m pytest -q --durations=15 tests "$@"
