#!/usr/bin/env bash
# Instructions per request and per streamed event, counted by callgrind: the
# forwarder (release build) and nginx (one process, the same proxy settings as
# scripts/bench.sh) each run under `valgrind --tool=callgrind` in front of the
# same mock-llm; after a warm-up the counters are zeroed, exactly N requests
# are sent by curl (4 at a time over kept-alive connections), and the counters
# are dumped. Instruction counts do not move with the load of a shared
# machine, so this is the figure to compare between commits; wall-clock ratios
# come from scripts/bench.sh. Loopback only, bounded (a few minutes).
#
#   ./scripts/bench-callgrind.sh                 plain requests and streams
#   CG_REQUESTS=500 CG_STREAMS=40 ./scripts/bench-callgrind.sh
#   CG_TOP=25 ./scripts/bench-callgrind.sh       longer profile listing
#   CG_CASES="bare stream" ./scripts/bench-callgrind.sh   some cases only
#   CG_BIN=/tmp/forwarder-old BENCH_SKIP_BUILD=1 ./scripts/bench-callgrind.sh   another build
#
# Cases: bare (POST /v1/chat/completions, no feature on), stream (500-token
# streams; per event = per stream / events per stream), and each feature's
# own cost on the same request: idem (an Idempotency-Key per request, the
# in-memory store), cache-miss and cache-hit (a cached model; distinct and
# repeated prompts), jwt (an HS256 bearer token), shared (a shared rate limit
# in the in-memory store). nginx is measured for bare and stream.
# Prints one line per case and writes the annotated top functions of every
# case to bench-results/callgrind-<timestamp>/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${CG_BIN:-$ROOT/target/release/forwarder}
REQUESTS=${CG_REQUESTS:-1000}
STREAMS=${CG_STREAMS:-60}
WARM=${CG_WARMUP:-100}
TOP=${CG_TOP:-15}
read -r -a CASES <<<"${CG_CASES:-bare stream idem cache-miss cache-hit jwt shared}"
THREADS=1 CONNS=4 WARMUP=0 LUA_POST=
# shellcheck source=scripts/bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building target/release/forwarder"
  cargo build --release -p forwarder --bin forwarder -j "${BENCH_JOBS:-2}" >&2
fi
OUT=$ROOT/bench-results/callgrind-$STAMP
mkdir -p "$OUT"
BODY='{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
SBODY='{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello"}]}'

# send url n body [extra curl config lines] : n POSTs, 4 at a time, kept alive
send() {
  local url=$1 n=$2 body=$3 extra=${4:-} cfg=$WORK/curl.cfg i
  {
    echo 'silent'; echo 'show-error'; echo 'header = "Content-Type: application/json"'
    printf 'data = "%s"\n' "${body//\"/\\\"}"
    [ -n "$extra" ] && printf '%s\n' "$extra"
    for ((i = 0; i < n; i++)); do printf 'url = "%s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n' "$url"; done
  } >"$cfg"
  curl -s --no-progress-meter --parallel --parallel-max 4 -K "$cfg" >>"$WORK/codes"
}

# send_each url n body_fmt : n POSTs whose bodies differ (%d = the index), 4 at a time
send_each() {
  local url=$1 n=$2 fmt=$3 cfg=$WORK/curl.cfg i b
  {
    echo 'silent'; echo 'show-error'; echo 'header = "Content-Type: application/json"'
    for ((i = 0; i < n; i++)); do
      # shellcheck disable=SC2059
      b=$(printf "$fmt" "$i")
      printf 'url = "%s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\ndata = "%s"\n' "$url" "${b//\"/\\\"}"
      ((i + 1 < n)) && echo 'next' && echo 'silent' && echo 'header = "Content-Type: application/json"'
    done
  } >"$cfg"
  curl -s --no-progress-meter --parallel --parallel-max 4 -K "$cfg" >>"$WORK/codes"
}

# Instructions counted since the last zeroing of the callgrind run of $1.
dump_total() { # pid label -> prints total Ir, keeps the annotated profile
  local pid=$1 label=$2 file
  callgrind_control -d "$label" "$pid" >/dev/null 2>&1
  sleep 0.5
  file=$(ls -t "$WORK"/cg.out.* 2>/dev/null | grep -v '\.0$' | head -1 || true)
  [ -n "$file" ] || { echo "no callgrind dump for $label" >&2; return 1; }
  callgrind_annotate --threshold=100 "$file" 2>/dev/null | head -n $((TOP + 25)) >"$OUT/$label.txt"
  callgrind_annotate --inclusive=yes "$file" 2>/dev/null | head -n $((TOP * 3 + 25)) >"$OUT/$label.inclusive.txt"
  awk '/^[0-9,]+ .*PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$OUT/$label.txt"
  mv "$file" "$OUT/$label.callgrind.out"
}

