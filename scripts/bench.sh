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
#   ./scripts/bench.sh --check             regression check before a release: the
#                                          ratios against nginx, BENCH_CHECK_REPS (3)
#                                          rounds of BENCH_CHECK_DURATION (5) s; exits 1
#                                          when one is worse than its target by more
#                                          than the spread the rounds showed
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

# shellcheck source=scripts/bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building target/release/forwarder and examples/loadgen (HTTP/WebSocket/gRPC client)"
  cargo build --release -p forwarder --bin forwarder --example loadgen -j "${BENCH_JOBS:-2}" >&2
fi
LOADGEN=$ROOT/target/release/examples/loadgen
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

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

declare -A T_proxy T_mock C_wrk C_softirq C_other R_rps R_err R_cpu R_mockcpu R_p99max
declare -A X_sps X_err X_bytes X_p99 X_cpu_event X_cpu_stream X_mock_stream
PATH_CC=/v1/chat/completions
if [ "${1:-}" = --check ]; then
  # shellcheck source=scripts/bench/check.sh
  source "$ROOT/scripts/bench/check.sh"
  if check_main; then exit 0; else exit 1; fi
fi

wait_quiet
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
