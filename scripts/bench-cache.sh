#!/usr/bin/env bash
# Benchmarks the response cache (issue 11, "Benchmarks and load"), on loopback
# only, in one bounded run (≈ 4 minutes): the mock alone (the reference), a
# forwarder without a cache, and a cache MISS and a cache HIT served from the
# in-memory store and from Redis (a redis-server this script starts, every
# record sealed with AES-256-GCM under a key file it writes). For each: CPU
# per request of the forwarder at max throughput, P50/P99 at fixed rates and
# the P99 added to the mock's measured in the same run; for the Redis runs
# the redis-server's CPU per request too. The hit runs are checked to be hits
# (forwarder_cache_requests_total and X-Cache), the miss runs to be misses;
# the script exits 1 when a check fails. Prints a table and writes it, plus
# the raw wrk output, to bench-results/cache-<timestamp>.txt (gitignored).
# See docs/benchmarks.md ("Response cache").
#
#   ./scripts/bench-cache.sh                     full run (10 s per max run)
#   BENCH_SKIP_BUILD=1 ./scripts/bench-cache.sh  binaries already built
#   BENCH_DURATION=3 ./scripts/bench-cache.sh    quick check
#
# Knobs: BENCH_THREADS (2), BENCH_CONNS (64), BENCH_RATES ("200 3000"),
# BENCH_PACED_CONNS (64), BENCH_PACED_ROUNDS (5), BENCH_WARMUP (2),
# BENCH_QUIET_WAIT (20), BENCH_MIN_RATIO (99: the least % of hits in a hit
# run, and of misses in a miss run), BENCH_SKIP_BUILD=1.
# shellcheck disable=SC2154  # W_* are set by run_wrk (lib.sh) through eval
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-64}
read -r -a RATES <<<"${BENCH_RATES:-200 3000}"
PACED_CONNS=${BENCH_PACED_CONNS:-64}
PACED_ROUNDS=${BENCH_PACED_ROUNDS:-5}
PACED_SEG=$((DURATION / PACED_ROUNDS)); ((PACED_SEG >= 1)) || PACED_SEG=1
WARMUP=${BENCH_WARMUP:-2}
MIN_RATIO=${BENCH_MIN_RATIO:-99}
BIN=$ROOT/target/release/forwarder
LUA_POST=$ROOT/scripts/bench/post.lua
LUA_CACHE=$ROOT/scripts/bench/cache.lua
PATH_CC=/v1/chat/completions
# The "same" request of cache.lua, for the X-Cache spot checks.
HOT_BODY='{"model":"mock","temperature":0,"messages":[{"role":"user","content":"what is the return policy?"}]}'

# shellcheck source=scripts/bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
RESULTS=$ROOT/bench-results/cache-$STAMP.txt

if ! command -v redis-server >/dev/null 2>&1; then
  log "installing Debian package: redis-server"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server
fi

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building target/release/forwarder"
  cargo build --release -p forwarder --bin forwarder -j "${BENCH_JOBS:-2}" >&2
fi
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

# ------------------------------------------------------------ processes ----

