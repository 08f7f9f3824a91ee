#!/usr/bin/env bash
# CI's JMeter check: e2e/load/step.jmx and mixed.jmx, scaled down through
# JMeter properties (step 10 → 20 → 30 users, 5 s each; mixed 20 users,
# 10 s), headless (-n) against a local forwarder (API keys on) whose
# upstream is `forwarder mock-llm` (20 ms latency), both on free loopback
# ports. Prints throughput, P50/P99 and error rate per sampler
# (e2e/load/jtl_summary.py) and fails on any error or if the forwarder dies.
#
#   bash e2e/load/jmeter-ci.sh
#   MF_FORWARDER_BIN=target/release/forwarder bash e2e/load/jmeter-ci.sh
# Full-size and distributed runs: docs/load-testing.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

JMETER=e2e/load/jmeter.sh
command -v jmeter >/dev/null || { echo "jmeter-ci.sh: no jmeter: run ./scripts/test.sh (installs the Debian packages jmeter, jmeter-http)" >&2; exit 1; }
STEP_USERS=${STEP_USERS:-10,20,30}
STEP_SECONDS=${STEP_SECONDS:-5}
MIXED_USERS=${MIXED_USERS:-20}
MIXED_SECONDS=${MIXED_SECONDS:-10}

source e2e/lib/local-pair.sh
pair_binary
KEY="sk-jmeter-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
printf 'jmeter: %s\n' "$KEY" >"$WORK/keys.yaml"
pair_start "--latency 20ms" "auth: {api_keys_file: \"$WORK/keys.yaml\"}"

IFS=, read -r u1 u2 u3 <<<"$STEP_USERS"
# CSV results with the fields jtl_summary.py reads; the key goes in a
# properties file, not on the command line.
cat >"$WORK/run.properties" <<PROPS
host=127.0.0.1
port=$FWD_PORT
api_key=$KEY
think_ms=200
ramp_seconds=2
jmeter.save.saveservice.output_format=csv
jmeter.save.saveservice.print_field_names=true
jmeter.save.saveservice.assertion_results_failure_message=true
summariser.interval=5
PROPS

run_plan() { # name, -J properties...
  local name=$1; shift
  set +e
  JVM_ARGS="${JVM_ARGS:--Xms128m -Xmx512m}" "$JMETER" -n -t "e2e/load/$name.jmx" -q "$WORK/run.properties" "$@" \
    -l "$WORK/$name.jtl" -j "$WORK/$name.jmeter.log" >"$WORK/$name.out" 2>&1
  local rc=$?
  set -e
  if [ "$rc" -ne 0 ] || [ ! -s "$WORK/$name.jtl" ]; then
    cat "$WORK/$name.out" >&2; tail -30 "$WORK/$name.jmeter.log" >&2
    echo "jmeter-ci.sh: FAIL ($name.jmx: jmeter exit $rc)" >&2; exit 1
  fi
  echo "== JMeter $name.jmx ($*)"
  python3 e2e/load/jtl_summary.py "$WORK/$name.jtl" --max-error-rate 0 --min-samples 20 ||
    { echo "jmeter-ci.sh: FAIL ($name.jmx)" >&2; exit 1; }
  kill -0 "$FWD_PID" 2>/dev/null || { echo "jmeter-ci.sh: the forwarder died" >&2; cat "$WORK/forwarder.log" >&2; exit 1; }
}

run_plan step -Jusers1="$u1" -Jusers2="$u2" -Jusers3="$u3" -Jstep_seconds="$STEP_SECONDS"
run_plan mixed -Jusers="$MIXED_USERS" -Jduration_seconds="$MIXED_SECONDS"
echo "jmeter-ci.sh: step and mixed plans passed with zero errors"
