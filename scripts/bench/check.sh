# `scripts/bench.sh --check`: the regression check a person runs before a
# release (not CI: shared machines are too noisy). The ratios with targets
# (forwarder against nginx in the same run) are measured BENCH_CHECK_REPS
# times, nginx and the forwarder alternating; a figure fails when its median
# is worse than its target by more than the spread the repetitions showed
# (half their range). Idle RSS is read from a fresh forwarder. Exits 1 when
# any figure fails. Sourced by bench.sh after its run functions.
# shellcheck shell=bash disable=SC2154

median() { tr ' ' '\n' <<<"$*" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
spread() { tr ' ' '\n' <<<"$*" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f", (hi - lo) / 2}'; }

check_main() {
  local reps=${BENCH_CHECK_REPS:-3} r fails=0
  DURATION=${BENCH_CHECK_DURATION:-5}
  wait_quiet
  MOCK_PORT=$(free_port); start_mock "$MOCK_PORT"; local mock=$MOCK_PID
  SMOCK_PORT=$(free_port); start_mock "$SMOCK_PORT" --reply-words "$STREAM_REPLY_WORDS"; local smock=$MOCK_PID
  NGINX_PORT=$(free_port); local nsport; nsport=$(free_port)
  start_nginx check "$NGINX_PORT" "$nsport" "$MOCK_PORT"; local ngx=$NGINX_PID
  SNGINX_PORT=$(free_port); local snport; snport=$(free_port)
  start_nginx scheck "$SNGINX_PORT" "$snport" "$SMOCK_PORT"; local sngx=$NGINX_PID
  FWD_PORT=$(free_port); start_forwarder "$FWD_PORT" "$MOCK_PORT" false; local fwd=$FWD_PID
  SFWD_PORT=$(free_port); start_forwarder "$SFWD_PORT" "$SMOCK_PORT" false; local sfwd=$FWD_PID
  sleep 1
  local idle; idle=$(status_kib "$sfwd" VmRSS)
  read -r EVENTS _ < <(count_events "http://127.0.0.1:$SMOCK_PORT$PATH_CC")
  local rps_pct=() cpu_x=() sps_pct=() ev_x=()
  for ((r = 1; r <= reps; r++)); do
    MOCK_PID=$mock
    # shellcheck disable=SC2046
    max_run nginx "http://127.0.0.1:$NGINX_PORT$PATH_CC" $(nginx_pids "$ngx")
    max_run forwarder "http://127.0.0.1:$FWD_PORT$PATH_CC" "$fwd"
    rps_pct+=("$(pct "${R_rps[forwarder]}" "${R_rps[nginx]}")")
    cpu_x+=("$(ratio "${R_cpu[forwarder]}" "${R_cpu[nginx]}")")
    MOCK_PID=$smock
    # shellcheck disable=SC2046
    stream_run nginx "http://127.0.0.1:$snport$PATH_CC" $(nginx_pids "$sngx")
    stream_run forwarder "http://127.0.0.1:$SFWD_PORT$PATH_CC" "$sfwd"
    sps_pct+=("$(pct "${X_sps[forwarder]}" "${X_sps[nginx]}")")
    ev_x+=("$(ratio "${X_cpu_event[forwarder]}" "${X_cpu_event[nginx]}")")
    log "round $r: req/s ${rps_pct[-1]}% of nginx, CPU/request ${cpu_x[-1]}x, streams/s ${sps_pct[-1]}%, CPU/event ${ev_x[-1]}x"
  done
  # figure, values, target, direction (min: at least; max: at most)
  check_row() {
    local name=$1 vals=$2 target=$3 dir=$4 m s ok
    m=$(median "$vals"); s=$(spread "$vals")
    if [ "$dir" = min ]; then
      ok=$(awk -v m="$m" -v s="$s" -v t="$target" 'BEGIN {print (m + s >= t) ? "ok" : "FAIL"}')
    else
      ok=$(awk -v m="$m" -v s="$s" -v t="$target" 'BEGIN {print (m - s <= t) ? "ok" : "FAIL"}')
    fi
    [ "$ok" = ok ] || fails=$((fails + 1))
    printf '%-40s %10s %8s %12s  %-6s (%s)\n' "$name" "$m" "±$s" "$([ "$dir" = min ] && echo ">=" || echo "<=") $target" "$ok" "$vals"
  }
  {
    echo "bench.sh --check  $(date -u '+%Y-%m-%d %H:%M UTC')  git $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $reps rounds of ${DURATION}s per target; median ± half-range"
    printf '%-40s %10s %8s %12s  %s\n' FIGURE median spread target verdict
    check_row "forwarder req/s, % of nginx" "${rps_pct[*]}" 75 min
    check_row "CPU/request, x nginx" "${cpu_x[*]}" 1.5 max
    check_row "streams/s, % of nginx" "${sps_pct[*]}" 75 min
    check_row "CPU/streamed event, x nginx" "${ev_x[*]}" 1.5 max
    check_row "idle RSS, MiB" "$(awk -v k="$idle" 'BEGIN {printf "%.1f", k / 1024}')" 10 max
    echo "CPU/request nginx / forwarder (last round): ${R_cpu[nginx]} / ${R_cpu[forwarder]} us; CPU/event: ${X_cpu_event[nginx]} / ${X_cpu_event[forwarder]} us"
    echo "other processes used ${BACKGROUND} cores just before the run"
    if ((fails == 0)); then
      echo "check: every figure within its target (allowing the measured spread)"
    else
      echo "check: $fails figure(s) worse than target beyond the measured spread"
    fi
  } >"$WORK/check.txt" # not a pipeline: check_row counts failures in this shell
  tee "$RESULTS" <"$WORK/check.txt"
  stop_nginx "$ngx"; stop_nginx "$sngx"
  stop "$fwd" "$sfwd" "$mock" "$smock"
  ((fails == 0))
}
