# Sourced by the e2e scripts: starts `forwarder mock-llm` and a forwarder in
# front of it on free loopback ports, and stops both on exit.
#
#   source e2e/lib/local-pair.sh
#   pair_binary                          # sets MF_FORWARDER_BIN (debug build if needed)
#   pair_start "<mock-llm args>" "<extra forwarder YAML>"   # sets MOCK_PORT FWD_PORT FWD_PID WORK
#
# Traffic stays on 127.0.0.1; the caller's FORWARDER_* variables are dropped
# (the forwarder reads them as config overrides).

PAIR_PIDS=()
WORK=$(mktemp -d)
pair_cleanup() {
  local p
  for p in "${PAIR_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PAIR_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap pair_cleanup EXIT

pair_binary() {
  if [ -z "${MF_FORWARDER_BIN:-}" ]; then
    MF_FORWARDER_BIN="${CARGO_TARGET_DIR:-target}/debug/forwarder"
    if [ ! -x "$MF_FORWARDER_BIN" ] ||
       [ -n "$(find forwarder forwarder-config docs/openapi.json Cargo.lock -type f -newer "$MF_FORWARDER_BIN" -print -quit)" ]; then
      cargo build -q --locked -p forwarder --bin forwarder
    fi
  fi
  local v
  for v in $(compgen -e | grep '^FORWARDER_' || true); do unset "$v"; done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_ready() { # url
  local deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $1" >&2; cat "$WORK"/*.log >&2; exit 1; }
    sleep 0.1
  done
}

# $1: mock-llm arguments; $2: YAML lines appended to the forwarder's config;
# UPSTREAM_EXTRA: fields appended to the upstream's flow map (", timeout: 2s");
# PAIR_ANTHROPIC=1: the same mock-llm also serves `mock` as a
# `provider: anthropic` upstream (for the Messages routes).
pair_start() {
  MOCK_PORT=$(free_port)
  FWD_PORT=$(free_port)
  # shellcheck disable=SC2086
  "$MF_FORWARDER_BIN" mock-llm --listen "127.0.0.1:$MOCK_PORT" $1 >"$WORK/mock.log" 2>&1 &
  PAIR_PIDS+=($!)
  local anthropic=""
  if [ -n "${PAIR_ANTHROPIC:-}" ]; then
    anthropic="  - {name: mock-llm-anthropic, provider: anthropic, base_url: \"http://127.0.0.1:$MOCK_PORT/v1\", models: [mock]${UPSTREAM_EXTRA:-}}"
  fi
  cat >"$WORK/forwarder.yaml" <<YAML
server: {listen: "127.0.0.1:$FWD_PORT"}
logging: {access_log: false}
upstreams:
  - {name: mock-llm, provider: openai, base_url: "http://127.0.0.1:$MOCK_PORT/v1", models: [mock]${UPSTREAM_EXTRA:-}}
${anthropic}
${2:-}
YAML
  "$MF_FORWARDER_BIN" serve --config "$WORK/forwarder.yaml" >"$WORK/forwarder.log" 2>&1 &
  FWD_PID=$!
  PAIR_PIDS+=("$FWD_PID")
  wait_ready "http://127.0.0.1:$MOCK_PORT/healthz"
  wait_ready "http://127.0.0.1:$FWD_PORT/readyz"
}

# Resident set size of a process, in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
