#!/usr/bin/env bash
# Benchmarks the forwarder's JWT verification and TLS termination side by side
# with nginx doing the same job, in front of the same mock-llm, on loopback
# only, in one bounded run (≈ 8 minutes; BENCH_DURATION=2: about 2 minutes).
#
#   1. JWT: forwarder without auth, with an API key, with HS256 and ES256
#      tokens (verified-token cache on and off; one token reused, or every
#      request a token the forwarder has not seen), beside nginx as a plain
#      proxy and nginx verifying the same HS256/ES256 tokens in njs.
#   2. TLS: forwarder and nginx over HTTP and HTTPS (P-256 and RSA-2048
#      certificates generated for the run): CPU per request with keep-alive,
#      every request on a new connection (wrk, `Connection: close`), and new
#      handshakes per second with `openssl s_time`, full (-new) and resumed
#      (-reuse).
#
# No figure here has a target; every one is shown as a ratio or difference
# against a baseline measured in the same run (the no-auth forwarder, plain
# nginx, the same proxy over HTTP, or nginx doing the same job). Prints a
# table and writes it, plus the raw output, to
# bench-results/<timestamp>-security.txt (gitignored). See docs/benchmarks.md.
#
#   ./scripts/bench-security.sh                  full run (10 s per row, 2 rounds)
#   BENCH_DURATION=2 ./scripts/bench-security.sh  quick check (2 s per row, 1 round)
#
# Knobs: BENCH_DURATION (seconds measured per row, 10), BENCH_ROUNDS (segments
# each row's time is split into, order reversed every round: 2; 1 when
# BENCH_DURATION < 5), BENCH_WARMUP (2; 0 when BENCH_DURATION < 5),
# BENCH_THREADS (2), BENCH_CONNS (64), BENCH_TOKENS_HS256 and
# BENCH_TOKENS_ES256 (distinct tokens minted: BENCH_DURATION x 20,000 and
# x 5,000, at least 10,000),
# BENCH_HANDSHAKE_CLIENTS (parallel openssl s_time clients, 4),
# BENCH_HANDSHAKE_DURATION (BENCH_DURATION; 1 when BENCH_DURATION < 5),
# BENCH_PYTHON (a python with PyJWT and cryptography: .venv/bin/python, made
# by scripts/test.sh), BENCH_QUIET_WAIT (20; 5 when BENCH_DURATION < 5),
# BENCH_SKIP_BUILD=1, BENCH_JOBS (cargo -j, 2).
#
# W_* (one wrk run's figures) are assigned by lib.sh's run_wrk, through eval.
# shellcheck disable=SC2154
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10}
if ((DURATION < 5)); then
  WARMUP=${BENCH_WARMUP:-0}
  export BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-5}
else
  WARMUP=${BENCH_WARMUP:-2}
fi
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-64}
# Enough distinct tokens that none is sent twice at the rates this box reaches
# (HS256 ~15,000 req/s, ES256 ~3,000); the report says when some were.
declare -A TOKENS=([HS256]=${BENCH_TOKENS_HS256:-$((DURATION * 20000))} [ES256]=${BENCH_TOKENS_ES256:-$((DURATION * 5000))})
for alg in HS256 ES256; do ((TOKENS[$alg] >= 10000)) || TOKENS[$alg]=10000; done
ROUNDS=${BENCH_ROUNDS:-$((DURATION < 5 ? 1 : 2))}
SEG=$((DURATION / ROUNDS)); ((SEG >= 1)) || SEG=1
HS_CLIENTS=${BENCH_HANDSHAKE_CLIENTS:-4}
HS_DURATION=${BENCH_HANDSHAKE_DURATION:-$((DURATION < 5 ? 1 : DURATION))}
PY=${BENCH_PYTHON:-$ROOT/.venv/bin/python}
BIN=$ROOT/target/release/forwarder
LUA_POST=$ROOT/scripts/bench/post.lua
LUA_AUTH=$ROOT/scripts/bench/auth.lua
NGINX_SEC_TMPL=$ROOT/scripts/bench/nginx-security.conf.tmpl
NJS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so
ISSUER=bench-issuer
AUDIENCE=modelforwarder
PATH_CC=/v1/chat/completions

# shellcheck source=scripts/bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
RESULTS=$ROOT/bench-results/$STAMP-security.txt

