#!/usr/bin/env bash
# Serve the setup.sh model with llama-server on 127.0.0.1 (OpenAI-compatible, /v1).
#
#   scripts/real_llm/serve.sh [PORT] [extra llama-server flags...]     # default port 8088
#   xctl diag node-2:4800 --base-url http://127.0.0.1:8088/v1 --model qwen
#
# --offline: never reach a model hub; --no-webui: API only; -np 1: one slot gets the whole
# context; --jinja with the template next to this script: the model's fenced ```json tool
# calls come back as OpenAI tool_calls. Overrides: THREADS (default 2), CTX (default 16384:
# the findings and the tool specs are ~2.5k tokens, and one turn of tool results can add as
# much again, so 4096 overflows), LLAMA_SERVER, XCTL_LLM_MODEL.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
CACHE="${XCTL_LLM_CACHE:-$HOME/.cache/xctl-llm}"
SERVER="${LLAMA_SERVER:-$CACHE/bin/llama-server}"
MODEL="${XCTL_LLM_MODEL:-$CACHE/models/qwen2.5-coder-0.5b-instruct-q4.gguf}"
TEMPLATE="$HERE/qwen-fenced-json-tools.jinja"
PORT="${1:-8088}"
shift || true
for f in "$SERVER" "$MODEL"; do
  [[ -e "$f" ]] || { echo "serve.sh: $f is missing: run scripts/real_llm/setup.sh first" >&2; exit 1; }
done
exec "$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT" --offline --no-webui \
  -t "${THREADS:-2}" -c "${CTX:-16384}" -np 1 --jinja --chat-template-file "$TEMPLATE" "$@"
