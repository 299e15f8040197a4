#!/usr/bin/env bash
# The server's decode speed alone and beside a neighbour that wants both cores (issue 36,
# docs/PERFORMANCE.md "The server beside a busy neighbour"). Starts dh-server on MODEL, sends
# REQS greedy 48-token chat requests alone, then REQS more while the neighbour runs, and prints
# each request's own timings.predicted_per_second.
#
# usage: bash scripts/contention-bench.sh [MODEL] [NEIGHBOUR]
#   MODEL      default models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-models.sh)
#   NEIGHBOUR  perplexity (default: `dh-server perplexity -t 2` on wikitext) | busy (two shell
#              busy loops)
# Environment: DH_BIN (default target/release/dh-server), PORT (8099), REQS (3); other variables
# (e.g. CANDLE_BARRIER_POOL_SPIN_LIMIT=200) reach the server and the perplexity neighbour alike.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
NEIGHBOUR=${2:-perplexity}
BIN=${DH_BIN:-target/release/dh-server}
PORT=${PORT:-8099}
REQS=${REQS:-3}
TEXT=${DH_SHARED:-../shared}/data/wikitext-2-raw-test.txt

"$BIN" -m "$MODEL" -c 4096 -np 2 --port "$PORT" > /tmp/contention-server.log 2>&1 &
server=$!
neighbours=()
cleanup() { kill "$server" "${neighbours[@]}" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  sleep 0.2
done

request() {
  curl -sf --max-time 120 "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"Write a long story about a dragon and a knight."}],"max_tokens":48,"temperature":0}' |
    python3 -c 'import json, sys; print(round(json.load(sys.stdin)["timings"]["predicted_per_second"], 1))'
}

printf 'alone:'
for _ in $(seq "$REQS"); do printf ' %s' "$(request)"; done
echo
case "$NEIGHBOUR" in
  perplexity)
    "$BIN" perplexity -m "$MODEL" -f "$TEXT" -c 512 --chunks 400 -t 2 > /dev/null 2>&1 &
    neighbours+=($!) ;;
  busy)
    for _ in 1 2; do sh -c 'while :; do :; done' & neighbours+=($!); done ;;
  *) echo "unknown neighbour $NEIGHBOUR" >&2; exit 2 ;;
esac
sleep 3
printf 'beside %s:' "$NEIGHBOUR"
for _ in $(seq "$REQS"); do printf ' %s' "$(request)"; done
echo
