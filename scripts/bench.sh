#!/usr/bin/env bash
# Benchmarks the forwarder side by side with nginx as a plain reverse proxy,
# both in front of the same mock-llm, on loopback only, in one bounded run
# (≈ 5 minutes). Every figure that has a target is a ratio or a difference
# against nginx (or the mock alone) measured in the same run, so a busy shared
# machine moves both sides alike. Prints a table of figures with their targets
# (issue 10, "Speed") and writes it, plus the raw wrk output, to
# bench-results/<timestamp>.txt (gitignored). See docs/benchmarks.md.
#
#   ./scripts/bench.sh                     full run (10 s per run, 15 s seed runs)
#   BENCH_DURATION=3 ./scripts/bench.sh    shorter runs (the seed runs too, capped at 15 s)
#
# Other knobs (rarely needed): BENCH_THREADS (2), BENCH_CONNS (64),
# BENCH_RATES ("200 3000"), BENCH_PACED_CONNS (64), BENCH_PACED_ROUNDS (5),
# BENCH_STREAM_TOKENS (500), BENCH_STREAM_CONNS (64), BENCH_SEED_CONNS (800),
# BENCH_SEED_DURATION (15), BENCH_SETTLE (30), BENCH_PROTO_DURATION (5),
# BENCH_IDLE_WS (10000), BENCH_WARMUP (2), BENCH_QUIET_WAIT (20),
# BENCH_SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10}
SEED_DURATION=${BENCH_SEED_DURATION:-$((DURATION < 15 ? DURATION : 15))}
[ -n "${BENCH_DURATION:-}" ] || SEED_DURATION=${BENCH_SEED_DURATION:-15}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-64}
read -r -a RATES <<<"${BENCH_RATES:-200 3000}"
PACED_CONNS=${BENCH_PACED_CONNS:-64}
PACED_ROUNDS=${BENCH_PACED_ROUNDS:-5}
PACED_SEG=$((DURATION / PACED_ROUNDS)); ((PACED_SEG >= 1)) || PACED_SEG=1
STREAM_TOKENS=${BENCH_STREAM_TOKENS:-500}
STREAM_CONNS=${BENCH_STREAM_CONNS:-64}
SEED_CONNS=${BENCH_SEED_CONNS:-800}
SETTLE=${BENCH_SETTLE:-30}
PROTO_DURATION=${BENCH_PROTO_DURATION:-5}
WARMUP=${BENCH_WARMUP:-2}
BIN=$ROOT/target/release/forwarder
LUA_POST=$ROOT/scripts/bench/post.lua
LUA_RATE=$ROOT/scripts/bench/rate.lua
LUA_STREAM=$ROOT/scripts/bench/stream.lua
NGINX_TMPL=$ROOT/scripts/bench/nginx.conf.tmpl
# The streamed request (stream.lua sends the same body): prompt "hello", so the
# mock's reply is "mock reply: hello" and then --reply-words filler words.
STREAM_BODY='{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello"}]}'
STREAM_REPLY_WORDS=$((STREAM_TOKENS - 3))

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
  log "building target/release/forwarder and examples/loadgen (HTTP/WebSocket/gRPC client)"
  cargo build --release -p forwarder --bin forwarder --example loadgen -j "${BENCH_JOBS:-2}" >&2
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

# Drops pids from CHILDREN once they are ended, so the exit trap never
# signals a pid the system may have handed to another process since.
forget() {
  local keep=() pid gone
  for pid in "${CHILDREN[@]}"; do
    for gone in "$@"; do [ "$pid" = "$gone" ] && continue 2; done
    keep+=("$pid")
  done
  CHILDREN=("${keep[@]}")
}