start_redis() { # port -> sets REDIS_PID; a throw-away server: no persistence
  local port=$1 dir=$WORK/redis
  mkdir -p "$dir"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --appendonly no \
    --maxmemory 1gb --maxmemory-policy allkeys-lru --daemonize no >"$dir/redis.log" 2>&1 &
  REDIS_PID=$!
  CHILDREN+=("$REDIS_PID")
  local deadline=$((SECONDS + 10))
  until [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
    ((SECONDS < deadline)) || { echo "redis-server did not start:" >&2; cat "$dir/redis.log" >&2; exit 1; }
    sleep 0.1
  done
}

start_forwarder_yaml() { # port yaml -> sets FWD_PID
  local port=$1 cfg=$WORK/forwarder-$1.yaml
  printf '%s\n' "$2" >"$cfg"
  "$BIN" serve --config "$cfg" >/dev/null 2>"$WORK/forwarder-$port.err" &
  FWD_PID=$!
  CHILDREN+=("$FWD_PID")
  wait_http "http://127.0.0.1:$port/readyz" || { cat "$WORK/forwarder-$port.err" >&2; exit 1; }
}

# hit miss bypass: the forwarder's forwarder_cache_requests_total for model mock
cache_counts() { # port
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" | awk '
    /^forwarder_cache_requests_total\{/ && /model="mock"/ {
      if ($0 ~ /result="hit"/) h = $NF; else if ($0 ~ /result="miss"/) m = $NF; else if ($0 ~ /result="bypass"/) b = $NF }
    END {printf "%d %d %d\n", h, m, b}'
}
mock_requests() { curl -fsS --max-time 2 "http://127.0.0.1:$MOCK_PORT/mock/stats" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p'; }
x_cache() { # url: the X-Cache header of one "same" request
  curl -sS -o /dev/null -D - --max-time 2 -H 'Content-Type: application/json' -d "$HOT_BODY" "$1" |
    awk -F': ' 'tolower($1) == "x-cache" {gsub("\r", "", $2); print $2}'
}

wait_quiet
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$SECONDS

MOCK_PORT=$(free_port); start_mock "$MOCK_PORT"; MOCK=$MOCK_PID
REDIS_PORT=$(free_port); start_redis "$REDIS_PORT"
KEYS=$WORK/encryption.keys
(umask 077; printf 'bench1: %s\n' "$(head -c 32 /dev/urandom | base64)" >"$KEYS")

UPSTREAM="upstreams:
  - {name: mock, provider: openai, base_url: \"http://127.0.0.1:$MOCK_PORT/v1\", models: [mock]}
logging: {access_log: false}"
# The cache policy of both cached forwarders: the documented defaults
# (deterministic requests only, per client, 10 min).
CACHE="cache:
  models:
    mock: {enabled: true, ttl: 10m, cacheable: deterministic}"

OFF_PORT=$(free_port)
start_forwarder_yaml "$OFF_PORT" "server: {listen: 127.0.0.1:$OFF_PORT}
$UPSTREAM"
F_OFF=$FWD_PID
MEM_PORT=$(free_port)
start_forwarder_yaml "$MEM_PORT" "server: {listen: 127.0.0.1:$MEM_PORT}
$UPSTREAM
store: {backend: memory, max_bytes: 67108864}
$CACHE"
F_MEM=$FWD_PID
RED_PORT=$(free_port)
start_forwarder_yaml "$RED_PORT" "server: {listen: 127.0.0.1:$RED_PORT}
$UPSTREAM
store:
  backend: redis
  redis: {url: \"redis://127.0.0.1:$REDIS_PORT\", timeout: 50ms, key_prefix: bench}
  encryption: {key_file: \"$KEYS\"}
$CACHE"
F_RED=$FWD_PID
for p in "$MOCK_PORT" "$OFF_PORT" "$MEM_PORT" "$RED_PORT"; do wait_post "http://127.0.0.1:$p$PATH_CC"; done

# The targets: label, port, cache.lua mode, forwarder pid (none: the mock),
# what the cache must have answered ("" = no cache).
LABELS=(direct off mem-miss mem-hit redis-miss redis-hit)
declare -A T_port=([direct]=$MOCK_PORT [off]=$OFF_PORT [mem-miss]=$MEM_PORT [mem-hit]=$MEM_PORT [redis-miss]=$RED_PORT [redis-hit]=$RED_PORT)
declare -A T_mode=([direct]=unique [off]=same [mem-miss]=unique [mem-hit]=same [redis-miss]=unique [redis-hit]=same)
declare -A T_pid=([direct]="" [off]=$F_OFF [mem-miss]=$F_MEM [mem-hit]=$F_MEM [redis-miss]=$F_RED [redis-hit]=$F_RED)
declare -A T_want=([direct]="" [off]="" [mem-miss]=miss [mem-hit]=hit [redis-miss]=miss [redis-hit]=hit)
declare -A T_name=([direct]="mock alone (direct)" [off]="forwarder, no cache" [mem-miss]="memory store: MISS"
  [mem-hit]="memory store: HIT" [redis-miss]="Redis (AES-GCM): MISS" [redis-hit]="Redis (AES-GCM): HIT")
# The X-Cache header a hot request gets before the runs: the first one stores
# the answer (MISS; stored in the background), the second must be a HIT.
declare -A XC_first XC_second
for l in off mem-hit redis-hit; do
  url="http://127.0.0.1:${T_port[$l]}$PATH_CC"
  XC_first[$l]=$(x_cache "$url"); sleep 0.2; XC_second[$l]=$(x_cache "$url")
done

# Cache results and upstream calls of one wrk run, added up per label.
declare -A K_hit K_miss K_bypass K_calls K_req
for l in "${LABELS[@]}"; do K_hit[$l]=0; K_miss[$l]=0; K_bypass[$l]=0; K_calls[$l]=0; K_req[$l]=0; done
count_begin() { # label
  CB_calls=$(mock_requests)
  if [ -n "${T_want[$1]}" ]; then read -r CB_h CB_m CB_b < <(cache_counts "${T_port[$1]}"); fi
}
count_end() { # label requests-wrk-completed
  local l=$1 h m b
  K_calls[$l]=$((K_calls[$l] + $(mock_requests) - CB_calls))
  K_req[$l]=$((K_req[$l] + $2))
  if [ -n "${T_want[$l]}" ]; then
    read -r h m b < <(cache_counts "${T_port[$l]}")
    K_hit[$l]=$((K_hit[$l] + h - CB_h)); K_miss[$l]=$((K_miss[$l] + m - CB_m)); K_bypass[$l]=$((K_bypass[$l] + b - CB_b))
  fi
}
redis_ticks() { cpu_ticks "$REDIS_PID"; }
# The sum of a metric's series on a forwarder (0 when it has none).
metric_sum() { # port name
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 {s += $NF} END {printf "%d\n", s}'
}

# ----------------------------------------------------- max throughput ----

declare -A R_rps R_err R_cpu R_mockcpu R_rediscpu R_p99max R_redis_cores
max_run() { # label
  local l=$1 url="http://127.0.0.1:${T_port[$1]}$PATH_CC" rb re
  # shellcheck disable=SC2086
  wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -s "$LUA_CACHE" "$url" -- "${T_mode[$l]}" >/dev/null 2>&1 || true
  log "max throughput: ${T_name[$l]} (${DURATION}s)"
  count_begin "$l"; rb=$(redis_ticks)
  # shellcheck disable=SC2086
  win_begin ${T_pid[$l]}
  run_wrk "max $l" "$LUA_CACHE" "$url" "$CONNS" "$DURATION" -- "${T_mode[$l]}"
  win_end "max $l"
  re=$(redis_ticks); count_end "$l" "$W_requests"
  R_rps[$l]=$W_rps
  R_err[$l]=$((W_errors + W_non2xx))
  R_p99max[$l]=$W_p99
  R_cpu[$l]=$(per_unit_us "${T_proxy[max $l]}" "$W_requests")
  R_mockcpu[$l]=$(per_unit_us "${T_mock[max $l]}" "$W_requests")
  R_rediscpu[$l]=$(per_unit_us $((re - rb)) "$W_requests")
  R_redis_cores[$l]=$(awk -v t=$((re - rb)) -v hz="$HZ" -v d="$W_duration_us" 'BEGIN {printf "%.2f", t / hz / (d / 1e6)}')
}
MOCK_PID=$MOCK
for l in "${LABELS[@]}"; do max_run "$l"; done

# ----------------------------------------------------------- fixed rate ----
# Every target at the same rate, in PACED_ROUNDS rounds of PACED_SEG seconds,
# the order rotating every round; each target's histograms pooled.

declare -A P_rps P_p50 P_p99 P_err
paced_runs() { # rate
  local rate=$1 r k i l n=${#LABELS[@]}
  local -A req dur err
  for l in "${LABELS[@]}"; do : >"$WORK/hist-$rate-$l"; req[$l]=0; dur[$l]=0; err[$l]=0; done
  log "fixed rate $rate req/s: ${LABELS[*]}; $PACED_ROUNDS rounds of ${PACED_SEG}s each"
  win_begin "$F_OFF" "$F_MEM" "$F_RED"
  for ((r = 0; r < PACED_ROUNDS; r++)); do
    for ((k = 0; k < n; k++)); do
      i=$(((r + k) % n)); l=${LABELS[i]}
      count_begin "$l"
      run_wrk "rate $rate $l (round $((r + 1)))" "$LUA_CACHE" "http://127.0.0.1:${T_port[$l]}$PATH_CC" \
        "$PACED_CONNS" "$PACED_SEG" -- "${T_mode[$l]}" "$rate" "$THREADS"
      count_end "$l" "$W_requests"
      cat "$W_HIST" >>"$WORK/hist-$rate-$l"
      req[$l]=$((req[$l] + W_requests)); dur[$l]=$((dur[$l] + W_duration_us))
      err[$l]=$((err[$l] + W_errors + W_non2xx))
    done
  done
  win_end "rate $rate"
  for l in "${LABELS[@]}"; do
    P_rps[$rate $l]=$(awk -v r="${req[$l]}" -v d="${dur[$l]}" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
    P_p50[$rate $l]=$(hist_pct "$WORK/hist-$rate-$l" 50)
    P_p99[$rate $l]=$(hist_pct "$WORK/hist-$rate-$l" 99)
    P_err[$rate $l]=${err[$l]}
  done
}
for rate in "${RATES[@]}"; do paced_runs "$rate"; done
ELAPSED=$((SECONDS - START))
# Store calls that failed (the Redis timeout) and records that failed
# authentication, over the whole run: each is a miss, never a wrong answer.
STORE_ERR_MEM=$(metric_sum "$MEM_PORT" forwarder_store_errors_total)
STORE_ERR_RED=$(metric_sum "$RED_PORT" forwarder_store_errors_total)
CORRUPT_RED=$(metric_sum "$RED_PORT" forwarder_store_corrupt_records_total)

# --------------------------------------------------------------- report ----

FAILED=()
# % of the run's cache answers that were the wanted kind; "-" without a cache
cache_pct() { # label
  local l=$1 total
  [ -n "${T_want[$l]}" ] || { echo "-"; return; }
  total=$((K_hit[$l] + K_miss[$l] + K_bypass[$l]))
  if [ "${T_want[$l]}" = hit ]; then pct "${K_hit[$l]}" "$total"; else pct "${K_miss[$l]}" "$total"; fi
}
for l in "${LABELS[@]}"; do
  [ -n "${T_want[$l]}" ] || continue
  p=$(cache_pct "$l")
  awk -v p="$p" -v m="$MIN_RATIO" 'BEGIN {exit !(p != "n/a" && p >= m)}' ||
    FAILED+=("${T_name[$l]}: only ${p}% ${T_want[$l]}s (hit ${K_hit[$l]}, miss ${K_miss[$l]}, bypass ${K_bypass[$l]}); at least ${MIN_RATIO}% wanted")
done
for l in mem-hit redis-hit; do
  [ "${XC_second[$l]}" = HIT ] || FAILED+=("${T_name[$l]}: a repeated request got X-Cache '${XC_second[$l]}', not HIT")
done
for l in "${LABELS[@]}"; do
  [ "${R_err[$l]}" = 0 ] || FAILED+=("${T_name[$l]}: ${R_err[$l]} errors at max throughput")
  for rate in "${RATES[@]}"; do
    [ "${P_err[$rate $l]}" = 0 ] || FAILED+=("${T_name[$l]}: ${P_err[$rate $l]} errors at $rate req/s")
  done
done

report() {
  local code l rate
  # The last commit that changed the forwarder's sources or dependencies.
  code=$(git log -1 --format=%h -- forwarder forwarder-config Cargo.toml Cargo.lock 2>/dev/null || echo '?')
  echo "ModelForwarder cache benchmark  $(date -u '+%Y-%m-%d %H:%M UTC')  git $(git rev-parse --short HEAD 2>/dev/null || echo '?') (forwarder code as of $code)$(git diff --quiet HEAD -- forwarder forwarder-config 2>/dev/null || echo ', with uncommitted changes')"
  echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'), $(redis-server --version | awk '{print $1, $3}')"
  echo "max runs: wrk -t$THREADS -c$CONNS -d${DURATION}s -s cache.lua (+${WARMUP}s warm-up each); fixed rates ${RATES[*]} req/s: wrk -c$PACED_CONNS, $PACED_ROUNDS rounds x ${PACED_SEG}s per target, order rotated, histograms pooled"
  echo "requests: POST $PATH_CC, temperature 0; HIT runs repeat one request, MISS runs send a new prompt each time (same length)"
  echo "cache: {ttl: 10m, cacheable: deterministic, per client}; memory store 64 MiB; Redis store (redis-server on loopback, timeout 50ms) sealed with AES-256-GCM"
  echo "all processes share the same $(nproc) cores (wrk, forwarders, mock, redis-server); wall time of measurements ${ELAPSED}s"
  echo
  printf '%-26s %9s %5s %12s %12s %13s %10s %12s\n' "MAX THROUGHPUT" "req/s" "err" "fwd CPU/req" "mock CPU/req" "redis CPU/req" "cache ok" "mock calls"
  for l in "${LABELS[@]}"; do
    local rc="-" ok
    case $l in redis-*) rc="${R_rediscpu[$l]} us" ;; esac
    ok=$(cache_pct "$l"); [ "$ok" = - ] || ok="$ok% ${T_want[$l]}"
    printf '%-26s %9s %5s %12s %12s %13s %10s %12s\n' "${T_name[$l]}" "${R_rps[$l]}" "${R_err[$l]}" \
      "$([ -n "${T_pid[$l]}" ] && echo "${R_cpu[$l]} us" || echo -)" "${R_mockcpu[$l]} us" "$rc" "$ok" \
      "$(pct "${K_calls[$l]}" "${K_req[$l]}")%"
  done
  echo "('cache ok': share of forwarder_cache_requests_total over all the target's runs that was the wanted result;"
  echo " 'mock calls': upstream requests the mock counted (/mock/stats) as % of requests wrk completed, all runs)"
  echo
  for rate in "${RATES[@]}"; do
    printf '%-26s %9s %5s %10s %10s %12s %12s\n' "FIXED RATE $rate req/s" "achieved" "err" "P50" "P99" "added P50" "added P99"
    for l in "${LABELS[@]}"; do
      local a50="(reference)" a99="(reference)" p50=${P_p50[$rate $l]} p99=${P_p99[$rate $l]}
      local r50=${P_p50[$rate direct]} r99=${P_p99[$rate direct]}
      [ "$l" = direct ] || { a50=$(ms3 $((p50 - r50))); a99=$(ms3 $((p99 - r99))); }
      printf '%-26s %9s %5s %10s %10s %12s %12s\n' "${T_name[$l]}" "${P_rps[$rate $l]}" "${P_err[$rate $l]}" \
        "$(ms "$p50")" "$(ms "$p99")" "$a50" "$a99"
    done
    echo
  done
  echo "CPU per request, ratios (max-throughput runs):"
  echo "  memory HIT / memory MISS       $(ratio "${R_cpu[mem-hit]}" "${R_cpu[mem-miss]}")"
  echo "  Redis HIT / Redis MISS         $(ratio "${R_cpu[redis-hit]}" "${R_cpu[redis-miss]}")"
  echo "  memory HIT / no cache          $(ratio "${R_cpu[mem-hit]}" "${R_cpu[off]}")"
  echo "  Redis HIT / no cache           $(ratio "${R_cpu[redis-hit]}" "${R_cpu[off]}")"
  echo "  memory MISS / no cache         $(ratio "${R_cpu[mem-miss]}" "${R_cpu[off]}")"
  echo "  Redis MISS / no cache          $(ratio "${R_cpu[redis-miss]}" "${R_cpu[off]}")"
  echo "  forwarder+redis-server, Redis HIT / no cache (forwarder+mock): $(ratio "$(awk -v a="${R_cpu[redis-hit]}" -v b="${R_rediscpu[redis-hit]}" 'BEGIN {print a + b}')" "$(awk -v a="${R_cpu[off]}" -v b="${R_mockcpu[off]}" 'BEGIN {print a + b}')")"
  echo "X-Cache of a first / a repeated request before the runs: no cache '${XC_first[off]}'/'${XC_second[off]}', memory ${XC_first[mem-hit]}/${XC_second[mem-hit]}, Redis ${XC_first[redis-hit]}/${XC_second[redis-hit]}"
  echo "cache counters (hit/miss/bypass) summed over each target's runs:"
  for l in mem-miss mem-hit redis-miss redis-hit; do
    echo "  ${T_name[$l]}: ${K_hit[$l]} / ${K_miss[$l]} / ${K_bypass[$l]} (wrk completed ${K_req[$l]}; mock called ${K_calls[$l]} times)"
  done
  echo "store errors over the whole run (each a miss, forwarded): memory $STORE_ERR_MEM, Redis $STORE_ERR_RED (forwarder_store_errors_total); records failing authentication: $CORRUPT_RED"
  echo
  echo "CPU in cores per run (2 = whole box): wrk; redis-server; 'other' = busy CPU not charged to wrk, forwarder or mock"
  echo "(it includes redis-server, other jobs and kernel softirq time, of which 'softirq' is shown separately)"
  for l in "${WINDOWS[@]}"; do
    local rs=""
    case $l in "max redis"*) rs="  redis ${R_redis_cores[${l#max }]}" ;; esac
    printf '  %-18s wrk %s  other %s (softirq %s)%s\n' "$l" "${C_wrk[$l]}" "${C_other[$l]}" "${C_softirq[$l]}" "$rs"
  done
  printf '  p99 at max load:'; for l in "${LABELS[@]}"; do printf ' %s %s;' "$l" "$(ms "${R_p99max[$l]}")"; done; echo
  echo "load average at start: $LOADAVG_START; other processes used ${BACKGROUND} cores just before the run"
  if awk -v b="$BACKGROUND" 'BEGIN {exit !(b > 0.25)}'; then
    echo "WARNING: the machine was busy with other work before the run; figures are pessimistic"
  fi
  for l in "${WINDOWS[@]}"; do
    local rc=0
    case $l in "max redis"*) rc=${R_redis_cores[${l#max }]} ;; esac
    if awk -v o="${C_other[$l]}" -v q="${C_softirq[$l]}" -v r="$rc" 'BEGIN {exit !(o - q - r > 0.5)}'; then
      echo "WARNING: $l: ${C_other[$l]} cores of CPU not charged to wrk, forwarder, mock or redis (softirq ${C_softirq[$l]}) - probably another job on the box"
    fi
  done
  if ((${#FAILED[@]})); then
    echo
    for l in "${FAILED[@]}"; do echo "CHECK FAILED: $l"; done
  else
    echo "checks: every HIT run >= ${MIN_RATIO}% hits, every MISS run >= ${MIN_RATIO}% misses, repeated requests X-Cache HIT, no errors"
  fi
}
report | tee "$RESULTS"
{ echo; echo "================ raw wrk output ================"; cat "$RAW"; } >>"$RESULTS"
log "written to ${RESULTS#"$ROOT"/}"
((${#FAILED[@]} == 0)) || { log "FAILED: ${#FAILED[@]} check(s), see above"; exit 1; }
