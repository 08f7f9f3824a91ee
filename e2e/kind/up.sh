#!/usr/bin/env bash
# Creates the end-to-end environment on kind:
#   1. a kind cluster ($KIND_CLUSTER, default modelforwarder; 1 control
#      plane + 2 workers), its kubeconfig written to .tools/kind-<name>.kubeconfig;
#   2. the forwarder and operator images built (docker/…Dockerfile) and
#      loaded into the cluster's nodes (SKIP_BUILD=1 loads existing ones);
#   3. a minimal Prometheus + Alertmanager (e2e/kind/prometheus.yaml) with
#      the chart's SLO rules, alerting to the operator's webhook;
#   4. the operator chart, watching the namespace the e2e scenarios use
#      ($E2E_NAMESPACE, default mf-scenarios), pointed at that Prometheus.
# Idempotent: re-running upgrades in place. Tear down with e2e/kind/down.sh.
#
# Needs docker (or CONTAINER_ENGINE=podman with KIND_EXPERIMENTAL_PROVIDER=podman),
# kind >= 0.23, kubectl, helm >= 3.14 (HELM=...). NOT RUN in this
# repository's CI, which has no container engine: see docs/packaging.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

KIND_CLUSTER=${KIND_CLUSTER:-modelforwarder}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
FORWARDER_IMAGE=${FORWARDER_IMAGE:-ghcr.io/modelforwarder/forwarder:$VERSION}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/modelforwarder/operator:$VERSION}
CONTAINER_ENGINE=${CONTAINER_ENGINE:-docker}
E2E_NAMESPACE=${E2E_NAMESPACE:-mf-scenarios}
RELEASE=${RELEASE:-modelforwarder-operator}
RELEASE_NAMESPACE=${RELEASE_NAMESPACE:-modelforwarder-system}
CHART=charts/modelforwarder-operator
if [ -z "${HELM:-}" ]; then
  if [ -x .tools/bin/helm ]; then HELM=.tools/bin/helm; else HELM=helm; fi
fi
KUBECONFIG_FILE=${KUBECONFIG_FILE:-$PWD/.tools/kind-$KIND_CLUSTER.kubeconfig}

log() { printf '\n==> %s\n' "$*"; }
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "up.sh: $1 is required ($2)" >&2; exit 1; }
}
need "$CONTAINER_ENGINE" "a container engine: https://docs.docker.com/engine/install/"
need kind "go install sigs.k8s.io/kind@latest, or your package manager"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need "$HELM" "bash charts/install-helm.sh, or your package manager"

mkdir -p "$(dirname "$KUBECONFIG_FILE")"
export KUBECONFIG=$KUBECONFIG_FILE
split_image() { # image -> "repository tag"
  local img=$1
  echo "${img%:*} ${img##*:}"
}

log "kind cluster $KIND_CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
  kind export kubeconfig --name "$KIND_CLUSTER" --kubeconfig "$KUBECONFIG_FILE"
else
  kind create cluster --name "$KIND_CLUSTER" --config e2e/kind/kind-config.yaml \
    --kubeconfig "$KUBECONFIG_FILE" --wait 120s
fi
kubectl cluster-info

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building images"
  "$CONTAINER_ENGINE" build --build-arg "VERSION=$VERSION" -f docker/forwarder.Dockerfile -t "$FORWARDER_IMAGE" .
  "$CONTAINER_ENGINE" build --build-arg "VERSION=$VERSION" -f docker/operator.Dockerfile -t "$OPERATOR_IMAGE" .
fi
log "loading images into the nodes"
kind load docker-image --name "$KIND_CLUSTER" "$FORWARDER_IMAGE" "$OPERATOR_IMAGE"

log "Prometheus and Alertmanager (namespace monitoring)"
kubectl apply --server-side -f e2e/kind/prometheus.yaml
# The chart's SLO rules as a plain Prometheus rule file: the spec of its
# PrometheusRule (one source of truth for the alerts), quicker to fire than
# in production (1m window, 30s for) so the scenarios see the webhook loop.
"$HELM" template "$RELEASE" "$CHART" --namespace "$RELEASE_NAMESPACE" \
    --set prometheusRule.enabled=true --set prometheusRule.slo.window=1m --set prometheusRule.slo.for=30s \
    --show-only templates/prometheusrule.yaml |
  sed -n '/^spec:/,$p' | tail -n +2 | sed 's/^  //' >"$(dirname "$KUBECONFIG_FILE")/slo-rules.yaml"
kubectl -n monitoring create configmap prometheus-rules \
  --from-file=slo.yaml="$(dirname "$KUBECONFIG_FILE")/slo-rules.yaml" \
  --dry-run=client -o yaml | kubectl apply --server-side -f -
kubectl -n monitoring patch deployment prometheus --type merge -p \
  "{\"spec\":{\"template\":{\"metadata\":{\"annotations\":{\"checksum/rules\":\"$(sha256sum "$(dirname "$KUBECONFIG_FILE")/slo-rules.yaml" | cut -c1-16)\"}}}}}"
kubectl -n monitoring rollout status deployment/prometheus --timeout=180s
kubectl -n monitoring rollout status deployment/alertmanager --timeout=180s

log "operator chart ($RELEASE in $RELEASE_NAMESPACE, watching $E2E_NAMESPACE)"
kubectl create namespace "$E2E_NAMESPACE" --dry-run=client -o yaml | kubectl apply --server-side -f -
# Helm installs crds/ only on first install: apply the CRD so re-runs upgrade it.
kubectl apply --server-side --force-conflicts -f "$CHART/crds/modelforwarder.yaml"
read -r op_repo op_tag <<<"$(split_image "$OPERATOR_IMAGE")"
read -r fw_repo fw_tag <<<"$(split_image "$FORWARDER_IMAGE")"
"$HELM" upgrade --install "$RELEASE" "$CHART" \
  --namespace "$RELEASE_NAMESPACE" --create-namespace \
  --set image.repository="$op_repo" --set image.tag="$op_tag" --set image.pullPolicy=IfNotPresent \
  --set forwarderImage.repository="$fw_repo" --set forwarderImage.tag="$fw_tag" \
  --set watchNamespace="$E2E_NAMESPACE" \
  --set prometheusUrl=http://prometheus.monitoring.svc:9090 \
  --set autoscaler.interval=5s --set autoscaler.rateWindow=20s --set autoscaler.maxSampleAge=15s \
  --set 'logLevel=info\,operator=debug' \
  --wait --timeout 180s

log "ready"
cat <<MSG
export KUBECONFIG=$KUBECONFIG_FILE
# the e2e suite (cluster tests + scenarios):
FORWARDER_IMAGE=$FORWARDER_IMAGE E2E_NAMESPACE=$E2E_NAMESPACE \\
  cargo test -p e2e -- --nocapture --test-threads=1
# tear down: e2e/kind/down.sh
MSG
