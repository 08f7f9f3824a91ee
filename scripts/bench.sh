#!/usr/bin/env bash
# Benchmarks the forwarder against mock-llm directly and against nginx as a
# plain reverse proxy, on loopback only, in one bounded run (≈ 2.5 minutes).
# Prints a table of figures with their targets and writes it, plus the raw wrk
# output, to bench-results/<timestamp>.txt (gitignored). See docs/benchmarks.md.
#
#   ./scripts/bench.sh                     full run (10 s per run, 15 s seed run)
#   BENCH_DURATION=3 ./scripts/bench.sh    shorter runs (the seed run too, capped at 15 s)
#
# Other knobs (rarely needed): BENCH_THREADS (2), BENCH_CONNS (64),
# BENCH_PACED_CONNS (20), BENCH_PACED_DELAY_MS (20), BENCH_SEED_CONNS (800),
# BENCH_SEED_DURATION (15), BENCH_WARMUP (2), BENCH_SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10}
SEED_DURATION=${BENCH_SEED_DURATION:-$((DURATION < 15 ? DURATION : 15))}
[ -n "${BENCH_DURATION:-}" ] || SEED_DURATION=${BENCH_SEED_DURATION:-15}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-64}
PACED_CONNS=${BENCH_PACED_CONNS:-20}
PACED_DELAY_MS=${BENCH_PACED_DELAY_MS:-20}
SEED_CONNS=${BENCH_SEED_CONNS:-800}
WARMUP=${BENCH_WARMUP:-2}
BIN=$ROOT/target/release/forwarder
LUA_POST=$ROOT/scripts/bench/post.lua
LUA_PACED=$ROOT/scripts/bench/paced.lua
NGINX_TMPL=$ROOT/scripts/bench/nginx.conf.tmpl

log() { printf '==> %s\n' "$*" >&2; }

# ---------------------------------------------------------------- setup ----

install_system_deps() {
  local missing=()
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  command -v pgrep >/dev/null 2>&1 || missing+=(procps)
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
      # nginx-light is a transitional package on some releases; plain nginx works too.
      missing=("${missing[@]/nginx-light/nginx}")
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
  fi
}
install_system_deps
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building target/release/forwarder"
  cargo build --release -p forwarder -j 2 >&2
  log "building target/release/examples/loadgen (HTTP/WebSocket/gRPC client)"
  cargo build --release -p forwarder --example loadgen -j 2 >&2
fi
LOADGEN=$ROOT/target/release/examples/loadgen
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/forwarder-bench.XXXXXX)
mkdir -p "$ROOT/bench-results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$ROOT/bench-results/$STAMP.txt
RAW=$WORK/raw.log
: >"$RAW"

# Every process this script starts, killed on exit whatever happens.
CHILDREN=()
cleanup() {
  local pid
  for pid in "${CHILDREN[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${CHILDREN[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${CHILDREN[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ends processes this script started, quietly (no "Killed" job notices).
stop() {
  local pid
  for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # url [timeout_s]
  local url=$1 deadline=$((SECONDS + ${2:-15}))
  until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $url" >&2; return 1; }
    sleep 0.1
  done
}

wait_post() { # url: a chat completion answers 200
  local url=$1 deadline=$((SECONDS + 15))
  until curl -fsS -o /dev/null --max-time 2 -H 'Content-Type: application/json' \
      -d '{"model":"mock","messages":[{"role":"user","content":"hello"}]}' "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for POST $url" >&2; return 1; }
    sleep 0.1
  done
}

start_mock() { # port [extra args...] -> sets MOCK_PID
  local port=$1; shift
  "$BIN" mock-llm --listen "127.0.0.1:$port" "$@" >"$WORK/mock-$port.log" 2>&1 &
  MOCK_PID=$!
  CHILDREN+=("$MOCK_PID")
  wait_http "http://127.0.0.1:$port/healthz"
}

start_forwarder() { # port mock_port access_log(true|false) -> sets FWD_PID
  local port=$1 mport=$2 alog=$3 cfg=$WORK/forwarder-$1.yaml
  cat >"$cfg" <<EOF
server: {listen: 127.0.0.1:$port}
logging: {access_log: $alog}
upstreams:
  - {name: mock, provider: openai, base_url: "http://127.0.0.1:$mport/v1", models: [mock]}
EOF
  # With the access log on its lines go to stderr: send them to /dev/null, so
  # the run measures the forwarder's logging cost, not a terminal or a disk.
  local err=$WORK/forwarder-$port.err
  [ "$alog" = true ] && err=/dev/null
  "$BIN" serve --config "$cfg" >/dev/null 2>"$err" &
  FWD_PID=$!
  CHILDREN+=("$FWD_PID")
  wait_http "http://127.0.0.1:$port/readyz"
}

