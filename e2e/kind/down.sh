#!/usr/bin/env bash
# Deletes the kind cluster created by e2e/kind/up.sh (and everything in it)
# and its kubeconfig. Idempotent. Needs kind.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND_CLUSTER=${KIND_CLUSTER:-modelforwarder}
KUBECONFIG_FILE=${KUBECONFIG_FILE:-$PWD/.tools/kind-$KIND_CLUSTER.kubeconfig}
command -v kind >/dev/null 2>&1 || { echo "down.sh: kind is required" >&2; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
  kind delete cluster --name "$KIND_CLUSTER" --kubeconfig "$KUBECONFIG_FILE"
else
  echo "down.sh: no kind cluster named $KIND_CLUSTER"
fi
rm -f "$KUBECONFIG_FILE" "$(dirname "$KUBECONFIG_FILE")/slo-rules.yaml"