# openssl (certificates, s_time) and njs (nginx's JWT check), beside lib.sh's.
install_security_deps() {
  local missing=() sudo=""
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  [ -f "$NJS_MODULE" ] || missing+=(libnginx-mod-http-js)
  ((${#missing[@]})) || return 0
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    log "could not install ${missing[*]}; nginx rows that need njs are left out"
  command -v openssl >/dev/null 2>&1 || { echo "openssl is required" >&2; exit 1; }
}
install_security_deps
NJS=0
[ -f "$NJS_MODULE" ] && NJS=1

if ! "$PY" -c 'import jwt, cryptography' 2>/dev/null; then
  echo "need a python with PyJWT and cryptography at $PY (BENCH_PYTHON): run scripts/test.sh once," >&2
  echo "or: python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-test.txt" >&2
  exit 1
fi

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building target/release/forwarder"
  cargo build --release -p forwarder --bin forwarder -j "${BENCH_JOBS:-2}" >&2
fi
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

# ------------------------------------------------------------- material ----
# A fresh HS256 secret, P-256 signing key, API key and two self-signed
# certificates for every run, all in the run's temp dir (removed on exit).

log "generating keys and certificates; minting ${TOKENS[HS256]} HS256 and ${TOKENS[ES256]} ES256 tokens"
openssl rand -hex 32 >"$WORK/hs256.secret"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/es256.key" 2>/dev/null
"$PY" "$ROOT/scripts/bench/mint_tokens.py" jwks "$WORK/es256.key" "$WORK/jwks.json"
API_KEY=$(openssl rand -hex 24)
printf 'bench: %s\n' "$API_KEY" >"$WORK/keys.yaml"
printf '%s\n' "$API_KEY" >"$WORK/apikey.cred"
for alg in HS256 ES256; do
  keyfile=$WORK/hs256.secret
  [ "$alg" = ES256 ] && keyfile=$WORK/es256.key
  "$PY" "$ROOT/scripts/bench/mint_tokens.py" "$alg" "$keyfile" $((TOKENS[$alg] + 1)) "$WORK/$alg.all" "$ISSUER" "$AUDIENCE"
  # The first token is the one reused; the others are sent once each.
  head -1 "$WORK/$alg.all" >"$WORK/$alg.one"
  tail -n +2 "$WORK/$alg.all" >"$WORK/$alg.many"
  rm -f "$WORK/$alg.all"
done
tls_cert() { # name openssl-req-key-options...
  local name=$1; shift
  openssl req -x509 "$@" -nodes -keyout "$WORK/$name.key" -out "$WORK/$name.crt" -days 2 \
    -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost 2>/dev/null
}
tls_cert ec -newkey ec -pkeyopt ec_paramgen_curve:prime256v1
tls_cert rsa -newkey rsa:2048

# ------------------------------------------------------------ processes ----

# start_fwd port auth-yaml tls-yaml -> FWD_PID (auth/tls: YAML lines or "")
start_fwd() {
  local port=$1 auth=$2 tls=$3 cfg=$WORK/fwd-$1.yaml scheme=http
  {
    echo "server:"
    echo "  listen: 127.0.0.1:$port"
    [ -z "$tls" ] || { printf '%s\n' "$tls"; scheme=https; }
    echo "logging: {access_log: false}"
    [ -z "$auth" ] || printf '%s\n' "$auth"
    echo "upstreams:"
    echo "  - {name: mock, provider: openai, base_url: \"http://127.0.0.1:$MOCK_PORT/v1\", models: [mock]}"
  } >"$cfg"
  "$BIN" serve --config "$cfg" >/dev/null 2>"$WORK/fwd-$port.err" &
  FWD_PID=$!
  CHILDREN+=("$FWD_PID")
  wait_url "$scheme://127.0.0.1:$port/readyz" || { cat "$WORK/fwd-$port.err" >&2; exit 1; }
}

wait_url() { # url: like lib.sh's wait_http, certificates not checked (self-signed)
  local url=$1 deadline=$((SECONDS + 15))
  until curl -kfsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $url" >&2; return 1; }
    sleep 0.1
  done
}

jwt_yaml() { # alg cache_entries
  local src="secret_file: $WORK/hs256.secret"
  [ "$1" = ES256 ] && src="jwks_file: $WORK/jwks.json"
  cat <<EOF
auth:
  jwt:
    $src
    algorithms: [$1]
    issuer: $ISSUER
    audiences: [$AUDIENCE]
    principal_claim: sub
    cache_entries: $2
EOF
}
tls_yaml() { # cert name
  printf '  tls:\n    cert_file: %s\n    key_file: %s\n' "$WORK/$1.crt" "$WORK/$1.key"
}

wait_quiet
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$SECONDS
MOCK_PORT=$(free_port); start_mock "$MOCK_PORT"

declare -A PORT PID
start_target() { # key auth tls
  PORT[$1]=$(free_port); start_fwd "${PORT[$1]}" "$2" "$3"; PID[$1]=$FWD_PID
}
start_target fwd "" ""
start_target fwd_key "auth: {api_keys_file: $WORK/keys.yaml}" ""
start_target fwd_hs "$(jwt_yaml HS256 10000)" ""
start_target fwd_hs_nc "$(jwt_yaml HS256 0)" ""
start_target fwd_es "$(jwt_yaml ES256 10000)" ""
start_target fwd_es_nc "$(jwt_yaml ES256 0)" ""
start_target fwd_tls_ec "" "$(tls_yaml ec)"
start_target fwd_tls_rsa "" "$(tls_yaml rsa)"

# nginx: one instance, one server per job (only one is loaded at a time).
NGX_DIR=$WORK/nginx
mkdir -p "$NGX_DIR"
cp "$WORK/ec.crt" "$WORK/ec.key" "$WORK/rsa.crt" "$WORK/rsa.key" "$NGX_DIR/"
for k in ngx ngx_hs ngx_es ngx_tls_ec ngx_tls_rsa ngx_check; do PORT[$k]=$(free_port); done
sed -e "s|@SECRET@|$(cat "$WORK/hs256.secret")|" \
  -e "s|@ES256_SPKI@|$(openssl ec -in "$WORK/es256.key" -pubout -outform DER 2>/dev/null | base64 -w0)|" \
  -e "s|@ISSUER@|$ISSUER|" -e "s|@AUDIENCE@|$AUDIENCE|" "$ROOT/scripts/bench/jwt.js" >"$NGX_DIR/jwt.js"
njs_sed='s|^#NJS#.*||'
((NJS)) && njs_sed='s|^#NJS#||'
sed -e "$njs_sed" -e "s|@NJS_MODULE@|$NJS_MODULE|g" -e "s|@DIR@|$NGX_DIR|g" -e "s|@MOCK_PORT@|$MOCK_PORT|g" \
  -e "s|@PLAIN_PORT@|${PORT[ngx]}|g" -e "s|@HS256_PORT@|${PORT[ngx_hs]}|g" -e "s|@ES256_PORT@|${PORT[ngx_es]}|g" \
  -e "s|@TLS_EC_PORT@|${PORT[ngx_tls_ec]}|g" -e "s|@TLS_RSA_PORT@|${PORT[ngx_tls_rsa]}|g" \
  -e "s|@TLS_CHECK_PORT@|${PORT[ngx_check]}|g" "$NGINX_SEC_TMPL" >"$NGX_DIR/nginx.conf"
"$NGINX" -p "$NGX_DIR" -e "$NGX_DIR/error.log" -c "$NGX_DIR/nginx.conf" >"$NGX_DIR/stdout.log" 2>&1 &
NGX=$!
CHILDREN+=("$NGX")
wait_url "http://127.0.0.1:${PORT[ngx]}/healthz" || { cat "$NGX_DIR/error.log" >&2; exit 1; }
wait_url "https://127.0.0.1:${PORT[ngx_tls_ec]}/healthz"
for w in $(pgrep -P "$NGX"); do CHILDREN+=("$w"); done
read -r -a NGX_PIDS <<<"$(nginx_pids "$NGX")"

url() { # key [scheme]
  echo "${2:-http}://127.0.0.1:${PORT[$1]}$PATH_CC"
}
declare -A URL
for k in fwd fwd_key fwd_hs fwd_hs_nc fwd_es fwd_es_nc ngx ngx_hs ngx_es; do URL[$k]=$(url "$k"); done
for k in fwd_tls_ec fwd_tls_rsa ngx_tls_ec ngx_tls_rsa; do URL[$k]=$(url "$k" https); done
wait_post "http://127.0.0.1:$MOCK_PORT$PATH_CC"
wait_post "${URL[fwd]}"
wait_post "${URL[ngx]}"

# ---------------------------------------------------------------- checks ----
# Each authenticating target must answer 200 to a good credential and 401 to
# a bad one (a tampered signature, another algorithm, a wrong key), or its
# figures would be those of a proxy that checks nothing.

BODY='{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
status() { # url credential
  curl -ks -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $2" -d "$BODY" "$1" || echo 000
}
tamper() { # the signature's first character changed (the last one may be padding bits)
  local sig=${1##*.} repl=A
  [ "${sig:0:1}" = A ] && repl=B
  echo "${1%.*}.$repl${sig:1}"
}
HS_TOKEN=$(cat "$WORK/HS256.one"); ES_TOKEN=$(cat "$WORK/ES256.one")
HS_OTHER=$(sed -n 2p "$WORK/HS256.many"); ES_OTHER=$(sed -n 2p "$WORK/ES256.many")
declare -A CHECK
CHECKS_OK=1
check() { # key good bad...
  local key=$1 good=$2 s out
  shift 2
  out="$(status "${URL[$key]}" "$good")"
  [ "$out" = 200 ] || CHECKS_OK=0
  for s in "$@"; do
    s=$(status "${URL[$key]}" "$s")
    out="$out/$s"
    [ "$s" = 401 ] || CHECKS_OK=0
  done
  CHECK[$key]=$out
}
check fwd_key "$API_KEY" "wrong-$API_KEY" "$HS_TOKEN"
for k in fwd_hs fwd_hs_nc; do check "$k" "$HS_OTHER" "$(tamper "$HS_TOKEN")" "$ES_TOKEN"; done
for k in fwd_es fwd_es_nc; do check "$k" "$ES_OTHER" "$(tamper "$ES_TOKEN")" "$HS_TOKEN"; done
if ((NJS)); then
  check ngx_hs "$HS_OTHER" "$(tamper "$HS_TOKEN")" "$ES_TOKEN"
  check ngx_es "$ES_OTHER" "$(tamper "$ES_TOKEN")" "$HS_TOKEN"
fi
((CHECKS_OK)) || log "WARNING: a credential check failed (see the report); those rows measure a broken setup"

# What each HTTPS server negotiates with OpenSSL's client.
declare -A TLSINFO
tls_info() { # key
  local out proto group
  out=$(openssl s_client -connect "127.0.0.1:${PORT[$1]}" -servername localhost </dev/null 2>&1 || true)
  proto=$(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)$/\1 \2/p' <<<"$out" | head -1)
  group=$(sed -n 's/^Server Temp Key: \(.*\)$/\1/p' <<<"$out" | head -1)
  TLSINFO[$1]="${proto:-?}, ${group:-?}"
}
for k in fwd_tls_ec fwd_tls_rsa ngx_tls_ec ngx_tls_rsa; do tls_info "$k"; done

# Does wrk resume TLS sessions when it reconnects? nginx's check server logs
# $ssl_session_reused ("r" or ".") for every handshake of a 1 s wrk run.
wrk -t1 -c4 -d1s -H 'Connection: close' -s "$LUA_POST" "https://127.0.0.1:${PORT[ngx_check]}/" >/dev/null 2>&1 || true
sleep 0.5
WRK_HANDSHAKES=$(wc -l <"$NGX_DIR/tls-check.log" 2>/dev/null || echo 0)
WRK_RESUMED=$(awk '$1 == "r"' "$NGX_DIR/tls-check.log" 2>/dev/null | wc -l)

# ---------------------------------------------------------- measurements ----
# Rows are defined first, then measured in groups: every row of a group gets
# ROUNDS segments of SEG seconds, the order forward in even rounds and
# reversed in odd ones, so a drift or a passing job on the shared box lands
# on all rows of the group alike; each row's CPU ticks, requests and latency
# histograms are pooled over its segments.

declare -A R_label R_url R_lua R_pids R_opts R_sargs R_warm R_sent
def_row() { # key label "proxy pids" url lua [wrk options...] [-- script args...]
  local key=$1 opts=() sargs=() a
  R_label[$key]=$2; R_pids[$key]=$3; R_url[$key]=$4; R_lua[$key]=$5; shift 5
  for a in "$@"; do
    if ((${#sargs[@]})) || [ "$a" = -- ]; then sargs+=("$a"); else opts+=("$a"); fi
  done
  R_opts[$key]=$(printf '%s\n' "${opts[@]}"); R_sargs[$key]=$(printf '%s\n' "${sargs[@]}")
  R_warm[$key]=${R_sargs[$key]}; R_sent[$key]=0
}
lines() { # newline-separated string -> ARR (no element for an empty string)
  ARR=()
  [ -z "$1" ] || mapfile -t ARR <<<"$1"
}

declare -A A_req A_dur A_err A_ticks A_mticks A_other A_othermax A_client A_softirq A_n
row_init() { local k=$1; A_req[$k]=0; A_dur[$k]=0; A_err[$k]=0; A_ticks[$k]=0; A_mticks[$k]=0
  A_other[$k]=0; A_othermax[$k]=0; A_client[$k]=0; A_softirq[$k]=0; A_n[$k]=0; : >"$WORK/hist-$k"; }
# Adds the window just closed (label) to the row's totals.
accumulate() { # key label
  local k=$1 l=$2
  A_ticks[$k]=$((A_ticks[$k] + T_proxy[$l])); A_mticks[$k]=$((A_mticks[$k] + T_mock[$l]))
  A_n[$k]=$((A_n[$k] + 1))
  A_other[$k]=$(awk -v a="${A_other[$k]}" -v b="${C_other[$l]}" 'BEGIN {print a + b}')
  A_othermax[$k]=$(awk -v a="${A_othermax[$k]}" -v b="${C_other[$l]}" 'BEGIN {print (b > a ? b : a)}')
  A_client[$k]=$(awk -v a="${A_client[$k]}" -v b="${C_wrk[$l]}" 'BEGIN {print a + b}')
  A_softirq[$k]=$(awk -v a="${A_softirq[$k]}" -v b="${C_softirq[$l]}" 'BEGIN {print a + b}')
}

segment() { # key seconds round
  local k=$1 secs=$2 r=$3 label
  local opts sargs
  lines "${R_opts[$k]}"; opts=("${ARR[@]}")
  lines "${R_sargs[$k]}"; sargs=("${ARR[@]}")
  # A rotating row goes on where its last segment stopped (each thread sent
  # about sent/THREADS of its tokens; 5 % margin), so no token is sent twice.
  [[ " ${sargs[*]} " == *" rotate "* ]] && sargs+=("$((R_sent[$k] * 105 / 100 / THREADS + 1))")
  label="${R_label[$k]} #$((r + 1))"
  read -r -a pids <<<"${R_pids[$k]}"
  win_begin "${pids[@]}"
  run_wrk "$label" "${R_lua[$k]}" "${R_url[$k]}" "$CONNS" "$secs" "${opts[@]}" "${sargs[@]}"
  win_end "$label"
  R_sent[$k]=$((R_sent[$k] + W_requests))
  A_req[$k]=$((A_req[$k] + W_requests)); A_dur[$k]=$((A_dur[$k] + W_duration_us))
  A_err[$k]=$((A_err[$k] + W_errors + W_non2xx))
  cat "$W_HIST" >>"$WORK/hist-$k"
  accumulate "$k" "$label"
}

declare -A M_rps M_err M_req M_cpu M_mock M_p50 M_p99 M_note
finish_row() { # key: the pooled figures
  local k=$1
  M_req[$k]=${A_req[$k]}; M_err[$k]=${A_err[$k]}
  M_rps[$k]=$(awk -v r="${A_req[$k]}" -v d="${A_dur[$k]}" 'BEGIN {if (d > 0) printf "%.0f", r / (d / 1e6); else print 0}')
  M_cpu[$k]=$(per_unit_us "${A_ticks[$k]}" "${A_req[$k]}")
  M_mock[$k]=$(per_unit_us "${A_mticks[$k]}" "${A_req[$k]}")
  M_p50[$k]=$(hist_pct "$WORK/hist-$k" 50); M_p99[$k]=$(hist_pct "$WORK/hist-$k" 99)
}

run_group() { # name keys...: warm-up, then ROUNDS rounds
  local name=$1 k r i n keys warm opts
  shift; keys=("$@"); n=${#keys[@]}
  for k in "${keys[@]}"; do
    row_init "$k"
    ((WARMUP > 0)) || continue
    lines "${R_opts[$k]}"; opts=("${ARR[@]}")
    lines "${R_warm[$k]}"; warm=("${ARR[@]}")
    wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -s "${R_lua[$k]}" "${opts[@]}" "${R_url[$k]}" "${warm[@]}" >/dev/null 2>&1 || true
  done
  for ((r = 0; r < ROUNDS; r++)); do
    log "$name: round $((r + 1)) of $ROUNDS, $n rows x ${SEG}s"
    for ((i = 0; i < n; i++)); do
      k=${keys[i]}
      ((r % 2 == 0)) || k=${keys[n - 1 - i]}
      segment "$k" "$SEG" "$r"
    done
  done
  for k in "${keys[@]}"; do finish_row "$k"; done
}

# openssl s_time: HS_CLIENTS clients in parallel, each opening connection after
# connection for HS_DURATION s, every one a new handshake (-new) or a resumed
# session (-reuse), fetching /healthz (answered by the proxy itself).
stime_row() { # key label target-port-key mode proxy-pids...
  local key=$1 label=$2 pk=$3 mode=$4 i pids=() t0 secs conns reused bytes
  shift 4
  row_init "$key"
  R_label[$key]=$label
  log "$label (${HS_DURATION}s, $HS_CLIENTS clients)"
  win_begin "$@"
  t0=$EPOCHREALTIME
  for ((i = 1; i <= HS_CLIENTS; i++)); do
    openssl s_time -connect "127.0.0.1:${PORT[$pk]}" "-$mode" -time "$HS_DURATION" -www /healthz \
      >"$WORK/stime-$key-$i.out" 2>&1 &
    pids+=($!); CHILDREN+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
  forget "${pids[@]}"
  win_end "$label"
  accumulate "$key" "$label"
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')
  conns=0; reused=0; bytes=0
  for ((i = 1; i <= HS_CLIENTS; i++)); do
    local f=$WORK/stime-$key-$i.out n b
    { printf '\n----- %s: client %d: openssl s_time -connect 127.0.0.1:%s -%s -time %s -www /healthz\n' \
        "$label" "$i" "${PORT[$pk]}" "$mode" "$HS_DURATION"; cat "$f"; } >>"$RAW"
    # "N connections in T real seconds, B bytes read per connection" (the timed part)
    n=$(awk '/connections in .* real seconds/ {n = $1} END {print n + 0}' "$f")
    b=$(awk '/connections in .* real seconds/ {b = $(NF - 4)} END {print b + 0}' "$f")
    conns=$((conns + n)); bytes=$b
    # one character per connection: "r" when the session was resumed
    reused=$((reused + $(grep -v 'connections\|Collecting\|timing\|starting' "$f" | tr -cd 'r' | wc -c)))
  done
  M_req[$key]=$conns
  M_rps[$key]=$(awk -v n="$conns" -v s="$secs" 'BEGIN {printf "%.0f", n / s}')
  M_cpu[$key]=$(per_unit_us "${A_ticks[$key]}" "$conns")
  M_note[$key]="resumed $reused of $conns; $bytes bytes/conn"
  M_err[$key]=$(cat "$WORK"/stime-"$key"-*.out | grep -ci 'error' || true)
}

NGXP="${NGX_PIDS[*]}"
ONE_HS=$WORK/HS256.one; ONE_ES=$WORK/ES256.one
# 1. JWT. Every row sends an Authorization header of about the same size
# (the reused HS256 token where no credential is checked), so requests match.
def_row ngx "nginx, plain proxy" "$NGXP" "${URL[ngx]}" "$LUA_AUTH" -- "$ONE_HS"
def_row ngx_hs "nginx + njs HS256 (js_set)" "$NGXP" "${URL[ngx_hs]}" "$LUA_AUTH" -- "$ONE_HS"
def_row ngx_es "nginx + njs ES256 (auth_request)" "$NGXP" "${URL[ngx_es]}" "$LUA_AUTH" -- "$ONE_ES"
def_row fwd "forwarder, no auth" "${PID[fwd]}" "${URL[fwd]}" "$LUA_AUTH" -- "$ONE_HS"
def_row fwd_key "forwarder, API key" "${PID[fwd_key]}" "${URL[fwd_key]}" "$LUA_AUTH" -- "$WORK/apikey.cred"
def_row fwd_hs "forwarder, HS256, cache on, one token" "${PID[fwd_hs]}" "${URL[fwd_hs]}" "$LUA_AUTH" -- "$ONE_HS"
def_row fwd_hs_nc "forwarder, HS256, cache off" "${PID[fwd_hs_nc]}" "${URL[fwd_hs_nc]}" "$LUA_AUTH" -- "$ONE_HS"
def_row fwd_hs_many "forwarder, HS256, cache on, new tokens" "${PID[fwd_hs]}" "${URL[fwd_hs]}" "$LUA_AUTH" -- "$WORK/HS256.many" rotate "$THREADS"
R_warm[fwd_hs_many]=$(printf '%s\n' -- "$ONE_HS")
def_row fwd_es "forwarder, ES256, cache on, one token" "${PID[fwd_es]}" "${URL[fwd_es]}" "$LUA_AUTH" -- "$ONE_ES"
def_row fwd_es_nc "forwarder, ES256, cache off" "${PID[fwd_es_nc]}" "${URL[fwd_es_nc]}" "$LUA_AUTH" -- "$ONE_ES"
def_row fwd_es_many "forwarder, ES256, cache on, new tokens" "${PID[fwd_es]}" "${URL[fwd_es]}" "$LUA_AUTH" -- "$WORK/ES256.many" rotate "$THREADS"
R_warm[fwd_es_many]=$(printf '%s\n' -- "$ONE_ES")
def_row fwd_again "forwarder, no auth (again)" "${PID[fwd]}" "${URL[fwd]}" "$LUA_AUTH" -- "$ONE_HS"
# 2. TLS: keep-alive, then every request on a new connection.
CLOSE=(-H "Connection: close")
def_row t_ngx "nginx, HTTP" "$NGXP" "${URL[ngx]}" "$LUA_POST"
def_row t_ngx_ec "nginx, HTTPS P-256" "$NGXP" "${URL[ngx_tls_ec]}" "$LUA_POST"
def_row t_fwd "forwarder, HTTP" "${PID[fwd]}" "${URL[fwd]}" "$LUA_POST"
def_row t_fwd_ec "forwarder, HTTPS P-256" "${PID[fwd_tls_ec]}" "${URL[fwd_tls_ec]}" "$LUA_POST"
def_row c_ngx "nginx, HTTP, Connection: close" "$NGXP" "${URL[ngx]}" "$LUA_POST" "${CLOSE[@]}"
def_row c_ngx_ec "nginx, HTTPS P-256, Connection: close" "$NGXP" "${URL[ngx_tls_ec]}" "$LUA_POST" "${CLOSE[@]}"
def_row c_ngx_rsa "nginx, HTTPS RSA-2048, Connection: close" "$NGXP" "${URL[ngx_tls_rsa]}" "$LUA_POST" "${CLOSE[@]}"
def_row c_fwd "forwarder, HTTP, Connection: close" "${PID[fwd]}" "${URL[fwd]}" "$LUA_POST" "${CLOSE[@]}"
def_row c_fwd_ec "forwarder, HTTPS P-256, Connection: close" "${PID[fwd_tls_ec]}" "${URL[fwd_tls_ec]}" "$LUA_POST" "${CLOSE[@]}"
def_row c_fwd_rsa "forwarder, HTTPS RSA-2048, Connection: close" "${PID[fwd_tls_rsa]}" "${URL[fwd_tls_rsa]}" "$LUA_POST" "${CLOSE[@]}"

JWT_ROWS=(ngx fwd fwd_key fwd_hs fwd_hs_nc fwd_hs_many fwd_es fwd_es_nc fwd_es_many fwd_again)
((NJS)) && JWT_ROWS=(ngx ngx_hs ngx_es "${JWT_ROWS[@]:1}")
run_group "1. JWT" "${JWT_ROWS[@]}"
for k in fwd_hs_many fwd_es_many; do
  alg=HS256
  [ "$k" = fwd_es_many ] && alg=ES256
  if ((M_req[$k] * 105 / 100 > TOKENS[$alg])); then
    M_note[$k]="only ${TOKENS[$alg]} tokens for ${M_req[$k]} requests: some sent twice (cache hits)"
  else
    M_note[$k]="${M_req[$k]} requests, each token sent once"
  fi
done
run_group "2a. TLS keep-alive" t_ngx t_ngx_ec t_fwd t_fwd_ec
run_group "2b. Connection: close" c_ngx c_ngx_ec c_ngx_rsa c_fwd c_fwd_ec c_fwd_rsa
stime_row h_ngx_ec "nginx, s_time -new P-256" ngx_tls_ec new "${NGX_PIDS[@]}"
stime_row h_fwd_ec "forwarder, s_time -new P-256" fwd_tls_ec new "${PID[fwd_tls_ec]}"
stime_row h_ngx_rsa "nginx, s_time -new RSA-2048" ngx_tls_rsa new "${NGX_PIDS[@]}"
stime_row h_fwd_rsa "forwarder, s_time -new RSA-2048" fwd_tls_rsa new "${PID[fwd_tls_rsa]}"
stime_row r_ngx_ec "nginx, s_time -reuse P-256" ngx_tls_ec reuse "${NGX_PIDS[@]}"
stime_row r_fwd_ec "forwarder, s_time -reuse P-256" fwd_tls_ec reuse "${PID[fwd_tls_ec]}"
ORDER=("${JWT_ROWS[@]}" t_ngx t_ngx_ec t_fwd t_fwd_ec c_ngx c_ngx_ec c_ngx_rsa c_fwd c_fwd_ec c_fwd_rsa
  h_ngx_ec h_fwd_ec h_ngx_rsa h_fwd_rsa r_ngx_ec r_fwd_ec)
ELAPSED=$((SECONDS - START))

# --------------------------------------------------------------- report ----

diff_us() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "n/a" || b == "n/a") print "n/a"; else printf "%+.2f", a - b}'; }
line() { printf '%-46s %8s %6s %9s %-20s %9s %9s  %s\n' "$@"; }
show() { # key label base-key base-name
  local k=$1 vs="" note=${M_note[$1]:-}
  [ -z "${3:-}" ] || vs="$(ratio "${M_cpu[$k]}" "${M_cpu[$3]}")x $4 ($(diff_us "${M_cpu[$k]}" "${M_cpu[$3]}"))"
  [ -z "${CHECK[$k]:-}" ] || note="checks ${CHECK[$k]}${note:+; $note}"
  line "$2" "${M_rps[$k]}" "${M_err[$k]}" "${M_cpu[$k]}" "$vs" "$(ms "${M_p50[$k]}")" "$(ms "${M_p99[$k]}")" "$note"
}
show_hs() { # key label base-key base-name (handshake rows: no latencies)
  local k=$1
  line "$2" "${M_rps[$k]}" "${M_err[$k]}" "${M_cpu[$k]}" "$(ratio "${M_cpu[$k]}" "${M_cpu[$3]}")x $4" "-" "-" "${M_note[$k]:-}"
}
vs() { # label key-a key-b: CPU/request a ÷ b and req/s a as % of b
  printf '  %-58s CPU %sx (%s us), req/s %s%%\n' "$1" "$(ratio "${M_cpu[$2]}" "${M_cpu[$3]}")" \
    "$(diff_us "${M_cpu[$2]}" "${M_cpu[$3]}")" "$(pct "${M_rps[$2]}" "${M_rps[$3]}")"
}
added() { # label fwd-key fwd-base ngx-key ngx-base: the CPU each adds to its own baseline
  local f n
  f=$(diff_us "${M_cpu[$2]}" "${M_cpu[$3]}"); n=$(diff_us "${M_cpu[$4]}" "${M_cpu[$5]}")
  printf '  %-58s forwarder %s us, nginx %s us\n' "$1" "$f" "$n"
}

report() {
  local code
  code=$(git log -1 --format=%h -- . ':(exclude)scripts' ':(exclude)docs' 2>/dev/null || echo '?')
  echo "ModelForwarder security benchmark  $(date -u '+%Y-%m-%d %H:%M UTC')  git $(git rev-parse --short HEAD 2>/dev/null || echo '?') (forwarder code as of $code)$(git diff --quiet HEAD -- forwarder forwarder-config 2>/dev/null || echo ', with uncommitted changes')"
  echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'), $("$NGINX" -v 2>&1 | sed 's/.*: //'), njs $( ((NJS)) && dpkg-query -W -f '${Version}' libnginx-mod-http-js 2>/dev/null || echo 'not installed'), $(openssl version | awk '{print $1, $2}')"
  echo "rows: wrk -t$THREADS -c$CONNS POST $PATH_CC, ${DURATION}s per row as $ROUNDS round(s) of ${SEG}s (order reversed every round; +${WARMUP}s warm-up); s_time: $HS_CLIENTS clients x ${HS_DURATION}s"
  echo "CPU = utime+stime of the proxy's processes (nginx: master + workers) / requests (or connections); all processes share the $(nproc) cores"
  echo "wall time of measurements ${ELAPSED}s; load average at start: $LOADAVG_START; other processes used ${BACKGROUND} cores just before"
  echo
  echo "1. JWT (keep-alive; one token = the same token every request; new tokens = each request a token not sent before)"
  line "ROW" "REQ/S" "ERR" "CPU us/req" "vs baseline" "P50" "P99" "NOTES"
  show ngx "nginx, plain proxy"
  if ((NJS)); then
    show ngx_hs "nginx + njs HS256 (js_set)" ngx "nginx"
    show ngx_es "nginx + njs ES256 (auth_request)" ngx "nginx"
  fi
  show fwd "forwarder, no auth"
  show fwd_key "forwarder, API key" fwd "no-auth"
  show fwd_hs "forwarder, HS256, cache on, one token" fwd "no-auth"
  show fwd_hs_nc "forwarder, HS256, cache off, one token" fwd "no-auth"
  show fwd_hs_many "forwarder, HS256, cache on, new tokens" fwd "no-auth"
  show fwd_es "forwarder, ES256, cache on, one token" fwd "no-auth"
  show fwd_es_nc "forwarder, ES256, cache off, one token" fwd "no-auth"
  show fwd_es_many "forwarder, ES256, cache on, new tokens" fwd "no-auth"
  show fwd_again "forwarder, no auth (again, drift check)" fwd "no-auth"
  echo
  echo "forwarder vs nginx (CPU per request ratio and difference; req/s as % of nginx's):"
  vs "plain proxy: forwarder no auth / nginx" fwd ngx
  if ((NJS)); then
    vs "HS256: forwarder cache on, one token / nginx njs" fwd_hs ngx_hs
    vs "HS256: forwarder cache off / nginx njs" fwd_hs_nc ngx_hs
    vs "HS256: forwarder cache on, new tokens / nginx njs" fwd_hs_many ngx_hs
    vs "ES256: forwarder cache on, one token / nginx njs" fwd_es ngx_es
    vs "ES256: forwarder cache off / nginx njs" fwd_es_nc ngx_es
    vs "ES256: forwarder cache on, new tokens / nginx njs" fwd_es_many ngx_es
    echo "CPU added by verification over the same proxy without it (us/request):"
    added "HS256, verified every request (fwd cache off)" fwd_hs_nc fwd ngx_hs ngx
    added "ES256, verified every request (fwd cache off)" fwd_es_nc fwd ngx_es ngx
  else
    echo "  njs (libnginx-mod-http-js) is not installed: no nginx JWT rows; nginx plain proxying is the reference"
  fi
  echo
  echo "2. TLS (P-256 unless RSA-2048 named)"
  line "ROW" "REQ/S" "ERR" "CPU us/req" "vs baseline" "P50" "P99" "NOTES"
  show t_ngx "nginx, HTTP keep-alive"
  show t_ngx_ec "nginx, HTTPS keep-alive" t_ngx "HTTP"
  show t_fwd "forwarder, HTTP keep-alive"
  show t_fwd_ec "forwarder, HTTPS keep-alive" t_fwd "HTTP"
  show c_ngx "nginx, HTTP, Connection: close"
  show c_ngx_ec "nginx, HTTPS, Connection: close" c_ngx "HTTP close"
  show c_ngx_rsa "nginx, HTTPS RSA, Connection: close" c_ngx "HTTP close"
  show c_fwd "forwarder, HTTP, Connection: close"
  show c_fwd_ec "forwarder, HTTPS, Connection: close" c_fwd "HTTP close"
  show c_fwd_rsa "forwarder, HTTPS RSA, Connection: close" c_fwd "HTTP close"
  line "HANDSHAKES (openssl s_time, GET /healthz)" "CONN/S" "ERR" "CPU us/con" "vs baseline" "" "" ""
  show_hs h_ngx_ec "nginx, full handshakes" h_ngx_ec "nginx"
  show_hs h_fwd_ec "forwarder, full handshakes" h_ngx_ec "nginx"
  show_hs h_ngx_rsa "nginx, full handshakes RSA" h_ngx_rsa "nginx"
  show_hs h_fwd_rsa "forwarder, full handshakes RSA" h_ngx_rsa "nginx"
  show_hs r_ngx_ec "nginx, resumed sessions" h_ngx_ec "nginx full"
  show_hs r_fwd_ec "forwarder, resumed sessions" h_fwd_ec "fwd full"
  echo
  echo "forwarder vs nginx:"
  vs "HTTPS keep-alive" t_fwd_ec t_ngx_ec
  vs "HTTP keep-alive (same section)" t_fwd t_ngx
  vs "HTTPS Connection: close, P-256" c_fwd_ec c_ngx_ec
  vs "HTTPS Connection: close, RSA-2048" c_fwd_rsa c_ngx_rsa
  vs "full handshakes (s_time -new), P-256" h_fwd_ec h_ngx_ec
  vs "full handshakes (s_time -new), RSA-2048" h_fwd_rsa h_ngx_rsa
  vs "resumed sessions (s_time -reuse), P-256" r_fwd_ec r_ngx_ec
  echo "CPU TLS adds over the same proxy's HTTP (us/request):"
  added "keep-alive (record encryption only)" t_fwd_ec t_fwd t_ngx_ec t_ngx
  added "Connection: close, P-256 (a handshake per request)" c_fwd_ec c_fwd c_ngx_ec c_ngx
  added "Connection: close, RSA-2048" c_fwd_rsa c_fwd c_ngx_rsa c_ngx
  echo "negotiated (openssl s_client): forwarder P-256 ${TLSINFO[fwd_tls_ec]}; RSA ${TLSINFO[fwd_tls_rsa]}; nginx P-256 ${TLSINFO[ngx_tls_ec]}; RSA ${TLSINFO[ngx_tls_rsa]}"
  echo "wrk's reconnects (Connection: close) resumed $WRK_RESUMED of $WRK_HANDSHAKES TLS sessions on nginx's check server: the Connection: close rows measure $( ((WRK_RESUMED * 2 > WRK_HANDSHAKES)) && echo 'mostly RESUMED handshakes (s_time -new rows: full ones)' || echo 'mostly full handshakes')"
  echo
  echo "credential checks (good/bad... statuses; must be 200/401/401): $( ((CHECKS_OK)) && echo 'all as expected' || echo 'FAILED, see rows')"
  echo
  echo "CPU in cores during each row's segments (2 = whole box), mean (max): client = wrk or s_time;"
  echo "'other' = busy CPU not charged to the client, the proxy or the mock (other jobs on the box, and softirq)"
  local k busy=0
  for k in "${ORDER[@]}"; do
    ((${A_n[$k]:-0})) || continue
    printf '  %-46s client %s  other %s (%s)  softirq %s\n' "${R_label[$k]:-$k}" \
      "$(awk -v a="${A_client[$k]}" -v n="${A_n[$k]}" 'BEGIN {printf "%.2f", a / n}')" \
      "$(awk -v a="${A_other[$k]}" -v n="${A_n[$k]}" 'BEGIN {printf "%.2f", a / n}')" "${A_othermax[$k]}" \
      "$(awk -v a="${A_softirq[$k]}" -v n="${A_n[$k]}" 'BEGIN {printf "%.2f", a / n}')"
    awk -v o="${A_other[$k]}" -v q="${A_softirq[$k]}" -v n="${A_n[$k]}" 'BEGIN {exit !((o - q) / n > 0.5)}' && busy=$((busy + 1))
  done
  if awk -v b="$BACKGROUND" 'BEGIN {exit !(b > 0.25)}'; then
    echo "WARNING: the machine was busy with other work before the run (${BACKGROUND} cores); figures are pessimistic"
  fi
  ((busy == 0)) || echo "WARNING: in $busy rows more than half a core (beyond softirq) went to other jobs: absolute figures are pessimistic; compare ratios"
  echo "mock-llm CPU us/request (JWT rows): $(for k in ngx fwd fwd_hs fwd_es_nc; do printf '%s %s  ' "$k" "${M_mock[$k]}"; done)"
}
report | tee "$RESULTS"
{ echo; echo "================ raw output ================"; cat "$RAW"; } >>"$RESULTS"
log "written to ${RESULTS#"$ROOT"/}"