under_callgrind() { # cmd... -> CG_PID
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" --dump-instr=no \
    --collect-atstart=yes "$@" >"$WORK/cg-$$.log" 2>&1 &
  CG_PID=$!
  CHILDREN+=("$CG_PID")
}

MOCK_PORT=$(free_port); start_mock "$MOCK_PORT"
SMOCK_PORT=$(free_port); start_mock "$SMOCK_PORT" --reply-words 497
EVENTS=$(curl -sSN -H 'Content-Type: application/json' -d "$SBODY" "http://127.0.0.1:$SMOCK_PORT/v1/chat/completions" | grep -c '^data: ')

# forwarder config for a case
fwd_config() { # case port mock_port
  local c=$1 port=$2 mport=$3
  echo "server: {listen: 127.0.0.1:$port}"
  echo "logging: {access_log: false}"
  echo "upstreams:"
  echo "  - {name: mock, provider: openai, base_url: \"http://127.0.0.1:$mport/v1\", models: [mock]}"
  case $c in
    cache-*) echo "cache: {models: {mock: {enabled: true, ttl: 10m, cacheable: all}}}" ;;
    jwt) printf 'auth:\n  jwt: {secret_file: %s, algorithms: [HS256], issuer: bench, audiences: [forwarder]}\n' "$WORK/jwt.secret" ;;
    shared) echo "rate_limit: {requests_per_second: 1000000, burst: 1000000, shared: true}" ;;
  esac
}

declare -A IR BAD
measure_forwarder() { # case
  local c=$1 port mport n body extra="" per
  port=$(free_port); mport=$MOCK_PORT; n=$REQUESTS; body=$BODY
  [ "$c" = stream ] && { mport=$SMOCK_PORT; n=$STREAMS; body=$SBODY; }
  fwd_config "$c" "$port" "$mport" >"$WORK/fwd-$c.yaml"
  if [ "$c" = jwt ]; then
    export CG_JWT_SECRET=callgrind-bench-secret-0123456789abcdef
    printf '%s' "$CG_JWT_SECRET" >"$WORK/jwt.secret"
    extra="header = \"Authorization: Bearer $(jwt_token)\""
  fi
  under_callgrind "$BIN" serve --config "$WORK/fwd-$c.yaml"
  wait_http "http://127.0.0.1:$port/readyz" 60
  local url=http://127.0.0.1:$port/v1/chat/completions
  case $c in
    idem) send_idem "$url" "$WARM" warm ;;
    stream) send "$url" 5 "$body" ;;
    *) send "$url" "$WARM" "$body" "$extra" ;;
  esac
  [ "$c" = cache-hit ] && send "$url" 1 '{"model":"mock","messages":[{"role":"user","content":"hit"}]}' "$extra"
  callgrind_control -z "$CG_PID" >/dev/null 2>&1
  : >"$WORK/codes"
  case $c in
    idem) send_idem "$url" "$n" run ;;
    cache-miss) send_each "$url" "$n" '{"model":"mock","messages":[{"role":"user","content":"miss %d"}]}' ;;
    cache-hit) send "$url" "$n" '{"model":"mock","messages":[{"role":"user","content":"hit"}]}' ;;
    *) send "$url" "$n" "$body" "$extra" ;;
  esac
  IR[fwd $c]=$(dump_total "$CG_PID" "forwarder-$c")
  BAD[fwd $c]=$(grep -vc '^200$' "$WORK/codes" || true)
  stop "$CG_PID"
}

# n requests, each with its own Idempotency-Key
send_idem() { # url n key-prefix
  local url=$1 n=$2 prefix=$3 cfg=$WORK/curl.cfg i
  {
    for ((i = 0; i < n; i++)); do
      printf 'silent\nheader = "Content-Type: application/json"\nheader = "Idempotency-Key: cg-%s-%s-%d"\n' "$STAMP" "$prefix" "$i"
      printf 'data = "%s"\nurl = "%s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n' "${BODY//\"/\\\"}" "$url"
      ((i + 1 < n)) && echo 'next'
    done
  } >"$cfg"
  curl -s --no-progress-meter --parallel --parallel-max 4 -K "$cfg" >>"$WORK/codes"
}