start_nginx() { # port mock_port -> sets NGINX_PID (master)
  local port=$1 mport=$2 dir=$WORK/nginx
  mkdir -p "$dir"
  sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@MOCK_PORT@|$mport|g" \
    "$NGINX_TMPL" >"$dir/nginx.conf"
  "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
  NGINX_PID=$!
  CHILDREN+=("$NGINX_PID")
  wait_http "http://127.0.0.1:$port/healthz"
  # Its workers too, so the exit trap can end them even if the master is gone.
  local w
  for w in $(pgrep -P "$NGINX_PID"); do CHILDREN+=("$w"); done
}

# utime+stime (clock ticks) summed over the given pids; all threads included.
cpu_ticks() {
  local total=0 pid rest
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    rest=$(sed 's/^.*) //' "/proc/$pid/stat")
    # after "pid (comm) ": field 3 is state, so utime (14) and stime (15) are words 12 and 13
    total=$((total + $(awk '{print $12 + $13}' <<<"$rest")))
  done
  echo "$total"
}

# Busy ticks of the whole machine (all cores), from /proc/stat: everything but idle and iowait.
sys_busy_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
# CPU of this shell's reaped children (wrk, once waited for): cutime + cstime.
sys_softirq_ticks() { awk '$1 == "cpu" {print $8; exit}' /proc/stat; }
child_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }

nginx_pids() { echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"; }

status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# run_wrk label lua url conns duration [extra wrk args...] -> sets W_* from the BENCH line
run_wrk() {
  local label=$1 lua=$2 url=$3 conns=$4 dur=$5; shift 5
  # extra args: wrk options, then optionally "--" and arguments for the Lua script
  local opts=() sargs=() out
  while (($#)); do
    if [ "$1" = -- ]; then shift; sargs=(-- "$@"); break; fi
    opts+=("$1"); shift
  done
  out=$(wrk -t"$THREADS" -c"$conns" -d"${dur}s" --latency -s "$lua" "${opts[@]}" "$url" "${sargs[@]}" 2>&1) || true
  { printf '\n----- %s: wrk -t%s -c%s -d%ss %s %s\n' "$label" "$THREADS" "$conns" "$dur" "$*" "$url"; echo "$out"; } >>"$RAW"
  local line
  line=$(grep '^BENCH ' <<<"$out" | tail -1 || true)
  [ -n "$line" ] || { echo "wrk produced no result for $label:" >&2; echo "$out" >&2; return 1; }
  eval "$(sed -e 's/^BENCH //' <<<"$line" | tr ' ' '\n' | sed 's/^/W_/')"
  W_rps=$(awk -v r="$W_requests" -v d="$W_duration_us" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
  W_errors=$((W_connect + W_read + W_write + W_status + W_timeout))
  W_non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out"); W_non2xx=${W_non2xx:-0}
}

warmup() { # url
  wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -s "$LUA_POST" "$1" >/dev/null 2>&1 || true
}

# max_run label url proxy_pids... -> rps, errors, CPU µs/request of the proxy and the mock
max_run() {
  local label=$1 url=$2; shift 2
  local pids=("$@") p0 m0 p1 m1
  warmup "$url"
  local s0 s1 c0 c1 q0 q1
  p0=$(cpu_ticks "${pids[@]}"); m0=$(cpu_ticks "$MOCK_PID"); s0=$(sys_busy_ticks); c0=$(child_ticks); q0=$(sys_softirq_ticks)
  log "max throughput: $label (${DURATION}s)"
  run_wrk "max $label" "$LUA_POST" "$url" "$CONNS" "$DURATION"
  p1=$(cpu_ticks "${pids[@]}"); m1=$(cpu_ticks "$MOCK_PID"); s1=$(sys_busy_ticks); c1=$(child_ticks); q1=$(sys_softirq_ticks)
  # Cores' worth of CPU used by wrk, and by anything that is not wrk, proxy or mock
  # (another build on the box, the kernel's softirq work not charged to a process).
  R_wrkcores[$label]=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v d="$W_duration_us" 'BEGIN {printf "%.2f", t / hz / (d / 1e6)}')
  R_softirq[$label]=$(awk -v t=$((q1 - q0)) -v hz="$HZ" -v d="$W_duration_us" 'BEGIN {printf "%.2f", t / hz / (d / 1e6)}')
  R_other[$label]=$(awk -v t=$(((s1 - s0) - (p1 - p0) - (m1 - m0) - (c1 - c0))) -v hz="$HZ" -v d="$W_duration_us" 'BEGIN {v = t / hz / (d / 1e6); if (v < 0) v = 0; printf "%.2f", v}')
  R_rps[$label]=$W_rps
  R_req[$label]=$W_requests
  R_err[$label]=$((W_errors))
  R_p99max[$label]=$W_p99
  if ((${#pids[@]})); then
    R_cpu[$label]=$(awk -v t=$((p1 - p0)) -v hz="$HZ" -v n="$W_requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
  fi
  R_mockcpu[$label]=$(awk -v t=$((m1 - m0)) -v hz="$HZ" -v n="$W_requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
}

paced_run() { # label url
  local label=$1 url=$2
  log "fixed rate ≈ $((PACED_CONNS * 1000 / PACED_DELAY_MS)) req/s: $label (${DURATION}s)"
  run_wrk "paced $label" "$LUA_PACED" "$url" "$PACED_CONNS" "$DURATION" -- "$PACED_DELAY_MS"
  P_rps[$label]=$W_rps
  P_p50[$label]=$W_p50
  P_p99[$label]=$W_p99
  P_err[$label]=$W_errors
}

HZ=$(getconf CLK_TCK)

# Cores' worth of CPU the rest of the machine uses over one second.
background_cores() {
  local a b
  a=$(sys_busy_ticks); sleep 1; b=$(sys_busy_ticks)
  awk -v t=$((b - a)) -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz}'
}
# All processes share the box's cores, so another job (a build, a test run)
# skews every figure. Wait up to BENCH_QUIET_WAIT seconds for it to go quiet,
# then go on regardless and say so in the report.
QUIET_WAIT=${BENCH_QUIET_WAIT:-20}
BACKGROUND=$(background_cores)
waited=0
while awk -v b="$BACKGROUND" 'BEGIN {exit !(b > 0.25)}' && ((waited < QUIET_WAIT)); do
  ((waited == 0)) && log "machine busy (${BACKGROUND} cores used by other processes); waiting up to ${QUIET_WAIT}s"
  waited=$((waited + 1)); BACKGROUND=$(background_cores)
done
declare -A R_softirq R_wrkcores R_other R_rps R_req R_err R_cpu R_mockcpu R_p99max P_rps P_p50 P_p99 P_err
PATH_CC=/v1/chat/completions
START=$SECONDS
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------- processes ----

MOCK_PORT=$(free_port); start_mock "$MOCK_PORT"; MOCK=$MOCK_PID
NGINX_PORT=$(free_port); start_nginx "$NGINX_PORT" "$MOCK_PORT"
FWD_PORT=$(free_port); start_forwarder "$FWD_PORT" "$MOCK_PORT" false; FWD=$FWD_PID
sleep 1
IDLE_RSS_FIRST=$(status_kib "$FWD" VmRSS)
FWDLOG_PORT=$(free_port); start_forwarder "$FWDLOG_PORT" "$MOCK_PORT" true; FWDLOG=$FWD_PID
wait_post "http://127.0.0.1:$MOCK_PORT$PATH_CC"
wait_post "http://127.0.0.1:$NGINX_PORT$PATH_CC"
wait_post "http://127.0.0.1:$FWD_PORT$PATH_CC"
wait_post "http://127.0.0.1:$FWDLOG_PORT$PATH_CC"

# ------------------------------------------------------------- 1 and 2 ----

MOCK_PID=$MOCK
max_run direct "http://127.0.0.1:$MOCK_PORT$PATH_CC"
# shellcheck disable=SC2046
max_run nginx "http://127.0.0.1:$NGINX_PORT$PATH_CC" $(nginx_pids)
max_run forwarder "http://127.0.0.1:$FWD_PORT$PATH_CC" "$FWD"
max_run forwarder+log "http://127.0.0.1:$FWDLOG_PORT$PATH_CC" "$FWDLOG"
stop "$FWDLOG"

# ------------------------------------------------------------------ 3 ----

paced_run direct "http://127.0.0.1:$MOCK_PORT$PATH_CC"
paced_run nginx "http://127.0.0.1:$NGINX_PORT$PATH_CC"
paced_run forwarder "http://127.0.0.1:$FWD_PORT$PATH_CC"

# Free the cores for the seed scenario.
kill -TERM "$NGINX_PID" 2>/dev/null || true
stop "$FWD" "$MOCK"
wait "$NGINX_PID" 2>/dev/null || true

# -------------------------------------------------------------- 4 and 5 ----

SEED_MOCK_PORT=$(free_port); start_mock "$SEED_MOCK_PORT" --latency 200ms
SEED_FWD_PORT=$(free_port); start_forwarder "$SEED_FWD_PORT" "$SEED_MOCK_PORT" false; SEED_FWD=$FWD_PID
sleep 1
IDLE_RSS=$(status_kib "$SEED_FWD" VmRSS)
# Control: the same load straight at the mock, to separate the forwarder's tail
# from what wrk, the mock and a shared 2-core box do at 800 connections.
log "seed control: mock --latency 200ms direct, ${SEED_CONNS} connections (${SEED_DURATION}s)"
run_wrk "seed direct" "$LUA_POST" "http://127.0.0.1:$SEED_MOCK_PORT$PATH_CC" "$SEED_CONNS" "$SEED_DURATION" --timeout 5s
SD_rps=$W_rps; SD_p50=$W_p50; SD_p99=$W_p99; SD_err=$((W_errors))
log "seed scenario: mock --latency 200ms, forwarder, ${SEED_CONNS} connections (${SEED_DURATION}s)"
run_wrk "seed forwarder" "$LUA_POST" "http://127.0.0.1:$SEED_FWD_PORT$PATH_CC" "$SEED_CONNS" "$SEED_DURATION" --timeout 5s
S_rps=$W_rps; S_p50=$W_p50; S_p99=$W_p99; S_max=$W_max; S_req=$W_requests
S_err=$((W_errors)); S_sock=$((W_connect + W_read + W_write + W_timeout)); S_status=$W_status; S_non2xx=$W_non2xx
PEAK_RSS=$(status_kib "$SEED_FWD" VmHWM)

# ------------------------------------------------------------------ 6 ----
# The three front ends side by side with one client (loadgen: closed loop,
# equal client cost), then 10,000 idle WebSocket connections held.

stop "$SEED_FWD"
PROTO_MOCK_PORT=$(free_port); start_mock "$PROTO_MOCK_PORT"
PROTO_PORT=$(free_port); PROTO_GRPC_PORT=$(free_port)
cat >"$WORK/proto.yaml" <<EOF
server: {listen: 127.0.0.1:$PROTO_PORT}
grpc: {enabled: true, listen: 127.0.0.1:$PROTO_GRPC_PORT}
logging: {access_log: false}
upstreams:
  - {name: mock, provider: openai, base_url: "http://127.0.0.1:$PROTO_MOCK_PORT/v1", models: [mock]}
EOF
"$BIN" serve --config "$WORK/proto.yaml" >/dev/null 2>"$WORK/proto.err" &
PROTO_FWD=$!; CHILDREN+=("$PROTO_FWD")
wait_http "http://127.0.0.1:$PROTO_PORT/readyz"
declare -A G_rps G_p50 G_p99 G_err
for proto in http ws grpc; do
  target=127.0.0.1:$PROTO_PORT
  [ "$proto" = grpc ] && target=127.0.0.1:$PROTO_GRPC_PORT
  log "protocols: loadgen $proto, ${CONNS} workers (${DURATION}s)"
  line=$("$LOADGEN" load --protocol "$proto" --target "$target" --concurrency "$CONNS" --duration "${DURATION}s" 2>>"$RAW" | tail -1)
  echo "loadgen $proto: $line" >>"$RAW"
  G_rps[$proto]=$(sed -n 's/.* rps=\([0-9]*\).*/\1/p' <<<"$line")
  G_p50[$proto]=$(sed -n 's/.* p50_ms=\([0-9.]*\).*/\1/p' <<<"$line")
  G_p99[$proto]=$(sed -n 's/.* p99_ms=\([0-9.]*\).*/\1/p' <<<"$line")
  G_err[$proto]=$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$line")
done
IDLE_WS=${BENCH_IDLE_WS:-10000}
WS_RSS_BEFORE=$(status_kib "$PROTO_FWD" VmRSS)
log "protocols: holding $IDLE_WS idle WebSocket connections"
rm -f "$WORK/ws.ready"
"$LOADGEN" idle-ws --target "127.0.0.1:$PROTO_PORT" --connections "$IDLE_WS" --hold 8s --ready-file "$WORK/ws.ready" >>"$RAW" 2>&1 &
IDLE_PID=$!; CHILDREN+=("$IDLE_PID")
for _ in $(seq 1 120); do [ -f "$WORK/ws.ready" ] && break; sleep 0.5; done
sleep 2
WS_OPEN=$(curl -s "http://127.0.0.1:$PROTO_PORT/metrics" | awk '/^forwarder_connections\{protocol="websocket"\}/ {print $2}')
WS_RSS_HELD=$(status_kib "$PROTO_FWD" VmRSS)
wait "$IDLE_PID" 2>/dev/null || true
WS_PER_CONN=$(awk -v a="$WS_RSS_BEFORE" -v b="$WS_RSS_HELD" -v n="${WS_OPEN:-0}" 'BEGIN {if (n > 0) printf "%.1f", (b - a) / n; else print "n/a"}')
ELAPSED=$((SECONDS - START))

# --------------------------------------------------------------- report ----

ms() { awk -v u="$1" 'BEGIN {printf "%.2f ms", u / 1000}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
verdict() { if awk "BEGIN {exit !($1)}"; then echo met; else echo "NOT met"; fi; }

ADD_P50=$((${P_p50[forwarder]} - ${P_p50[direct]}))
ADD_P99=$((${P_p99[forwarder]} - ${P_p99[direct]}))
NGX_ADD_P50=$((${P_p50[nginx]} - ${P_p50[direct]}))
NGX_ADD_P99=$((${P_p99[nginx]} - ${P_p99[direct]}))
PCT=$(awk -v f="${R_rps[forwarder]}" -v n="${R_rps[nginx]}" 'BEGIN {printf "%.0f", 100 * f / n}')
PCT_LOG=$(awk -v f="${R_rps[forwarder+log]}" -v n="${R_rps[nginx]}" 'BEGIN {printf "%.0f", 100 * f / n}')

row() { printf '%-52s %-22s %-14s %s\n' "$1" "$2" "$3" "$4"; }
report() {
  echo "ModelForwarder benchmark  $(date -u '+%Y-%m-%d %H:%M UTC')  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'), $("$NGINX" -v 2>&1 | sed 's/.*: //')"
  echo "max runs: wrk -t$THREADS -c$CONNS -d${DURATION}s POST $PATH_CC (+${WARMUP}s warm-up each); fixed rate: -c$PACED_CONNS, ${PACED_DELAY_MS} ms delay/request; seed: -c$SEED_CONNS -d${SEED_DURATION}s --timeout 5s, mock --latency 200ms"
  echo "all processes share the same $(nproc) cores (wrk, proxy, mock); wall time of measurements ${ELAPSED}s"
  echo
  row "FIGURE" "VALUE" "TARGET" "RESULT"
  row "1. max req/s direct (wrk -> mock)" "${R_rps[direct]} (err ${R_err[direct]})" "reference" ""
  row "1. max req/s nginx -> mock" "${R_rps[nginx]} (err ${R_err[nginx]})" "reference" ""
  row "1. max req/s forwarder -> mock (access log off)" "${R_rps[forwarder]} (err ${R_err[forwarder]})" "" ""
  row "1. forwarder req/s as % of nginx" "${PCT}%" ">= 50%" "$(verdict "$PCT >= 50")"
  row "1. max req/s forwarder, access log ON (stderr->null)" "${R_rps[forwarder+log]} (err ${R_err[forwarder+log]})" "info" "${PCT_LOG}% of nginx"
  row "2. CPU/request nginx (all workers)" "${R_cpu[nginx]} us" "~20 us (ref)" ""
  row "2. CPU/request forwarder (access log off)" "${R_cpu[forwarder]} us" "<= 50 us" "$(verdict "${R_cpu[forwarder]} <= 50")"
  row "2. CPU/request forwarder, access log ON" "${R_cpu[forwarder+log]} us" "info" ""
  row "2. CPU/request mock-llm (during direct run)" "${R_mockcpu[direct]} us" "info" ""
  row "2. CPU/request mock-llm (during nginx / fwd run)" "${R_mockcpu[nginx]} / ${R_mockcpu[forwarder]} us" "info" ""
  row "3. fixed-rate achieved req/s direct/nginx/fwd" "${P_rps[direct]}/${P_rps[nginx]}/${P_rps[forwarder]}" "~1000" "err ${P_err[direct]}/${P_err[nginx]}/${P_err[forwarder]}"
  row "3. P50 direct / nginx / forwarder" "$(ms "${P_p50[direct]}") / $(ms "${P_p50[nginx]}") / $(ms "${P_p50[forwarder]}")" "" ""
  row "3. P99 direct / nginx / forwarder" "$(ms "${P_p99[direct]}") / $(ms "${P_p99[nginx]}") / $(ms "${P_p99[forwarder]}")" "" ""
  row "3. added P50 forwarder (fwd - direct)" "$(ms "$ADD_P50")" "info" "nginx: $(ms "$NGX_ADD_P50")"
  row "3. added P99 forwarder (fwd - direct)" "$(ms "$ADD_P99")" "< 1 ms" "$(verdict "$ADD_P99 < 1000")"
  row "3. added P99 nginx (nginx - direct)" "$(ms "$NGX_ADD_P99")" "reference" ""
  row "4. seed req/s (200 ms mock, 800 conns)" "$S_rps ($S_req req)" "info" "ideal $((SEED_CONNS * 5))"
  row "4. seed P50" "$(ms "$S_p50")" "info" ""
  row "4. seed P99" "$(ms "$S_p99")" "< 250 ms" "$(verdict "$S_p99 < 250000")"
  row "4. seed control (wrk -> 200ms mock): req/s; P50/P99" "$SD_rps; $(awk -v a="$SD_p50" -v b="$SD_p99" 'BEGIN {printf "%.1f / %.1f ms", a / 1000, b / 1000}')" "reference" "err $SD_err"
  row "4. seed errors (HTTP>=400 + socket/timeout)" "$S_err ($S_status http, $S_sock socket)" "0" "$(verdict "$S_err == 0 && $S_non2xx == 0")"
  row "5. forwarder RSS idle after start (VmRSS)" "$(mib "$IDLE_RSS")" "< 20 MiB" "$(verdict "$IDLE_RSS < 20480")"
  row "5. forwarder peak RSS after seed (VmHWM)" "$(mib "$PEAK_RSS")" "info" ""
  local p
  for p in http ws grpc; do
    row "6. $p via loadgen (${CONNS} workers): req/s; P50/P99" "${G_rps[$p]}; ${G_p50[$p]} / ${G_p99[$p]} ms" "info" "err ${G_err[$p]}"
  done
  row "6. idle WebSocket connections held (gauge)" "${WS_OPEN:-?} of $IDLE_WS" "$IDLE_WS" "$(verdict "${WS_OPEN:-0} >= $IDLE_WS")"
  row "6. forwarder RSS before / holding them" "$(mib "$WS_RSS_BEFORE") / $(mib "$WS_RSS_HELD")" "info" "${WS_PER_CONN} KiB/conn"
  echo
  echo "CPU in cores during the max runs (2 = whole box): wrk; 'other' = busy CPU not charged to wrk, proxy or mock"
  echo "(other jobs, and kernel softirq time - loopback packet processing - of which 'softirq' is shown separately)"
  local l
  for l in direct nginx forwarder forwarder+log; do
    printf '  %-14s wrk %s  other %s (softirq %s)  p99 at max load %s\n' "$l" "${R_wrkcores[$l]}" "${R_other[$l]}" "${R_softirq[$l]}" "$(ms "${R_p99max[$l]}")"
  done
  echo "load average at start: $LOADAVG_START; other processes used ${BACKGROUND} cores just before the run"
  if awk -v b="$BACKGROUND" 'BEGIN {exit !(b > 0.25)}'; then
    echo "WARNING: the machine was busy with other work before the run; figures are pessimistic"
  fi
  for l in direct nginx forwarder forwarder+log; do
    if awk -v o="${R_other[$l]}" 'BEGIN {exit !(o > 0.5)}'; then
      echo "WARNING: $l max run: ${R_other[$l]} cores of CPU not charged to wrk, proxy or mock - probably another job on the box; its figures are pessimistic, re-run when the machine is quiet"
    fi
  done
  echo "seed: wrk Non-2xx/3xx responses: $S_non2xx; max latency $(ms "$S_max"). First forwarder idle VmRSS: $(mib "$IDLE_RSS_FIRST")."
  echo "latencies come from wrk's per-microsecond histogram (done() callback), so they are not rounded."
}
report | tee "$RESULTS"
{ echo; echo "================ raw wrk output ================"; cat "$RAW"; } >>"$RESULTS"
log "written to ${RESULTS#"$ROOT"/}"
