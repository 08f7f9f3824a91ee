#!/usr/bin/env bash
# CI's FAQ check (scripts/test.sh): e2e/load/faq/run.sh scaled down, 4 s per
# run (Locust and k6, cache off and on: ~30 s in all) at 50 requests/s. It
# fails on any error, or when the cache-on run did not make fewer upstream
# calls than the cache-off run (run.sh's checks). A guard that the scenario,
# both scripts and the cache keep working together, not a measurement.
#
#   bash e2e/load/faq/ci.sh                 # builds the forwarder (debug) if needed
#   MF_FORWARDER_BIN=target/release/forwarder bash e2e/load/faq/ci.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."

if [ -z "${MF_FORWARDER_BIN:-}" ]; then
  MF_FORWARDER_BIN="${CARGO_TARGET_DIR:-target}/debug/forwarder"
  # As e2e/load/ci-step.sh: `cargo test --workspace` has just built it;
  # build only when it is missing or older than its sources.
  if [ ! -x "$MF_FORWARDER_BIN" ] ||
     [ -n "$(find forwarder forwarder-config Cargo.lock -type f -newer "$MF_FORWARDER_BIN" -print -quit)" ]; then
    cargo build -q --locked -p forwarder --bin forwarder
  fi
fi
export MF_FORWARDER_BIN
FAQ_DURATION=${FAQ_DURATION:-4} FAQ_RATE=${FAQ_RATE:-50} exec bash e2e/load/faq/run.sh
