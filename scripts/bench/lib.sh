# Shared by the benchmark scripts (scripts/bench.sh, scripts/bench-cache.sh,
# scripts/bench-security.sh): Debian packages, process bookkeeping (everything
# started is killed on exit), loopback ports, CPU windows read from /proc, wrk
# runs parsed from report.lua's BENCH/HIST lines, and the quiet-machine wait.
# The caller sets ROOT, BIN, THREADS, CONNS, WARMUP and LUA_POST first, then
# sources this file; the variable names are the ones bench.sh always used.
# shellcheck shell=bash disable=SC2034
NGINX_TMPL=${NGINX_TMPL:-$ROOT/scripts/bench/nginx.conf.tmpl}

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
declare -A T_proxy T_mock C_wrk C_softirq C_other
WINDOWS=()
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
wait_quiet() { # sets BACKGROUND: cores used by others when measuring starts
  local QUIET_WAIT=${BENCH_QUIET_WAIT:-20} waited=0
  BACKGROUND=$(background_cores)
  while awk -v b="$BACKGROUND" 'BEGIN {exit !(b > 0.25)}' && ((waited < QUIET_WAIT)); do
    ((waited == 0)) && log "machine busy (${BACKGROUND} cores used by other processes); waiting up to ${QUIET_WAIT}s"
    waited=$((waited + 1)); BACKGROUND=$(background_cores)
  done
}

ms() { awk -v u="$1" 'BEGIN {printf "%.2f ms", u / 1000}'; }
ms3() { awk -v u="$1" 'BEGIN {printf "%+.3f ms", u / 1000}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
verdict() { if awk "BEGIN {exit !($1)}"; then echo met; else echo "NOT met"; fi; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.1f", 100 * a / b; else print "n/a"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'; }