# An HS256 token for the jwt case, valid for an hour.
jwt_token() {
  python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b(json.dumps({"iss": "bench", "aud": "forwarder", "sub": "cg", "exp": int(time.time()) + 3600}).encode())
s = b(hmac.new(os.environ["CG_JWT_SECRET"].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
print(f"{h}.{p}.{s}")
PY
}

measure_nginx() { # case
  local c=$1 port dir=$WORK/nginx-cg n body url
  port=$(free_port); mkdir -p "$dir"
  local mport=$MOCK_PORT buffering=on; n=$REQUESTS; body=$BODY
  [ "$c" = stream ] && { mport=$SMOCK_PORT; buffering=off; n=$STREAMS; body=$SBODY; }
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/cb; proxy_temp_path $dir/px; fastcgi_temp_path $dir/fc;
  uwsgi_temp_path $dir/uw; scgi_temp_path $dir/sc;
  keepalive_requests 1000000;
  upstream mock { server 127.0.0.1:$mport; keepalive 1024; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port;
    location /healthz { return 200 ok; }
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering $buffering; }
  }
}
EOF
  under_callgrind "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
  wait_http "http://127.0.0.1:$port/healthz" 60
  url=http://127.0.0.1:$port/v1/chat/completions
  local warm=$WARM; [ "$c" = stream ] && warm=5
  send "$url" "$warm" "$body"
  callgrind_control -z "$CG_PID" >/dev/null 2>&1
  : >"$WORK/codes"
  send "$url" "$n" "$body"
  IR[nginx $c]=$(dump_total "$CG_PID" "nginx-$c")
  BAD[nginx $c]=$(grep -vc '^200$' "$WORK/codes" || true)
  stop "$CG_PID"
}

per() { awk -v a="$1" -v n="$2" 'BEGIN {printf "%.0f", a / n}'; }
for c in "${CASES[@]}"; do
  log "callgrind: forwarder, $c"
  measure_forwarder "$c"
  if [ "$c" = bare ] || [ "$c" = stream ]; then
    log "callgrind: nginx, $c"
    measure_nginx "$c"
  fi
done

{
  echo "callgrind instructions (Ir) per unit, $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- forwarder 2>/dev/null || echo ' (uncommitted changes)')"
  echo "requests per case: $REQUESTS (streams: $STREAMS of $EVENTS events), 4 at a time by curl, after $WARM warm-up requests; counters zeroed after the warm-up"
  printf '%-12s %14s %14s %s\n' case forwarder nginx note
  for c in "${CASES[@]}"; do
    n=$REQUESTS; [ "$c" = stream ] && n=$STREAMS
    f=$(per "${IR[fwd $c]}" "$n")
    g=-; [ -n "${IR[nginx $c]:-}" ] && g=$(per "${IR[nginx $c]}" "$n")
    note=""
    [ "$g" != - ] && note="$(awk -v f="$f" -v g="$g" 'BEGIN {printf "%.2fx nginx", f / g}')"
    [ "$c" != bare ] && [ "$c" != stream ] && [ -n "${IR[fwd bare]:-}" ] &&
      note="feature's own cost $(awk -v f="$f" -v b="$(per "${IR[fwd bare]}" "$REQUESTS")" 'BEGIN {printf "%+.0f", f - b}') per request"
    [ "${BAD[fwd $c]:-0}" = 0 ] && [ "${BAD[nginx $c]:-0}" = 0 ] || note="$note; NOT 200: ${BAD[fwd $c]:-0} forwarder, ${BAD[nginx $c]:-0} nginx"
    printf '%-12s %14s %14s %s\n' "$c/request" "$f" "$g" "$note"
    if [ "$c" = stream ]; then
      fe=$(per "${IR[fwd stream]}" $((n * EVENTS)))
      ge=$(per "${IR[nginx stream]}" $((n * EVENTS)))
      printf '%-12s %14s %14s %s\n' "stream/event" "$fe" "$ge" "$(awk -v f="$fe" -v g="$ge" 'BEGIN {printf "%.2fx nginx", f / g}')"
    fi
  done
  echo "profiles (self cost, top $TOP): ${OUT#"$ROOT"/}/"
} | tee "$OUT/summary.txt"
