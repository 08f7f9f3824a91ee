#!/usr/bin/env bash
# The soak scenario: a forwarder (API keys and WebSocket on) in front of
# `forwarder mock-llm` (10-40 ms latency, paced streams, 1% injected 503s;
# soak.py adds connection resets and hangs every interval), both on free
# loopback ports, under steady mixed load for DURATION seconds, sampled
# every INTERVAL seconds; fails when RSS, fds, threads or P99 trend upward
# beyond the bounds in e2e/soak/soak.py (documented in docs/load-testing.md).
#
#   bash e2e/soak/soak.sh                                   # CI: 120 s, 10 s samples
#   DURATION=3600 INTERVAL=60 RATE=40 OUT=soak-out \
#     MF_FORWARDER_BIN=target/release/forwarder nice -n 10 bash e2e/soak/soak.sh
# OUT keeps soak.csv (one row per sample) and the logs; plot it with
# python3 e2e/soak/plot.py OUT/soak.csv > soak.svg
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-120}
INTERVAL=${INTERVAL:-10}
RATE=${RATE:-40}
CONCURRENCY=${CONCURRENCY:-16}
WARMUP=${WARMUP:-2}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "soak.sh: no $PY: run ./scripts/test.sh (creates .venv)" >&2; exit 1; }

"$PY" e2e/soak/soak.py --self-test   # the trend verdict, on made-up series
source e2e/lib/local-pair.sh
pair_binary
KEY="sk-soak-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
printf 'soak: %s\n' "$KEY" >"$WORK/keys.yaml"
UPSTREAM_EXTRA=", timeout: 2s" pair_start \
  "--latency uniform:10ms..40ms --tokens-per-second 400 --reply-words 20 --error-rate 0.01 --error-status 503" \
  "auth: {api_keys_file: \"$WORK/keys.yaml\"}
websocket: {enabled: true}"

csv="$WORK/soak.csv"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; csv="$OUT/soak.csv"; fi
echo "soak.sh: ${DURATION}s at $RATE req/s, samples every ${INTERVAL}s, forwarder pid $FWD_PID ($MF_FORWARDER_BIN)"
set +e
MF_API_KEY="$KEY" "$PY" e2e/soak/soak.py --base-url "http://127.0.0.1:$FWD_PORT" --pid "$FWD_PID" \
  --mock-url "http://127.0.0.1:$MOCK_PORT" --duration "$DURATION" --interval "$INTERVAL" \
  --rate "$RATE" --concurrency "$CONCURRENCY" --warmup "$WARMUP" --csv "$csv"
rc=$?
set -e
if [ -n "${OUT:-}" ]; then cp "$WORK"/*.log "$OUT/"; fi
grep -q panicked "$WORK/forwarder.log" && { echo "soak.sh: the forwarder panicked" >&2; rc=1; }
[ "$rc" -eq 0 ] || { echo "soak.sh: FAIL" >&2; exit 1; }
echo "soak.sh: passed"
