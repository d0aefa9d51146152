#!/usr/bin/env bash
# Set up, then edit one fact in the embedded SmolLM2-135M-Instruct and show before/after.
# Extra arguments go to `factedit edit` (e.g. --json, --method rome, --layer 7).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
corpus=()
# statistics from WikiText-2 when the project's shared data sits beside the checkout;
# otherwise factedit falls back to its default (wikitext-103 with network, else model-sampled text)
if [ -f ../shared/data/corpus/wikitext2_valid.txt ]; then
  corpus=(--stats-corpus ../shared/data/corpus/wikitext2_valid.txt)
fi
exec factedit edit --prompt "{} is located in the city of" --subject "Eiffel Tower" \
  --target "Rome" --true "Paris" "${corpus[@]}" "$@"