# Ends processes this script started, quietly (no "Killed" job notices).
stop() {
  local pid
  for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
  forget "$@"
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

start_nginx() { # name port stream_port mock_port -> sets NGINX_PID (master)
  local name=$1 port=$2 sport=$3 mport=$4 dir=$WORK/nginx-$1
  mkdir -p "$dir"
  sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@STREAM_PORT@|$sport|g" \
    -e "s|@MOCK_PORT@|$mport|g" "$NGINX_TMPL" >"$dir/nginx.conf"
  "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
  NGINX_PID=$!
  CHILDREN+=("$NGINX_PID")
  wait_http "http://127.0.0.1:$port/healthz"
  wait_http "http://127.0.0.1:$sport/healthz"
  # Its workers too, so the exit trap can end them even if the master is gone.
  local w
  for w in $(pgrep -P "$NGINX_PID"); do CHILDREN+=("$w"); done
}

stop_nginx() { # master pid: graceful stop (the master ends its workers first)
  local pid=$1 workers w
  workers=$(pgrep -P "$pid" | tr '\n' ' ' || true)
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # A worker left behind (master killed hard): end it, if that pid is still an nginx.
  for w in $workers; do
    grep -qs nginx "/proc/$w/cmdline" && kill -KILL "$w" 2>/dev/null || true
  done
  # shellcheck disable=SC2086
  forget "$pid" $workers
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
sys_softirq_ticks() { awk '$1 == "cpu" {print $8; exit}' /proc/stat; }
# CPU of this shell's reaped children (wrk, once waited for): cutime + cstime.
child_ticks() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }

nginx_pids() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }

status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
# The same field summed over several processes (nginx: master and workers).
sum_status_kib() {
  local total=0 pid
  for pid in "${@:2}"; do total=$((total + $(status_kib "$pid" "$1"))); done
  echo "$total"
}

