#!/usr/bin/env bash
# The chaos run of the seed's case study (forwarder/tests/chaos.rs): three
# forwarder processes on a real redis-server and a Kafka-protocol broker,
# kill -9s, a rolling restart, a key rotation, Redis and broker restarts,
# then the end-to-end checks as a table. CI runs it for 3 minutes as part
# of `cargo test`; this runs it longer, in a release build:
#
#   CHAOS_SECS=1800 CHAOS_RATE=40 OUT=chaos-out bash e2e/chaos/run.sh
#
# RELEASE=0 runs the debug build (no release build to wait for).
#
# Writes OUT/table.md, OUT/timeline.csv, OUT/faults.csv and OUT/chaos.svg.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-chaos-out}
mkdir -p "$OUT"
export CHAOS_SECS=${CHAOS_SECS:-1800} CHAOS_RATE=${CHAOS_RATE:-40}
export CHAOS_KILL_EVERY=${CHAOS_KILL_EVERY:-60} CHAOS_BATCH_LINES=${CHAOS_BATCH_LINES:-200}
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
export CHAOS_OUT="$OUT"
if [ -z "${TANSU_BIN:-}" ] && [ -x target/kafka-bin/tansu ]; then
  export TANSU_BIN="$PWD/target/kafka-bin/tansu"
fi
profile=(--release)
[ "${RELEASE:-1}" = 0 ] && profile=()
cargo test "${profile[@]}" --locked -p forwarder --test chaos -- --nocapture 2>&1 | tee "$OUT/run.log"
python3 e2e/chaos/plot.py "$OUT" > "$OUT/chaos.svg"
echo "table: $OUT/table.md, plot: $OUT/chaos.svg"
