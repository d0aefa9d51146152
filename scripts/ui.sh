#!/usr/bin/env bash
# Set up, then start the web page (`factedit ui`) on the embedded SmolLM2-135M-Instruct at
# http://127.0.0.1:7860 (this machine only). Extra arguments go to `factedit ui` (e.g. --port 8080,
# --host 0.0.0.0 to listen on every interface, --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
data=()
if [ -f ../shared/data/corpus/wikitext2_valid.txt ]; then  # as scripts/demo.sh
  data+=(--stats-corpus ../shared/data/corpus/wikitext2_valid.txt)
fi
if [ -f ../shared/data/counterfact/counterfact_knowedit.jsonl ]; then  # what the Evaluate tab offers
  data+=(--eval-dataset ../shared/data/counterfact/counterfact_knowedit.jsonl)
fi
exec factedit ui "${data[@]}" "$@"
