#!/usr/bin/env bash
# Chart checks run by scripts/test.sh (and `make chart-check`):
#   1. the chart's CRD is byte-identical to crds/modelforwarder.yaml;
#   2. `helm lint --strict` with the default values and every ci/*-values.yaml;
#   3. `helm template` of each, validated offline against the Kubernetes
#      OpenAPI schemas (PyPI kubernetes-validate, strict: unknown fields fail)
#      for the oldest and newest Kubernetes the chart targets; only the
#      prometheus-operator kinds may lack a schema;
#   4. values the chart must refuse are refused.
# The RBAC and content checks are Rust tests: e2e/tests/chart.rs.
#
# Needs helm (HELM=..., else .tools/bin/helm from charts/install-helm.sh)
# and .venv/bin/kubernetes-validate (scripts/requirements-test.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=charts/modelforwarder-operator
HELM=${HELM:-.tools/bin/helm}
VALIDATE=${KUBERNETES_VALIDATE:-.venv/bin/kubernetes-validate}
KUBE_VERSIONS=(1.27.0 1.35.0)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
fail() { echo "charts/check.sh: FAIL: $*" >&2; exit 1; }

[ -x "$HELM" ] || fail "no helm at $HELM: run bash charts/install-helm.sh (or set HELM)"
[ -x "$VALIDATE" ] || fail "no $VALIDATE: run ./scripts/test.sh (installs scripts/requirements-test.txt)"

cmp -s crds/modelforwarder.yaml "$CHART/crds/modelforwarder.yaml" ||
  fail "$CHART/crds/modelforwarder.yaml differs from crds/modelforwarder.yaml: cp crds/modelforwarder.yaml $CHART/crds/"
echo "ok: chart CRD identical to crds/modelforwarder.yaml"

value_sets=(default)
for f in "$CHART"/ci/*-values.yaml; do value_sets+=("$f"); done

for set in "${value_sets[@]}"; do
  args=()
  name=default
  if [ "$set" != default ]; then args=(-f "$set"); name=$(basename "$set" -values.yaml); fi
  "$HELM" lint --strict "$CHART" "${args[@]}" >"$OUT/lint.log" 2>&1 || { cat "$OUT/lint.log"; fail "helm lint ($name)"; }
  "$HELM" template mf "$CHART" --namespace mf-system --include-crds "${args[@]}" >"$OUT/$name.yaml" ||
    fail "helm template ($name)"
  for v in "${KUBE_VERSIONS[@]}"; do
    if ! "$VALIDATE" --strict --quiet -k "$v" "$OUT/$name.yaml" >"$OUT/validate.log" 2>&1; then
      cat "$OUT/validate.log"; fail "schema validation ($name, Kubernetes $v)"
    fi
    # Kinds without a schema are only warned about: allow just the
    # prometheus-operator ones (validated by e2e/tests/chart.rs instead).
    if grep "Couldn't find schema" "$OUT/validate.log" | grep -v "api version monitoring.coreos.com/v1 " | grep -q .; then
      cat "$OUT/validate.log"; fail "a rendered kind has no schema ($name, Kubernetes $v)"
    fi
  done
  echo "ok: $name values: lint, template, schema-valid on Kubernetes ${KUBE_VERSIONS[*]} ($(grep -c '^kind:' "$OUT/$name.yaml") objects)"
done

# The PrometheusRule's PromQL, checked and unit-tested by promtool (Debian
# package prometheus, installed by scripts/test.sh).
if ! command -v promtool >/dev/null 2>&1; then
  [ -n "${SKIP_PROMTOOL:-}" ] ||
    fail "promtool is missing: apt-get install prometheus (or ./scripts/test.sh), or set SKIP_PROMTOOL=1"
  echo "skipped: promtool checks (SKIP_PROMTOOL set)"
else
  # The same extraction e2e/kind/up.sh feeds its Prometheus.
  "$HELM" template mf "$CHART" --set prometheusRule.enabled=true --set metrics.serviceMonitor.enabled=true \
      --show-only templates/prometheusrule.yaml |
    sed -n '/^spec:/,$p' | tail -n +2 | sed 's/^  //' >"$OUT/rules.yaml"
  promtool check rules "$OUT/rules.yaml" >"$OUT/promtool.log" 2>&1 || { cat "$OUT/promtool.log"; fail "promtool check rules"; }
  echo "ok: PrometheusRule passes promtool check rules"
  # Unit tests of the alerts: which ModelForwarder fires what, with which labels.
  cp charts/tests/slo-rules.test.yaml "$OUT/"
  promtool test rules "$OUT/slo-rules.test.yaml" >"$OUT/promtool.log" 2>&1 || { cat "$OUT/promtool.log"; fail "promtool test rules (charts/tests/slo-rules.test.yaml)"; }
  echo "ok: SLO alerts pass their promtool unit tests"
fi

# The kind environment's manifests (Debian's promtool lacks kubernetes_sd,
# so its Prometheus config is checked in a real cluster only).
"$VALIDATE" --strict --quiet -k 1.35.0 e2e/kind/prometheus.yaml >"$OUT/validate.log" 2>&1 ||
  { cat "$OUT/validate.log"; fail "schema validation of e2e/kind/prometheus.yaml"; }
echo "ok: e2e/kind/prometheus.yaml schema-valid"

# The packaged chart (what a chart repository would serve) holds the CRD and
# the dashboard, and renders like the source tree.
"$HELM" package "$CHART" -d "$OUT/pkg" >/dev/null || fail "helm package"
pkg=$(ls "$OUT"/pkg/*.tgz)
tar -tzf "$pkg" >"$OUT/pkg.list"
for f in crds/modelforwarder.yaml dashboards/modelforwarder.json values.schema.json; do
  grep -qx "modelforwarder-operator/$f" "$OUT/pkg.list" || fail "the packaged chart lacks $f"
done
"$HELM" template mf "$pkg" --namespace mf-system --include-crds -f "$CHART/ci/all-on-values.yaml" >"$OUT/from-package.yaml"
cmp -s "$OUT/from-package.yaml" "$OUT/all-on.yaml" || fail "the packaged chart renders differently from $CHART"
echo "ok: helm package ($(basename "$pkg")) holds the CRD and dashboard and renders the same"

# Values the chart must refuse.
refuse() {
  local why=$1; shift
  if "$HELM" template mf "$CHART" "$@" >/dev/null 2>&1; then fail "accepted: $why"; fi
}
refuse "an unknown value" --set noSuchValue=1
refuse "two replicas without leader election" --set replicaCount=2 --set leaderElection.enabled=false
refuse "an invalid log format" --set logFormat=xml
refuse "a non-URL prometheusUrl" --set prometheusUrl=prometheus:9090
refuse "an invalid namespace" --set watchNamespace=Not_A_Namespace
refuse "an invalid namespace in the list" --set 'watchNamespaces={ai,Not_A_Namespace}'
echo "ok: invalid values refused"