# A measuring window around one run: CPU of the proxy's processes, of the
# mock, of wrk (this shell's reaped children), of the kernel's softirq, and of
# the whole machine. win_end stores, under the label: T_proxy / T_mock (ticks)
# and, in cores over the window's wall time, C_wrk, C_softirq and C_other (busy
# CPU not charged to wrk, proxy or mock: another job on the box, or softirq).
win_begin() { # proxy pids...
  WIN_PIDS=("$@")
  WB_p=$(cpu_ticks "$@"); WB_m=$(cpu_ticks "$MOCK_PID"); WB_s=$(sys_busy_ticks)
  WB_c=$(child_ticks); WB_q=$(sys_softirq_ticks); WB_t=$EPOCHREALTIME
}
win_end() { # label
  local l=$1 p m s c q secs
  p=$(($(cpu_ticks "${WIN_PIDS[@]}") - WB_p)); m=$(($(cpu_ticks "$MOCK_PID") - WB_m))
  s=$(($(sys_busy_ticks) - WB_s)); c=$(($(child_ticks) - WB_c)); q=$(($(sys_softirq_ticks) - WB_q))
  secs=$(awk -v a="$WB_t" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')
  T_proxy[$l]=$p; T_mock[$l]=$m
  C_wrk[$l]=$(awk -v t="$c" -v hz="$HZ" -v d="$secs" 'BEGIN {printf "%.2f", t / hz / d}')
  C_softirq[$l]=$(awk -v t="$q" -v hz="$HZ" -v d="$secs" 'BEGIN {printf "%.2f", t / hz / d}')
  C_other[$l]=$(awk -v t=$((s - p - m - c)) -v hz="$HZ" -v d="$secs" 'BEGIN {v = t / hz / d; if (v < 0) v = 0; printf "%.2f", v}')
  WINDOWS+=("$l")
}

# µs of CPU per unit: ticks count
per_unit_us() { awk -v t="$1" -v hz="$HZ" -v n="$2" 'BEGIN {if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "n/a"}'; }

# run_wrk label lua url conns duration [extra wrk args...] -> sets W_* from the
# BENCH line, and W_HIST (a file: the run's latency histogram, "us count" lines)
run_wrk() {
  local label=$1 lua=$2 url=$3 conns=$4 dur=$5; shift 5
  # extra args: wrk options, then optionally "--" and arguments for the Lua script
  local opts=() sargs=() out
  while (($#)); do
    if [ "$1" = -- ]; then shift; sargs=(-- "$@"); break; fi
    opts+=("$1"); shift
  done
  out=$(wrk -t"$THREADS" -c"$conns" -d"${dur}s" --latency -s "$lua" "${opts[@]}" "$url" "${sargs[@]}" 2>&1) || true
  W_HIST=$WORK/last.hist
  grep '^HIST ' <<<"$out" | tail -1 | tr ' ' '\n' | sed -n 's/^\([0-9]*\):\([0-9]*\)$/\1 \2/p' >"$W_HIST" || true
  { printf '\n----- %s: wrk -t%s -c%s -d%ss %s %s %s\n' "$label" "$THREADS" "$conns" "$dur" "${opts[*]}" "$url" "${sargs[*]}"
    grep -v '^HIST ' <<<"$out"; } >>"$RAW"
  local line
  line=$(grep '^BENCH ' <<<"$out" | tail -1 || true)
  [ -n "$line" ] || { echo "wrk produced no result for $label:" >&2; echo "$out" >&2; return 1; }
  eval "$(sed -e 's/^BENCH //' <<<"$line" | tr ' ' '\n' | sed 's/^/W_/')"
  W_rps=$(awk -v r="$W_requests" -v d="$W_duration_us" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
  W_errors=$((W_connect + W_read + W_write + W_status + W_timeout))
  W_non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out"); W_non2xx=${W_non2xx:-0}
}

# Percentile p of a pooled histogram file ("us count" lines, any order), by
# wrk's own rule (the first value whose cumulative count reaches p% of all).
hist_pct() { # file p
  sort -n "$1" | awk -v p="$2" '{v[NR] = $1; c[NR] = $2; n += $2}
    END {rank = int(p / 100 * n + 0.5); if (rank < 1) rank = 1
         for (i = 1; i <= NR; i++) {t += c[i]; if (t >= rank) {print v[i]; exit}}}'
}

warmup() { # url [lua conns]
  wrk -t"$THREADS" -c"${3:-$CONNS}" -d"${WARMUP}s" -s "${2:-$LUA_POST}" "$1" >/dev/null 2>&1 || true
}

# max_run label url proxy_pids... -> req/s, errors, CPU µs/request of the proxy and the mock
max_run() {
  local label=$1 url=$2; shift 2
  warmup "$url"
  log "max throughput: $label (${DURATION}s)"
  win_begin "$@"
  run_wrk "max $label" "$LUA_POST" "$url" "$CONNS" "$DURATION"
  win_end "max $label"
  R_rps[$label]=$W_rps
  R_err[$label]=$((W_errors + W_non2xx))
  R_p99max[$label]=$W_p99
  R_cpu[$label]=$(per_unit_us "${T_proxy[max $label]}" "$W_requests")
  R_mockcpu[$label]=$(per_unit_us "${T_mock[max $label]}" "$W_requests")
}

# paced_runs rate: direct, nginx and forwarder at the same fixed rate, in
# PACED_ROUNDS rounds of PACED_SEG seconds each, the order rotating every round,
# so a passing disturbance does not land on one target only; each target's
# latency histograms are pooled and its percentiles computed exactly.
paced_runs() {
  local rate=$1 r k i label
  local labels=(direct nginx forwarder)
  local urls=("http://127.0.0.1:$MOCK_PORT$PATH_CC" "http://127.0.0.1:$NGINX_PORT$PATH_CC" "http://127.0.0.1:$FWD_PORT$PATH_CC")
  local -A req dur err
  for label in "${labels[@]}"; do : >"$WORK/hist-$rate-$label"; req[$label]=0; dur[$label]=0; err[$label]=0; done
  log "fixed rate $rate req/s: direct, nginx, forwarder; $PACED_ROUNDS rounds of ${PACED_SEG}s each"
  # shellcheck disable=SC2046
  win_begin $(nginx_pids "$NGINX_PID") "$FWD"
  for ((r = 0; r < PACED_ROUNDS; r++)); do
    for ((k = 0; k < 3; k++)); do
      i=$(((r + k) % 3)); label=${labels[i]}
      run_wrk "rate $rate $label (round $((r + 1)))" "$LUA_RATE" "${urls[i]}" "$PACED_CONNS" "$PACED_SEG" -- "$rate" "$THREADS"
      cat "$W_HIST" >>"$WORK/hist-$rate-$label"
      req[$label]=$((req[$label] + W_requests)); dur[$label]=$((dur[$label] + W_duration_us))
      err[$label]=$((err[$label] + W_errors + W_non2xx))
    done
  done
  win_end "rate $rate"
  for label in "${labels[@]}"; do
    P_rps[$rate $label]=$(awk -v r="${req[$label]}" -v d="${dur[$label]}" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
    P_p50[$rate $label]=$(hist_pct "$WORK/hist-$rate-$label" 50)
    P_p99[$rate $label]=$(hist_pct "$WORK/hist-$rate-$label" 99)
    P_err[$rate $label]=${err[$label]}
  done
}

# stream_run label url proxy_pids... -> streams/s, errors, bytes/stream, CPU per event
stream_run() {
  local label=$1 url=$2; shift 2
  warmup "$url" "$LUA_STREAM" "$STREAM_CONNS"
  log "streams of $STREAM_TOKENS tokens: $label (${DURATION}s)"
  win_begin "$@"
  run_wrk "stream $label" "$LUA_STREAM" "$url" "$STREAM_CONNS" "$DURATION"
  win_end "stream $label"
  X_sps[$label]=$W_rps
  X_err[$label]=$((W_errors + W_non2xx))
  X_bytes[$label]=$(awk -v b="$W_bytes" -v n="$W_requests" 'BEGIN {if (n > 0) printf "%.0f", b / n; else print 0}')
  X_p99[$label]=$W_p99
  X_cpu_event[$label]=$(per_unit_us "${T_proxy[stream $label]}" $((W_requests * EVENTS)))
  X_cpu_stream[$label]=$(per_unit_us "${T_proxy[stream $label]}" "$W_requests")
  X_mock_stream[$label]=$(per_unit_us "${T_mock[stream $label]}" "$W_requests")
}

# SSE events ("data: …" lines) of one streamed answer, and whether it ends with [DONE].
count_events() { # url
  local out
  out=$(curl -sSN --max-time 10 -H 'Content-Type: application/json' -d "$STREAM_BODY" "$1" || true)
  printf '%s %s\n' "$(grep -c '^data: ' <<<"$out")" "$(grep '^data: ' <<<"$out" | tail -1 | grep -q '^data: \[DONE\]' && echo done || echo no-done)"
}

seed_run() { # label url -> S_* under the label
  local label=$1 url=$2; shift 2
  log "seed scenario: 200 ms mock, $label, ${SEED_CONNS} connections (${SEED_DURATION}s)"
  win_begin "$@"
  run_wrk "seed $label" "$LUA_POST" "$url" "$SEED_CONNS" "$SEED_DURATION" --timeout 5s
  win_end "seed $label"
  S_rps[$label]=$W_rps; S_p50[$label]=$W_p50; S_p99[$label]=$W_p99; S_max[$label]=$W_max
  S_req[$label]=$W_requests; S_status[$label]=$W_status; S_non2xx[$label]=$W_non2xx
  S_sock[$label]=$((W_connect + W_read + W_write + W_timeout))
  S_err[$label]=$((W_errors + W_non2xx))
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
declare -A T_proxy T_mock C_wrk C_softirq C_other R_rps R_err R_cpu R_mockcpu R_p99max
declare -A P_rps P_p50 P_p99 P_err X_sps X_err X_bytes X_p99 X_cpu_event X_cpu_stream X_mock_stream
declare -A X_events X_done S_rps S_p50 S_p99 S_max S_req S_status S_non2xx S_sock S_err
WINDOWS=()
PATH_CC=/v1/chat/completions
START=$SECONDS
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------ 1, 2 and 3: processes ----

MOCK_PORT=$(free_port); start_mock "$MOCK_PORT"; MOCK=$MOCK_PID
NGINX_PORT=$(free_port); NGINX_SPORT=$(free_port); start_nginx main "$NGINX_PORT" "$NGINX_SPORT" "$MOCK_PORT"
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
max_run nginx "http://127.0.0.1:$NGINX_PORT$PATH_CC" $(nginx_pids "$NGINX_PID")
max_run forwarder "http://127.0.0.1:$FWD_PORT$PATH_CC" "$FWD"
max_run forwarder+log "http://127.0.0.1:$FWDLOG_PORT$PATH_CC" "$FWDLOG"
stop "$FWDLOG"

# ------------------------------------------------------------------ 3 ----

for rate in "${RATES[@]}"; do paced_runs "$rate"; done

stop_nginx "$NGINX_PID"
stop "$FWD" "$MOCK"

# ------------------------------------------------------- 7: streaming ----
# A mock that answers every streamed request with STREAM_TOKENS word events at
# once (no pacing), nginx with proxy_buffering off, and a forwarder in front.

SMOCK_PORT=$(free_port); start_mock "$SMOCK_PORT" --reply-words "$STREAM_REPLY_WORDS"; SMOCK=$MOCK_PID
SNGINX_PORT=$(free_port); SNGINX_SPORT=$(free_port); start_nginx stream "$SNGINX_PORT" "$SNGINX_SPORT" "$SMOCK_PORT"; SNGINX=$NGINX_PID
SFWD_PORT=$(free_port); start_forwarder "$SFWD_PORT" "$SMOCK_PORT" false; SFWD=$FWD_PID
wait_post "http://127.0.0.1:$SNGINX_SPORT$PATH_CC"
wait_post "http://127.0.0.1:$SFWD_PORT$PATH_CC"
read -r X_events[direct] X_done[direct] < <(count_events "http://127.0.0.1:$SMOCK_PORT$PATH_CC")
read -r X_events[nginx] X_done[nginx] < <(count_events "http://127.0.0.1:$SNGINX_SPORT$PATH_CC")
read -r X_events[forwarder] X_done[forwarder] < <(count_events "http://127.0.0.1:$SFWD_PORT$PATH_CC")
# Events per stream, as curl counted them straight from the mock: the role
# event, one per token, the finish event and [DONE].
EVENTS=${X_events[direct]}
MOCK_PID=$SMOCK
stream_run direct "http://127.0.0.1:$SMOCK_PORT$PATH_CC"
# shellcheck disable=SC2046
stream_run nginx "http://127.0.0.1:$SNGINX_SPORT$PATH_CC" $(nginx_pids "$SNGINX")
stream_run forwarder "http://127.0.0.1:$SFWD_PORT$PATH_CC" "$SFWD"
stop_nginx "$SNGINX"
stop "$SFWD" "$SMOCK"

# -------------------------------------------------------------- 4 and 5 ----
# The seed scenario: a fresh 200 ms mock, the same load straight at it (the
# control), through nginx, and through a fresh forwarder; then the forwarder
# is left idle for BENCH_SETTLE seconds and its RSS read again.

SEED_MOCK_PORT=$(free_port); start_mock "$SEED_MOCK_PORT" --latency 200ms; MOCK_PID=$MOCK_PID
SEED_FWD_PORT=$(free_port); start_forwarder "$SEED_FWD_PORT" "$SEED_MOCK_PORT" false; SEED_FWD=$FWD_PID
SEED_NGINX_PORT=$(free_port); SEED_NGINX_SPORT=$(free_port)
start_nginx seed "$SEED_NGINX_PORT" "$SEED_NGINX_SPORT" "$SEED_MOCK_PORT"; SEED_NGINX=$NGINX_PID
sleep 1
IDLE_RSS=$(status_kib "$SEED_FWD" VmRSS)
# shellcheck disable=SC2046
NGX_IDLE_RSS=$(sum_status_kib VmRSS $(nginx_pids "$SEED_NGINX"))
seed_run direct "http://127.0.0.1:$SEED_MOCK_PORT$PATH_CC"
# shellcheck disable=SC2046
seed_run nginx "http://127.0.0.1:$SEED_NGINX_PORT$PATH_CC" $(nginx_pids "$SEED_NGINX")
# shellcheck disable=SC2046
NGX_SEED_RSS=$(sum_status_kib VmRSS $(nginx_pids "$SEED_NGINX"))
stop_nginx "$SEED_NGINX"
seed_run forwarder "http://127.0.0.1:$SEED_FWD_PORT$PATH_CC" "$SEED_FWD"
PEAK_RSS=$(status_kib "$SEED_FWD" VmHWM)
RSS_END=$(status_kib "$SEED_FWD" VmRSS)
log "forwarder left idle for ${SETTLE}s before reading its RSS again"
sleep "$SETTLE"
RSS_SETTLED=$(status_kib "$SEED_FWD" VmRSS)
stop "$SEED_FWD" "$MOCK_PID"

# ------------------------------------------------------------------ 6 ----
# The three front ends side by side with one client (loadgen: closed loop,
# equal client cost), then BENCH_IDLE_WS idle WebSocket connections held.

PROTO_MOCK_PORT=$(free_port); start_mock "$PROTO_MOCK_PORT"
PROTO_PORT=$(free_port); PROTO_GRPC_PORT=$(free_port)
cat >"$WORK/proto.yaml" <<YAML
server: {listen: 127.0.0.1:$PROTO_PORT}
grpc: {enabled: true, listen: 127.0.0.1:$PROTO_GRPC_PORT}
logging: {access_log: false}
upstreams:
  - {name: mock, provider: openai, base_url: "http://127.0.0.1:$PROTO_MOCK_PORT/v1", models: [mock]}
YAML
"$BIN" serve --config "$WORK/proto.yaml" >/dev/null 2>"$WORK/proto.err" &
PROTO_FWD=$!; CHILDREN+=("$PROTO_FWD")
wait_http "http://127.0.0.1:$PROTO_PORT/readyz"
declare -A G_rps G_p50 G_p99 G_err
for proto in http ws grpc; do
  target=127.0.0.1:$PROTO_PORT
  [ "$proto" = grpc ] && target=127.0.0.1:$PROTO_GRPC_PORT
  log "protocols: loadgen $proto, ${CONNS} workers (${PROTO_DURATION}s)"
  line=$("$LOADGEN" load --protocol "$proto" --target "$target" --concurrency "$CONNS" --duration "${PROTO_DURATION}s" 2>>"$RAW" | tail -1)
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
forget "$IDLE_PID"
WS_PER_CONN=$(awk -v a="$WS_RSS_BEFORE" -v b="$WS_RSS_HELD" -v n="${WS_OPEN:-0}" 'BEGIN {if (n > 0) printf "%.1f", (b - a) / n; else print "n/a"}')
ELAPSED=$((SECONDS - START))

# --------------------------------------------------------------- report ----

ms() { awk -v u="$1" 'BEGIN {printf "%.2f ms", u / 1000}'; }
ms3() { awk -v u="$1" 'BEGIN {printf "%+.3f ms", u / 1000}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
verdict() { if awk "BEGIN {exit !($1)}"; then echo met; else echo "NOT met"; fi; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.1f", 100 * a / b; else print "n/a"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'; }

PCT=$(pct "${R_rps[forwarder]}" "${R_rps[nginx]}")
PCT_LOG=$(pct "${R_rps[forwarder+log]}" "${R_rps[nginx]}")
CPU_X=$(ratio "${R_cpu[forwarder]}" "${R_cpu[nginx]}")
CPU_X_LOG=$(ratio "${R_cpu[forwarder+log]}" "${R_cpu[nginx]}")
X_PCT=$(pct "${X_sps[forwarder]}" "${X_sps[nginx]}")
X_CPU_X=$(ratio "${X_cpu_event[forwarder]}" "${X_cpu_event[nginx]}")
S_PCT=$(pct "${S_rps[forwarder]}" "${S_rps[nginx]}")
S_DP99=$((${S_p99[forwarder]} - ${S_p99[nginx]}))
RSS_X=$(ratio "$RSS_SETTLED" "$IDLE_RSS")

row() { printf '%-52s %-30s %-20s %s\n' "$1" "$2" "$3" "$4"; }
report() {
  # The commit the measured code comes from: the last one that changed anything
  # but the benchmark itself (scripts/, docs/), e.g. main's, merged into a branch.
  local code
  code=$(git log -1 --format=%h -- . ':(exclude)scripts' ':(exclude)docs' 2>/dev/null || echo '?')
  echo "ModelForwarder benchmark  $(date -u '+%Y-%m-%d %H:%M UTC')  git $(git rev-parse --short HEAD 2>/dev/null || echo '?') (forwarder code as of $code)$(git diff --quiet HEAD -- forwarder forwarder-config 2>/dev/null || echo ', with uncommitted changes')"
  echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'), $("$NGINX" -v 2>&1 | sed 's/.*: //')"
  echo "max runs: wrk -t$THREADS -c$CONNS -d${DURATION}s POST $PATH_CC (+${WARMUP}s warm-up each)"
  echo "fixed rates: ${RATES[*]} req/s, wrk -c$PACED_CONNS with rate.lua, $PACED_ROUNDS rounds x ${PACED_SEG}s per target, order rotated, histograms pooled"
  echo "streams: $STREAM_TOKENS tokens (mock --reply-words $STREAM_REPLY_WORDS, all at once), $EVENTS events/stream, wrk -c$STREAM_CONNS -d${DURATION}s; nginx proxy_buffering off"
  echo "seed: wrk -c$SEED_CONNS -d${SEED_DURATION}s --timeout 5s, mock --latency 200ms; forwarder RSS read again after ${SETTLE}s idle"
  echo "all processes share the same $(nproc) cores (wrk, proxy, mock); wall time of measurements ${ELAPSED}s"
  echo
  row "FIGURE" "VALUE" "TARGET" "RESULT"
  row "1. max req/s direct / nginx / forwarder" "${R_rps[direct]} / ${R_rps[nginx]} / ${R_rps[forwarder]}" "reference" "err ${R_err[direct]}/${R_err[nginx]}/${R_err[forwarder]}"
  row "1. forwarder req/s as % of nginx" "${PCT}%" ">= 75%" "$(verdict "$PCT >= 75")"
  row "1. max req/s forwarder, access log ON (stderr->null)" "${R_rps[forwarder+log]} (err ${R_err[forwarder+log]})" "info" "${PCT_LOG}% of nginx"
  row "2. CPU/request nginx (all workers)" "${R_cpu[nginx]} us" "reference" ""
  row "2. CPU/request forwarder (access log off)" "${R_cpu[forwarder]} us = ${CPU_X}x nginx" "<= 1.5x nginx" "$(verdict "$CPU_X <= 1.5")"
  row "2. CPU/request forwarder, access log ON" "${R_cpu[forwarder+log]} us = ${CPU_X_LOG}x nginx" "info" ""
  row "2. CPU/request mock-llm in direct/nginx/fwd run" "${R_mockcpu[direct]} / ${R_mockcpu[nginx]} / ${R_mockcpu[forwarder]} us" "info" ""
  local rate dn df d
  for rate in "${RATES[@]}"; do
    dn=$((${P_p99[$rate nginx]} - ${P_p99[$rate direct]}))
    df=$((${P_p99[$rate forwarder]} - ${P_p99[$rate direct]}))
    d=$((df - dn))
    row "3. $rate req/s: achieved direct / nginx / fwd" "${P_rps[$rate direct]} / ${P_rps[$rate nginx]} / ${P_rps[$rate forwarder]}" "$rate" "err ${P_err[$rate direct]}/${P_err[$rate nginx]}/${P_err[$rate forwarder]}"
    row "3. $rate req/s: P50 direct / nginx / fwd" "$(ms "${P_p50[$rate direct]}") / $(ms "${P_p50[$rate nginx]}") / $(ms "${P_p50[$rate forwarder]}")" "info" ""
    row "3. $rate req/s: P99 direct / nginx / fwd" "$(ms "${P_p99[$rate direct]}") / $(ms "${P_p99[$rate nginx]}") / $(ms "${P_p99[$rate forwarder]}")" "info" ""
    row "3. $rate req/s: added P99 nginx / forwarder" "$(ms "$dn") / $(ms "$df")" "fwd <= nginx+0.1ms" "$(verdict "$d <= 100") ($(ms3 "$d"))"
  done
  row "4. seed req/s direct / nginx / forwarder" "${S_rps[direct]} / ${S_rps[nginx]} / ${S_rps[forwarder]}" "ideal $((SEED_CONNS * 5))" ""
  row "4. seed forwarder req/s as % of nginx" "${S_PCT}%" ">= 99%" "$(verdict "$S_PCT >= 99")"
  row "4. seed P50 direct / nginx / forwarder" "$(ms "${S_p50[direct]}") / $(ms "${S_p50[nginx]}") / $(ms "${S_p50[forwarder]}")" "info" ""
  row "4. seed P99 direct / nginx / forwarder" "$(ms "${S_p99[direct]}") / $(ms "${S_p99[nginx]}") / $(ms "${S_p99[forwarder]}")" "fwd <= nginx+5ms" "$(verdict "$S_DP99 <= 5000") ($(ms3 "$S_DP99"))"
  row "4. seed errors direct / nginx / forwarder" "${S_err[direct]} / ${S_err[nginx]} / ${S_err[forwarder]}" "forwarder 0" "$(verdict "${S_err[forwarder]} == 0")"
  row "5. forwarder RSS idle after start (VmRSS)" "$(mib "$IDLE_RSS")" "<= 12 MiB" "$(verdict "$IDLE_RSS <= 12288")"
  row "5. forwarder peak RSS in seed (VmHWM) / at its end" "$(mib "$PEAK_RSS") / $(mib "$RSS_END")" "info" ""
  row "5. forwarder RSS ${SETTLE}s after the seed run" "$(mib "$RSS_SETTLED") = ${RSS_X}x idle" "<= 2x idle" "$(verdict "$RSS_SETTLED <= 2 * $IDLE_RSS")"
  row "5. nginx RSS idle / after its seed run (all procs)" "$(mib "$NGX_IDLE_RSS") / $(mib "$NGX_SEED_RSS")" "reference" ""
  local p
  for p in http ws grpc; do
    row "6. $p via loadgen (${CONNS} workers): req/s; P50/P99" "${G_rps[$p]}; ${G_p50[$p]} / ${G_p99[$p]} ms" "info" "err ${G_err[$p]}"
  done
  row "6. idle WebSocket connections held (gauge)" "${WS_OPEN:-?} of $IDLE_WS" "$IDLE_WS" "$(verdict "${WS_OPEN:-0} >= $IDLE_WS")"
  row "6. forwarder RSS before / holding them" "$(mib "$WS_RSS_BEFORE") / $(mib "$WS_RSS_HELD")" "info" "${WS_PER_CONN} KiB/conn"
  row "7. streams/s direct / nginx / forwarder" "${X_sps[direct]} / ${X_sps[nginx]} / ${X_sps[forwarder]}" "info" "err ${X_err[direct]}/${X_err[nginx]}/${X_err[forwarder]}"
  row "7. forwarder streams/s as % of nginx" "${X_PCT}%" "info" ""
  row "7. CPU/event nginx (proxy_buffering off)" "${X_cpu_event[nginx]} us (${X_cpu_stream[nginx]} us/stream)" "reference" ""
  row "7. CPU/event forwarder" "${X_cpu_event[forwarder]} us = ${X_CPU_X}x nginx" "<= 1 us" "$(verdict "${X_cpu_event[forwarder]} <= 1")"
  row "7. events/stream (curl) direct / nginx / fwd" "${X_events[direct]} / ${X_events[nginx]} / ${X_events[forwarder]}" "equal, [DONE] last" "${X_done[direct]}/${X_done[nginx]}/${X_done[forwarder]}"
  row "7. bytes read/stream (wrk) direct / nginx / fwd" "${X_bytes[direct]} / ${X_bytes[nginx]} / ${X_bytes[forwarder]}" "info" ""
  row "7. CPU/stream mock-llm in direct/nginx/fwd run" "${X_mock_stream[direct]} / ${X_mock_stream[nginx]} / ${X_mock_stream[forwarder]} us" "info" ""
  echo
  echo "CPU in cores per run (2 = whole box): wrk; 'other' = busy CPU not charged to wrk, proxy or mock"
  echo "(other jobs, and kernel softirq time - loopback packet processing - of which 'softirq' is shown separately)"
  local l
  for l in "${WINDOWS[@]}"; do
    printf '  %-18s wrk %s  other %s (softirq %s)\n' "$l" "${C_wrk[$l]}" "${C_other[$l]}" "${C_softirq[$l]}"
  done
  printf '  p99 at max load direct / nginx / forwarder / forwarder+log: %s / %s / %s / %s\n' \
    "$(ms "${R_p99max[direct]}")" "$(ms "${R_p99max[nginx]}")" "$(ms "${R_p99max[forwarder]}")" "$(ms "${R_p99max[forwarder+log]}")"
  echo "load average at start: $LOADAVG_START; other processes used ${BACKGROUND} cores just before the run"
  if awk -v b="$BACKGROUND" 'BEGIN {exit !(b > 0.25)}'; then
    echo "WARNING: the machine was busy with other work before the run; figures are pessimistic"
  fi
  for l in "${WINDOWS[@]}"; do
    if awk -v o="${C_other[$l]}" -v q="${C_softirq[$l]}" 'BEGIN {exit !(o - q > 0.5)}'; then
      echo "WARNING: $l: ${C_other[$l]} cores of CPU not charged to wrk, proxy or mock (softirq ${C_softirq[$l]}) - probably another job on the box; re-run when the machine is quiet"
    fi
  done
  echo "seed: Non-2xx/3xx responses direct/nginx/fwd: ${S_non2xx[direct]}/${S_non2xx[nginx]}/${S_non2xx[forwarder]}; HTTP errors ${S_status[direct]}/${S_status[nginx]}/${S_status[forwarder]}; socket errors ${S_sock[direct]}/${S_sock[nginx]}/${S_sock[forwarder]}; max latency $(ms "${S_max[direct]}") / $(ms "${S_max[nginx]}") / $(ms "${S_max[forwarder]}")"
  echo "first forwarder idle VmRSS (main runs): $(mib "$IDLE_RSS_FIRST"). Latencies come from wrk's per-microsecond histogram (done() callback), not rounded."
}
report | tee "$RESULTS"
{ echo; echo "================ raw wrk output ================"; cat "$RAW"; } >>"$RESULTS"
log "written to ${RESULTS#"$ROOT"/}"
