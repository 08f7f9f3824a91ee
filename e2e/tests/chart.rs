//! Tests of the Helm chart (charts/modelforwarder-operator), rendered with
//! `helm template`: RBAC grants exactly the API calls the operator makes (no
//! more, no less) in cluster-wide and single-namespace mode; the operator pod
//! is locked down and wired to its flags; the monitoring parts select the
//! labels the operator puts on forwarder pods; the chart's CRD is the
//! generated one. No cluster needed; needs helm (`bash charts/install-helm.sh`,
//! run by scripts/test.sh, or `HELM=/path/to/helm`).
//!
//! Schema validation of the rendered manifests and `helm lint` are in
//! charts/check.sh.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

const RELEASE: &str = "mf";
const RELEASE_NS: &str = "mf-system";
const LEASE: &str = "modelforwarder-operator";

/// Where a call is made: in the namespaces whose ModelForwarders the
/// operator watches, or in its own namespace (the leader Lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Watched,
    Own,
}

/// Every Kubernetes API call the operator makes: (API group, resource,
/// verbs, scope). The single source of truth of this test; keep it in step
/// with operator/src (the source scan below fails when a new `Api<T>`
/// appears) and with docs/operator.md ("RBAC the operator needs").
const OPERATOR_CALLS: &[(&str, &str, &[&str], Scope)] = &[
    // controller.rs: Controller::new(Api<DeserializeGuard<ModelForwarder>>) is
    // a list+watch reflector; the autoscaler and the alert webhook get one.
    (
        "llm.forwarder.dev",
        "modelforwarders",
        &["get", "list", "watch"],
        Scope::Watched,
    ),
    // reconcile.rs: patch_status (server-side apply); the autoscaler too.
    (
        "llm.forwarder.dev",
        "modelforwarders/status",
        &["patch"],
        Scope::Watched,
    ),
    // controller.rs .owns() watches; reconcile.rs get_opt and server-side
    // apply (an apply that creates needs `create`); the scaler field
    // manager's replica patch.
    (
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch"],
        Scope::Watched,
    ),
    (
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch"],
        Scope::Watched,
    ),
    (
        "",
        "services",
        &["get", "list", "watch", "create", "patch"],
        Scope::Watched,
    ),
    // The PDB is deleted when replicas.min drops to 1.
    (
        "policy",
        "poddisruptionbudgets",
        &["get", "list", "watch", "create", "patch", "delete"],
        Scope::Watched,
    ),
    // controller.rs .watches(Api<Secret>); reconcile.rs reads referenced ones.
    ("", "secrets", &["get", "list", "watch"], Scope::Watched),
    // The autoscaler lists live forwarder pods.
    ("", "pods", &["list"], Scope::Watched),
    // kube-runtime's Recorder: create, then patch a repeated series.
    (
        "events.k8s.io",
        "events",
        &["create", "patch"],
        Scope::Watched,
    ),
    // kube-lease-manager: get, create when missing, patch to renew/release.
    (
        "coordination.k8s.io",
        "leases",
        &["get", "create", "patch"],
        Scope::Own,
    ),
];

/// Granted only with `rbac.prometheusRules=true`.
const PROMETHEUS_RULE_CALLS: (&str, &str, &[&str], Scope) = (
    "monitoring.coreos.com",
    "prometheusrules",
    &["create", "patch"],
    Scope::Watched,
);

/// Types the operator may build an `Api` for, and their (group, resource).
const API_TYPES: &[(&str, &str, &str)] = &[
    ("ModelForwarder", "llm.forwarder.dev", "modelforwarders"),
    ("Deployment", "apps", "deployments"),
    ("ConfigMap", "", "configmaps"),
    ("Service", "", "services"),
    ("PodDisruptionBudget", "policy", "poddisruptionbudgets"),
    ("Secret", "", "secrets"),
    ("Pod", "", "pods"),
    ("Event", "events.k8s.io", "events"),
    ("Lease", "coordination.k8s.io", "leases"),
    ("PrometheusRule", "monitoring.coreos.com", "prometheusrules"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    root().join("charts/modelforwarder-operator")
}

fn helm() -> PathBuf {
    if let Some(h) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let local = root().join(".tools/bin/helm");
    assert!(
        local.is_file(),
        "helm is missing: install it with `bash charts/install-helm.sh` \
         (./scripts/test.sh does), or set HELM=/path/to/helm"
    );
    local
}

/// `helm template` with extra `--set`/`-f` arguments, as YAML documents.
fn render(args: &[&str]) -> Vec<Value> {
    let out = Command::new(helm())
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", RELEASE_NS])
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm template {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize as _;

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    s(v, path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {path:?} in {v:?}"))
}

fn kind(v: &Value) -> &str {
    str_at(v, &["kind"])
}

fn of_kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = of_kind(docs, k);
    assert_eq!(found.len(), 1, "expected one {k}, found {}", found.len());
    found[0]
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_sequence)
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A granted permission: (where, group, resource, verb, resourceNames).
type Grant = (String, String, String, String, Vec<String>);

/// Expands every Role/ClusterRole bound to the operator's ServiceAccount
/// into single grants. `where` is "*" for a ClusterRole bound cluster-wide,
/// else the Role's namespace.
fn grants(docs: &[Value]) -> BTreeSet<Grant> {
    let sa = one(docs, "ServiceAccount");
    let sa_name = str_at(sa, &["metadata", "name"]);
    let mut out = BTreeSet::new();
    for binding in docs
        .iter()
        .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
    {
        let subjects = s(binding, &["subjects"])
            .and_then(Value::as_sequence)
            .expect("subjects");
        let binds_us = subjects.iter().any(|sub| {
            str_at(sub, &["kind"]) == "ServiceAccount"
                && str_at(sub, &["name"]) == sa_name
                && str_at(sub, &["namespace"]) == RELEASE_NS
        });
        assert!(binds_us, "a binding for someone else: {binding:?}");
        let role_kind = str_at(binding, &["roleRef", "kind"]);
        let role_name = str_at(binding, &["roleRef", "name"]);
        let binding_ns = s(binding, &["metadata", "namespace"]).and_then(Value::as_str);
        let role = docs
            .iter()
            .find(|d| kind(d) == role_kind && str_at(d, &["metadata", "name"]) == role_name)
            .unwrap_or_else(|| panic!("binding to a missing {role_kind} {role_name}"));
        let place = match (kind(binding), role_kind) {
            ("ClusterRoleBinding", "ClusterRole") => "*".to_string(),
            ("RoleBinding", _) => binding_ns.expect("RoleBinding namespace").to_string(),
            other => panic!("unexpected binding {other:?}"),
        };
        if role_kind == "Role" {
            assert_eq!(
                s(role, &["metadata", "namespace"]).and_then(Value::as_str),
                Some(place.as_str()),
                "Role and RoleBinding in different namespaces"
            );
        }
        for rule in s(role, &["rules"])
            .and_then(Value::as_sequence)
            .expect("rules")
        {
            assert!(
                s(rule, &["nonResourceURLs"]).is_none(),
                "non-resource URLs granted: {rule:?}"
            );
            let names = strings(s(rule, &["resourceNames"]));
            for g in strings(s(rule, &["apiGroups"])) {
                for r in strings(s(rule, &["resources"])) {
                    for v in strings(s(rule, &["verbs"])) {
                        assert!(
                            g != "*" && r != "*" && v != "*",
                            "wildcard in RBAC: {rule:?}"
                        );
                        out.insert((place.clone(), g.clone(), r.clone(), v, names.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Checks that the rendered RBAC grants every call in `calls` at its scope
/// and nothing else. `watched`: "*" (cluster-wide) or the watched namespace.
fn assert_exact_rbac(docs: &[Value], calls: &[(&str, &str, &[&str], Scope)], watched: &str) {
    let granted = grants(docs);
    let mut needed: BTreeMap<(String, String, String, String), ()> = BTreeMap::new();
    for (group, resource, verbs, scope) in calls {
        let place = match scope {
            Scope::Watched => watched,
            Scope::Own => RELEASE_NS,
        };
        for verb in *verbs {
            needed.insert(
                (
                    place.to_string(),
                    group.to_string(),
                    resource.to_string(),
                    verb.to_string(),
                ),
                (),
            );
        }
    }
    // Everything needed is granted (a grant limited to resourceNames counts
    // only for the leader Lease, whose name the chart knows).
    for (place, group, resource, verb) in needed.keys() {
        let ok = granted.iter().any(|(p, g, r, v, names)| {
            p == place
                && g == group
                && r == resource
                && v == verb
                && (names.is_empty() || (resource == "leases" && names == &[LEASE.to_string()]))
        });
        assert!(
            ok,
            "missing RBAC: {verb} {group}/{resource} in {place}\ngranted: {granted:#?}"
        );
    }
    // Nothing beyond.
    for (p, g, r, v, _) in &granted {
        assert!(
            needed.contains_key(&(p.clone(), g.clone(), r.clone(), v.clone())),
            "RBAC grants more than the operator uses: {v} {g}/{r} in {p}"
        );
    }
}

#[test]
fn rbac_cluster_wide_is_exactly_what_the_operator_calls() {
    let docs = render(&[]);
    assert!(of_kind(&docs, "ClusterRole").len() == 1);
    assert_exact_rbac(&docs, OPERATOR_CALLS, "*");
}

#[test]
fn rbac_single_namespace_uses_roles_only() {
    let docs = render(&["--set", "watchNamespace=ai"]);
    assert!(
        of_kind(&docs, "ClusterRole").is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty(),
        "namespaced mode must not create cluster-wide RBAC"
    );
    assert_exact_rbac(&docs, OPERATOR_CALLS, "ai");
    let args = container_args(&docs);
    assert!(args.contains(&"--namespace=ai".to_string()), "{args:?}");
}

#[test]
fn rbac_prometheus_rules_only_when_enabled() {
    let docs = render(&["--set", "rbac.prometheusRules=true"]);
    let mut calls = OPERATOR_CALLS.to_vec();
    calls.push(PROMETHEUS_RULE_CALLS);
    assert_exact_rbac(&docs, &calls, "*");
}

#[test]
fn rbac_without_leader_election_has_no_lease_role() {
    let docs = render(&["--set", "leaderElection.enabled=false"]);
    let calls: Vec<_> = OPERATOR_CALLS
        .iter()
        .copied()
        .filter(|c| c.3 != Scope::Own)
        .collect();
    assert_exact_rbac(&docs, &calls, "*");
    let args = container_args(&docs);
    assert!(args.contains(&"--leader-election=false".to_string()));
}

/// Every `Api<T>` the operator builds (in operator/src, any depth) is a type
/// this test knows, and its resource is in OPERATOR_CALLS: a new API call
/// without RBAC fails here, not in a cluster.
#[test]
fn operator_source_calls_only_what_the_rbac_table_lists() {
    let mut files = Vec::new();
    let mut dirs = vec![root().join("operator/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("operator/src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut used = BTreeSet::new();
    let mut dynamic = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("source");
        for marker in ["Api<", "Api::<", "scoped::<"] {
            for (i, _) in text.match_indices(marker) {
                let rest = &text[i + marker.len()..];
                let ty: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '<' || *c == ':')
                    .collect();
                // DeserializeGuard<ModelForwarder> → ModelForwarder;
                // k8s_openapi::...::Pod → Pod.
                let ty = ty
                    .trim_start_matches("DeserializeGuard<")
                    .rsplit("::")
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches('<')
                    .to_string();
                if ty.is_empty() || ty == "K" {
                    continue; // generic helpers: their callers name the type
                }
                if ty == "DynamicObject" {
                    dynamic.push(file.display().to_string());
                    continue;
                }
                used.insert((ty, file.display().to_string()));
            }
        }
        // The scale subresource needs its own rule (deployments/scale).
        for m in ["patch_scale", "replace_scale", "get_scale"] {
            assert!(
                !text.contains(m),
                "{} uses {m}: add deployments/scale to the chart's RBAC and OPERATOR_CALLS",
                file.display()
            );
        }
    }
    for (ty, file) in &used {
        let (_, group, resource) =
            API_TYPES
                .iter()
                .find(|(t, _, _)| t == ty)
                .unwrap_or_else(|| {
                    panic!(
                        "{file} builds Api<{ty}>: add its (group, resource) to API_TYPES, \
                     the verbs to OPERATOR_CALLS and the chart's templates/rbac.yaml"
                    )
                });
        let listed = OPERATOR_CALLS
            .iter()
            .chain(std::iter::once(&PROMETHEUS_RULE_CALLS))
            .any(|(g, r, _, _)| g == group && r == resource);
        assert!(
            listed,
            "{file} calls {group}/{resource}, which OPERATOR_CALLS does not list"
        );
    }
    // DynamicObject APIs (e.g. PrometheusRule without typed structs) must be
    // the prometheus-operator kinds, the only untyped ones the RBAC allows.
    for file in dynamic {
        let text = std::fs::read_to_string(&file).expect("source");
        assert!(
            text.contains("PrometheusRule") || text.contains("prometheusrules"),
            "{file} uses a DynamicObject Api for something other than PrometheusRules: \
             list it in OPERATOR_CALLS and the chart's RBAC"
        );
    }
    // The controller's watches are the minimum: these must be found.
    for ty in [
        "ModelForwarder",
        "Deployment",
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "Secret",
    ] {
        assert!(
            used.iter().any(|(t, _)| t == ty),
            "operator/src no longer builds Api<{ty}>: drop its RBAC (and this line)"
        );
    }
}

fn deployment(docs: &[Value]) -> &Value {
    one(docs, "Deployment")
}

fn container(docs: &[Value]) -> &Value {
    let containers = s(
        deployment(docs),
        &["spec", "template", "spec", "containers"],
    )
    .and_then(Value::as_sequence)
    .expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn container_args(docs: &[Value]) -> Vec<String> {
    strings(s(container(docs), &["args"]))
}

#[test]
fn operator_pod_is_non_root_read_only_probed_and_bounded() {
    let docs = render(&[]);
    let pod = s(deployment(&docs), &["spec", "template", "spec"]).expect("pod spec");
    let c = container(&docs);
    assert_eq!(
        s(pod, &["securityContext", "runAsNonRoot"]),
        Some(&Value::Bool(true))
    );
    assert!(s(pod, &["securityContext", "runAsUser"]).and_then(Value::as_u64) > Some(0));
    assert_eq!(
        str_at(pod, &["securityContext", "seccompProfile", "type"]),
        "RuntimeDefault"
    );
    assert_eq!(
        s(c, &["securityContext", "readOnlyRootFilesystem"]),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        s(c, &["securityContext", "allowPrivilegeEscalation"]),
        Some(&Value::Bool(false))
    );
    assert_eq!(
        strings(s(c, &["securityContext", "capabilities", "drop"])),
        ["ALL"]
    );
    assert!(s(c, &["resources", "requests", "memory"]).is_some());
    assert!(s(c, &["resources", "limits", "memory"]).is_some());
    assert_eq!(str_at(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(
        str_at(c, &["readinessProbe", "httpGet", "path"]),
        "/healthz"
    );
    assert_eq!(s(pod, &["enableServiceLinks"]), Some(&Value::Bool(false)));

    let args = container_args(&docs);
    assert!(
        args.contains(&"--leader-election=true".to_string()),
        "{args:?}"
    );
    assert!(args.contains(&format!("--lease-name={LEASE}")), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );
    let env: Vec<String> = s(c, &["env"])
        .and_then(Value::as_sequence)
        .expect("env")
        .iter()
        .map(|e| str_at(e, &["name"]).to_string())
        .collect();
    for want in ["POD_NAMESPACE", "POD_NAME"] {
        assert!(env.contains(&want.to_string()), "no {want} in {env:?}");
    }
}

#[test]
fn image_versions_follow_the_crate_version() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        str_at(&chart, &["appVersion"]),
        version,
        "Chart.yaml appVersion"
    );
    assert_eq!(str_at(&chart, &["version"]), version, "Chart.yaml version");
    let docs = render(&[]);
    let args = container_args(&docs);
    let flag = format!("--forwarder-image={}", operator::DEFAULT_FORWARDER_IMAGE);
    assert!(
        args.contains(&flag),
        "the chart's default forwarder image differs from the operator's: {args:?}"
    );
    assert_eq!(
        str_at(container(&docs), &["image"]),
        format!("ghcr.io/modelforwarder/operator:{version}")
    );
}

#[test]
fn one_port_serves_metrics_health_and_the_alert_webhook() {
    let docs = render(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "service.port=9443",
    ]);
    let c = container(&docs);
    let ports = s(c, &["ports"])
        .and_then(Value::as_sequence)
        .expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(str_at(&ports[0], &["name"]), "http");
    assert_eq!(
        s(&ports[0], &["containerPort"]).and_then(Value::as_u64),
        Some(9443)
    );
    assert!(container_args(&docs).contains(&"--metrics-addr=0.0.0.0:9443".to_string()));
    let svc = one(&docs, "Service");
    let sp = &s(svc, &["spec", "ports"])
        .and_then(Value::as_sequence)
        .unwrap()[0];
    assert_eq!(str_at(sp, &["targetPort"]), "http");
    // The Service selects exactly the operator pods.
    assert_eq!(
        s(svc, &["spec", "selector"]),
        s(deployment(&docs), &["spec", "selector", "matchLabels"])
    );
    let np = one(&docs, "NetworkPolicy");
    let ingress = s(np, &["spec", "ingress"])
        .and_then(Value::as_sequence)
        .unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(str_at(&ingress[0]["ports"][0], &["port"]), "http");
    assert_eq!(
        s(np, &["spec", "podSelector", "matchLabels"]),
        s(deployment(&docs), &["spec", "selector", "matchLabels"])
    );
}

#[test]
fn optional_parts_are_off_by_default_and_render_when_on() {
    let docs = render(&[]);
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    for k in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
        "PodDisruptionBudget",
    ] {
        assert!(!kinds.contains(k), "{k} rendered by default");
    }
    let all_on = chart_dir().join("ci/all-on-values.yaml");
    let docs = render(&["-f", all_on.to_str().unwrap()]);
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    for k in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(k), "{k} not rendered with every part on");
    }
}

#[test]
fn forwarder_pod_monitor_selects_the_operators_pods_and_maps_the_instance_label() {
    let docs = render(&["--set", "metrics.forwarderPodMonitor.enabled=true"]);
    let pm = one(&docs, "PodMonitor");
    let selector = s(pm, &["spec", "selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .expect("matchLabels");
    // Every selected label is one the operator puts on every forwarder pod.
    let pod_labels = operator::render::labels::pod("bot", &BTreeMap::new());
    for (k, v) in selector {
        let (k, v) = (k.as_str().unwrap(), v.as_str().unwrap());
        assert_eq!(
            pod_labels.get(k).map(String::as_str),
            Some(v),
            "PodMonitor selects {k}={v}, which forwarder pods do not carry"
        );
    }
    assert_eq!(
        s(pm, &["spec", "namespaceSelector", "any"]),
        Some(&Value::Bool(true))
    );
    let ep = &s(pm, &["spec", "podMetricsEndpoints"])
        .and_then(Value::as_sequence)
        .unwrap()[0];
    assert_eq!(str_at(ep, &["port"]), "http");
    assert_eq!(str_at(ep, &["path"]), "/metrics");
    let relabel = &s(ep, &["relabelings"])
        .and_then(Value::as_sequence)
        .unwrap()[0];
    assert_eq!(
        strings(s(relabel, &["sourceLabels"])),
        ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
    );
    assert_eq!(
        str_at(relabel, &["targetLabel"]),
        "app_kubernetes_io_instance"
    );

    // In single-namespace mode only that namespace is scraped.
    let docs = render(&[
        "--set",
        "metrics.forwarderPodMonitor.enabled=true",
        "--set",
        "watchNamespace=ai",
    ]);
    let pm = one(&docs, "PodMonitor");
    assert_eq!(
        strings(s(pm, &["spec", "namespaceSelector", "matchNames"])),
        ["ai"]
    );
}

/// Every metric a rule or panel queries is one the forwarder (or operator)
/// exports, per the metrics contract.
fn assert_known_metrics(expr: &str, origin: &str) {
    const KNOWN: &[&str] = &[
        "forwarder_requests_total",
        "forwarder_request_duration_seconds_bucket",
        "forwarder_upstream_requests_total",
        "forwarder_upstream_duration_seconds_bucket",
        "forwarder_own_duration_seconds_bucket",
        "forwarder_time_to_first_token_seconds_bucket",
        "forwarder_inflight_requests",
        "modelforwarder_operator_reconcile_errors_total",
        "modelforwarder_operator_leader",
        "kube_deployment_spec_replicas",
    ];
    let mut i = 0;
    let b = expr.as_bytes();
    while i < b.len() {
        if expr[i..].starts_with("forwarder_")
            || expr[i..].starts_with("modelforwarder_operator_")
            || expr[i..].starts_with("kube_")
        {
            // Skip recording-rule names (modelforwarder:...) and label names.
            let prev = if i > 0 { b[i - 1] } else { b' ' };
            let word: String = expr[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !(prev.is_ascii_alphanumeric() || prev == b'_' || prev == b':') {
                assert!(
                    KNOWN.contains(&word.as_str()),
                    "{origin} queries {word}, not in the metrics contract"
                );
            }
            i += word.len().max(1);
        } else {
            i += 1;
        }
    }
    // Balanced brackets: a cheap guard against template slips.
    for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
        assert_eq!(
            expr.matches(open).count(),
            expr.matches(close).count(),
            "{origin}: unbalanced {open}{close} in {expr}"
        );
    }
}

#[test]
fn prometheus_rule_and_dashboard_query_the_metrics_contract() {
    let all_on = chart_dir().join("ci/all-on-values.yaml");
    let docs = render(&["-f", all_on.to_str().unwrap()]);
    let rule = one(&docs, "PrometheusRule");
    let mut alerts = BTreeSet::new();
    for group in s(rule, &["spec", "groups"])
        .and_then(Value::as_sequence)
        .unwrap()
    {
        for r in s(group, &["rules"]).and_then(Value::as_sequence).unwrap() {
            let expr = str_at(r, &["expr"]);
            let name = s(r, &["alert"])
                .or_else(|| s(r, &["record"]))
                .and_then(Value::as_str)
                .unwrap();
            assert_known_metrics(expr, name);
            if let Some(a) = s(r, &["alert"]).and_then(Value::as_str) {
                alerts.insert(a.to_string());
                assert!(s(r, &["labels", "severity"]).is_some(), "{a}: no severity");
                // The SLO alerts keep the labels that name the ModelForwarder
                // (the operator's webhook reads them).
                if a.starts_with("ModelForwarderHigh") {
                    assert!(expr.contains("modelforwarder:"), "{a}: {expr}");
                }
            }
        }
    }
    for a in [
        "ModelForwarderHighP99Latency",
        "ModelForwarderHighErrorRate",
    ] {
        assert!(alerts.contains(a), "missing alert {a}");
    }

    let cm = one(&docs, "ConfigMap");
    let json = str_at(cm, &["data", "modelforwarder.json"]);
    let dash: serde_json::Value = serde_json::from_str(json).expect("dashboard is JSON");
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Requests per second",
        "P99 latency",
        "Error rate (5xx share)",
        "Replicas",
        "Forwarder own time P99",
        "Time to first token P99",
    ] {
        assert!(titles.contains(&want), "dashboard lacks {want}: {titles:?}");
    }
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            assert_known_metrics(t["expr"].as_str().unwrap(), p["title"].as_str().unwrap());
        }
    }
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let committed = std::fs::read_to_string(root().join("crds/modelforwarder.yaml")).unwrap();
    let in_chart = std::fs::read_to_string(chart_dir().join("crds/modelforwarder.yaml")).unwrap();
    assert!(
        committed == in_chart,
        "charts/modelforwarder-operator/crds/modelforwarder.yaml differs from crds/modelforwarder.yaml: \
         cp crds/modelforwarder.yaml charts/modelforwarder-operator/crds/"
    );
}

#[test]
fn replicas_above_one_require_leader_election() {
    let out = Command::new(helm())
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args([
            "--set",
            "replicaCount=2",
            "--set",
            "leaderElection.enabled=false",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaderElection"));
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Renders the chart with `values` (as the GitOps tools would) under the
/// chart's strict schema.
fn render_with_values(values: &Value, origin: &str) -> Vec<Value> {
    let file = std::env::temp_dir().join(format!(
        "mf-chart-values-{}-{}.yaml",
        std::process::id(),
        origin.replace(['/', ' '], "-")
    ));
    std::fs::write(&file, serde_yaml::to_string(values).unwrap()).unwrap();
    let docs = render(&["-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    docs
}

#[test]
fn gitops_examples_use_real_paths_and_values_the_chart_accepts() {
    let gitops = root().join("examples/gitops");
    // Argo CD: chart path exists, inline values pass the schema.
    let op = &yaml_docs(&gitops.join("argocd/operator.yaml"))[0];
    let path = str_at(op, &["spec", "source", "path"]);
    assert!(root().join(path).join("Chart.yaml").is_file(), "{path}");
    let docs = render_with_values(
        s(op, &["spec", "source", "helm", "valuesObject"]).unwrap(),
        "argocd",
    );
    assert_eq!(str_at(&docs[0], &["metadata", "namespace"]), RELEASE_NS);
    let wl = &yaml_docs(&gitops.join("argocd/workloads.yaml"))[0];
    let path = str_at(wl, &["spec", "source", "path"]);
    assert!(
        root().join(path).join("kustomization.yaml").is_file(),
        "{path}"
    );

    // Flux: chart path exists, values pass the schema, CRDs upgraded.
    let hr = &yaml_docs(&gitops.join("flux/operator/helmrelease.yaml"))[0];
    let chart = str_at(hr, &["spec", "chart", "spec", "chart"]);
    assert!(root().join(chart).join("Chart.yaml").is_file(), "{chart}");
    assert_eq!(str_at(hr, &["spec", "upgrade", "crds"]), "CreateReplace");
    render_with_values(s(hr, &["spec", "values"]).unwrap(), "flux");
    for k in yaml_docs(&gitops.join("flux/clusters.yaml"))
        .iter()
        .filter(|d| kind(d) == "Kustomization")
    {
        let p = str_at(k, &["spec", "path"]).trim_start_matches("./");
        assert!(root().join(p).join("kustomization.yaml").is_file(), "{p}");
    }

    // Every file a kustomization lists exists; ModelForwarders parse as the
    // operator's type.
    for dir in ["workloads", "flux/operator"] {
        let k = &yaml_docs(&gitops.join(dir).join("kustomization.yaml"))[0];
        for r in strings(s(k, &["resources"])) {
            let file = gitops.join(dir).join(&r);
            for doc in yaml_docs(&file) {
                if kind(&doc) == "ModelForwarder" {
                    let json = serde_json::to_value(&doc).unwrap();
                    serde_json::from_value::<operator::crd::ModelForwarder>(json)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                }
            }
        }
    }
}

/// The `operator` binary next to this test's (target/<profile>/operator);
/// `cargo test --workspace` builds it for the operator's own tests.
fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join(format!("operator{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p operator --bin operator` \
         (`cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// The operator accepts every flag and value the chart renders: started with
/// them and no cluster, it gets past argument parsing (clap exits 2 on a bad
/// flag) and fails only at connecting to Kubernetes.
#[test]
fn the_operator_accepts_the_arguments_the_chart_renders() {
    let bin = operator_binary();
    let all_on = chart_dir().join("ci/all-on-values.yaml");
    let namespaced = chart_dir().join("ci/namespaced-values.yaml");
    let sets: [Vec<&str>; 4] = [
        vec![],
        vec!["-f", all_on.to_str().unwrap()],
        vec!["-f", namespaced.to_str().unwrap()],
        vec![
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "logFormat=text",
        ],
    ];
    let home = std::env::temp_dir().join(format!("mf-chart-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    for set in sets {
        let docs = render(&set);
        let args: Vec<String> = container_args(&docs)
            .into_iter()
            // Port 0: never collide with anything listening on this machine.
            .map(|a| {
                if a.starts_with("--metrics-addr=") {
                    "--metrics-addr=127.0.0.1:0".into()
                } else {
                    a
                }
            })
            .collect();
        let out = Command::new(&bin)
            .args(&args)
            .env_clear()
            .env("HOME", &home)
            .env("KUBECONFIG", home.join("no-such-kubeconfig"))
            .env("POD_NAMESPACE", RELEASE_NS)
            .env("POD_NAME", "mf-operator-0")
            .output()
            .expect("running the operator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_ne!(
            out.status.code(),
            Some(2),
            "the operator refused the chart's arguments {args:?}:\n{stderr}"
        );
        assert!(
            !out.status.success(),
            "the operator ran without a cluster?\n{stdout}{stderr}"
        );
        assert!(
            format!("{stdout}{stderr}").contains("Kubernetes"),
            "expected a Kubernetes connection error for {args:?}, got:\n{stdout}{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&home);
}

/// A Deployment's selector is immutable: it must not carry anything that
/// changes between chart versions, or `helm upgrade` fails.
#[test]
fn selectors_survive_upgrades() {
    let docs = render(&[
        "-f",
        chart_dir().join("ci/all-on-values.yaml").to_str().unwrap(),
    ]);
    let selector = s(deployment(&docs), &["spec", "selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .expect("selector");
    for (k, _) in selector {
        let k = k.as_str().unwrap();
        assert!(
            !matches!(k, "app.kubernetes.io/version" | "helm.sh/chart"),
            "the Deployment selector carries {k}, which changes on upgrade"
        );
    }
    let template_labels = s(
        deployment(&docs),
        &["spec", "template", "metadata", "labels"],
    )
    .and_then(Value::as_mapping)
    .expect("pod labels");
    for (k, v) in selector {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "pod template lacks selector label {k:?}"
        );
    }
    // The PDB selects the same pods.
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(
        s(pdb, &["spec", "selector", "matchLabels"]).and_then(Value::as_mapping),
        Some(selector)
    );
}

// --- the operator's real requests against the chart's RBAC ------------------

/// One request the operator made: (API group, resource[/subresource], verb,
/// namespace, object name or "").
type Call = (String, String, String, String, String);

/// Maps a Kubernetes API request to the RBAC terms that authorize it.
fn classify(method: &str, path: &str, query: &str) -> Call {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => panic!("not an API path: {path}"),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        rest => ("*".to_string(), rest),
    };
    let (resource, name) = match rest {
        [res] => (res.to_string(), ""),
        [res, name] => (res.to_string(), *name),
        [res, name, sub] => (format!("{res}/{sub}"), *name),
        _ => panic!("unexpected API path: {path}"),
    };
    let named = !name.is_empty();
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => panic!("unexpected method {method} {path}"),
    };
    (group, resource, verb.to_string(), ns, name.to_string())
}

/// A permissive fake API server: named reads find Secrets (with any key) and
/// whatever `existing` holds, nothing else; writes are echoed; every request
/// is recorded.
async fn fake_api_server(
    mut handle: tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >,
    existing: Vec<(String, serde_json::Value)>,
    resource: serde_json::Value,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Call>>>,
) {
    use serde_json::json;
    let mut stored: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    while let Some((req, send)) = handle.next_request().await {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let body = req.into_body().collect_bytes().await.unwrap_or_default();
        let call = classify(&method, &path, &query);
        seen.lock().unwrap().push(call.clone());
        let (status, reply) = match call.2.as_str() {
            "get" if call.1 == "secrets" => (
                200,
                json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": path.rsplit('/').next(), "namespace": call.3,
                                    "resourceVersion": "7"},
                       "data": {"primary": "eA==", "web": "eA=="}}),
            ),
            "get" => match existing.iter().find(|(p, _)| *p == path) {
                Some((_, obj)) => (200, obj.clone()),
                None if stored.contains_key(&path) => (200, stored[&path].clone()),
                None => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            },
            "list" if existing.iter().any(|(p, _)| *p == path) => (
                200,
                existing.iter().find(|(p, _)| *p == path).unwrap().1.clone(),
            ),
            "list" | "watch" => (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
            ),
            "delete" => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
            ),
            // A status write answers with the whole resource.
            _ if call.1 == "modelforwarders/status" => {
                let written: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
                let mut obj = resource.clone();
                obj["status"] = written["status"].clone();
                (200, obj)
            }
            _ => {
                let mut obj: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
                if obj.get("metadata").is_some() {
                    obj["metadata"]["resourceVersion"] = json!("8");
                    obj["metadata"]["uid"] = json!("00000000-0000-4000-8000-0000000000ff");
                }
                // Later reads find what was written.
                let key = match (call.2.as_str(), obj["metadata"]["name"].as_str()) {
                    ("create", Some(name)) => format!("{path}/{name}"),
                    _ => path.clone(),
                };
                stored.insert(key, obj.clone());
                (200, obj)
            }
        };
        let response = http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(
                serde_json::to_vec(&reply).unwrap(),
            ))
            .unwrap();
        send.send_response(response);
    }
}

/// Runs the operator's reconciler once on `mf` against the fake server and
/// returns every request it made.
async fn operator_calls(
    mf: serde_json::Value,
    existing: Vec<(String, serde_json::Value)>,
) -> Vec<Call> {
    use kube::runtime::events::{Recorder, Reporter};
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "default");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = tokio::spawn(fake_api_server(handle, existing, mf.clone(), seen.clone()));
    let ctx = std::sync::Arc::new(operator::reconcile::Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: Some("chart-test".into()),
            },
        ),
        default_image: operator::DEFAULT_FORWARDER_IMAGE.into(),
        metrics: operator::telemetry::Metrics::new().expect("metrics"),
    });
    let mf: operator::crd::ModelForwarder = serde_json::from_value(mf).expect("resource");
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        operator::reconcile::reconcile(
            std::sync::Arc::new(kube::core::DeserializeGuard(Ok(mf))),
            ctx.clone(),
        ),
    )
    .await
    .expect("reconcile finishes");
    assert!(result.is_ok(), "reconcile failed: {:?}", result.err());
    drop(ctx);
    server.abort();
    let calls = seen.lock().unwrap().clone();
    calls
}

fn assert_calls_granted(calls: &[Call], docs: &[Value]) {
    let granted = grants(docs);
    for (group, resource, verb, ns, name) in calls {
        let ok = granted.iter().any(|(p, g, r, v, names)| {
            (p == "*" || p == ns)
                && g == group
                && r == resource
                && v == verb
                && (names.is_empty() || names.contains(name))
        });
        assert!(
            ok,
            "the operator made a call the chart does not allow: {verb} {group}/{resource} in {ns}"
        );
    }
}

/// The reconciler's real requests, for a new resource (every object
/// applied, Events, status) and for one whose PDB must go (min back to 1),
/// are each allowed by the chart's RBAC, cluster-wide and namespaced.
#[tokio::test]
async fn every_request_the_reconciler_makes_is_granted_by_the_chart() {
    use serde_json::json;
    let uid = "0b5e7f5c-0000-4000-8000-00000000c4a7";
    let resource = |min: i32| {
        json!({
            "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
            "metadata": {"name": "bot", "namespace": "ai", "uid": uid, "generation": 2, "resourceVersion": "5"},
            "spec": {
                "protocols": ["http", "websocket", "grpc"],
                "upstreams": [{"name": "primary", "provider": "openai", "baseUrl": "https://llm.internal/v1",
                               "models": ["qwen-max"], "apiKeySecretRef": {"name": "llm-keys", "key": "primary"}}],
                "auth": {"apiKeysSecretRef": {"name": "clients"}},
                "replicas": {"min": min, "max": 5}
            }
        })
    };
    let mut calls = operator_calls(resource(2), vec![]).await;
    // An existing PDB of this resource, now that min is 1: deleted.
    let pdb = json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "bot", "namespace": "ai", "resourceVersion": "3",
                     "labels": operator::render::labels::common("bot"),
                     "ownerReferences": [{"apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
                                          "name": "bot", "uid": uid, "controller": true}]},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": operator::render::labels::selector("bot")}}
    });
    calls.extend(
        operator_calls(
            resource(1),
            vec![(
                "/apis/policy/v1/namespaces/ai/poddisruptionbudgets/bot".into(),
                pdb,
            )],
        )
        .await,
    );
    let kinds: BTreeSet<(String, String, String)> = calls
        .iter()
        .map(|(g, r, v, _, _)| (g.clone(), r.clone(), v.clone()))
        .collect();
    eprintln!("reconciler requests: {kinds:?}");
    // Not vacuous: the writes happened.
    for want in [
        ("apps", "deployments", "patch"),
        ("", "configmaps", "patch"),
        ("", "services", "patch"),
        ("policy", "poddisruptionbudgets", "patch"),
        ("policy", "poddisruptionbudgets", "delete"),
        ("", "secrets", "get"),
        ("llm.forwarder.dev", "modelforwarders/status", "patch"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(
            kinds.contains(&(want.0.to_string(), want.1.to_string(), want.2.to_string())),
            "expected the reconciler to {} {}/{}; it made {kinds:?}",
            want.2,
            want.0,
            want.1
        );
    }
    assert_calls_granted(&calls, &render(&[]));
    assert_calls_granted(&calls, &render(&["--set", "watchNamespace=ai"]));
    // And every one is in the table the exact-RBAC tests use.
    for (g, r, v, _, _) in &calls {
        assert!(
            OPERATOR_CALLS
                .iter()
                .any(|(cg, cr, cv, _)| cg == g && cr == r && cv.contains(&v.as_str())),
            "{v} {g}/{r} is not in OPERATOR_CALLS"
        );
    }
}

/// The controller's lists and watches (the resources, owned objects,
/// Secrets), cluster-wide and scoped to one namespace, are each allowed by
/// the chart rendered for that mode.
#[tokio::test]
async fn every_list_and_watch_the_controller_opens_is_granted_by_the_chart() {
    use kube::runtime::events::{Recorder, Reporter};
    for (scope, set) in [
        (None, vec![]),
        (Some("ai"), vec!["--set", "watchNamespace=ai"]),
    ] {
        let (svc, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(svc, "default");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = tokio::spawn(fake_api_server(
            handle,
            vec![],
            serde_json::json!({}),
            seen.clone(),
        ));
        let ctx = std::sync::Arc::new(operator::reconcile::Context {
            client: client.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "modelforwarder-operator".into(),
                    instance: Some("chart-test".into()),
                },
            ),
            default_image: operator::DEFAULT_FORWARDER_IMAGE.into(),
            metrics: operator::telemetry::Metrics::new().expect("metrics"),
        });
        let controller = tokio::spawn(operator::controller::run(
            client,
            scope.map(str::to_string),
            ctx,
        ));
        // Long enough for every reflector's first list and watch.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        controller.abort();
        server.abort();
        let calls = seen.lock().unwrap().clone();
        let opened: BTreeSet<(String, String, String)> = calls
            .iter()
            .map(|(g, r, v, _, _)| (g.clone(), r.clone(), v.clone()))
            .collect();
        eprintln!("controller requests ({scope:?}): {opened:?}");
        for (g, r) in [
            ("llm.forwarder.dev", "modelforwarders"),
            ("apps", "deployments"),
            ("", "configmaps"),
            ("", "services"),
            ("policy", "poddisruptionbudgets"),
            ("", "secrets"),
        ] {
            assert!(
                opened.contains(&(g.to_string(), r.to_string(), "list".to_string())),
                "the controller ({scope:?}) did not list {g}/{r}: {opened:?}"
            );
        }
        let expected_ns = scope.unwrap_or("*");
        for (g, r, v, ns, _) in &calls {
            if v == "list" || v == "watch" {
                assert_eq!(ns, expected_ns, "{v} {g}/{r} outside the watched scope");
            }
        }
        assert_calls_granted(&calls, &render(&set));
    }
}

/// Leader election's requests on its Lease (in the operator's namespace,
/// under the chart's lease name) are allowed by the chart's Role, whose
/// get/patch are limited to that one name.
#[tokio::test]
async fn leader_election_requests_are_granted_by_the_chart() {
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "default");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = tokio::spawn(fake_api_server(
        handle,
        vec![],
        serde_json::json!({}),
        seen.clone(),
    ));
    let cfg = operator::leader::LeaderConfig {
        lease_name: LEASE.into(),
        namespace: RELEASE_NS.into(),
        identity: "mf-operator-0".into(),
        duration_secs: 15,
        grace_secs: 5,
    };
    let election = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        operator::leader::Election::start(client, &cfg),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    drop(election);
    server.abort();
    let calls = seen.lock().unwrap().clone();
    let kinds: BTreeSet<(&str, &str)> =
        calls.iter().map(|c| (c.2.as_str(), c.4.as_str())).collect();
    eprintln!("leader election requests (verb, name): {kinds:?}");
    for verb in ["get", "create", "patch"] {
        assert!(
            kinds.iter().any(|(v, _)| *v == verb),
            "leader election made no {verb} request: {kinds:?}"
        );
    }
    assert!(
        calls.iter().any(|c| c.1 == "leases"),
        "no Lease request was made"
    );
    for c in &calls {
        assert_eq!(
            (c.0.as_str(), c.1.as_str()),
            ("coordination.k8s.io", "leases")
        );
        assert_eq!(c.3, RELEASE_NS);
    }
    assert_calls_granted(&calls, &render(&[]));
    assert_calls_granted(&calls, &render(&["--set", "watchNamespace=ai"]));
}

struct BusyForwarder;

#[async_trait::async_trait]
impl operator::autoscale::MetricsSource for BusyForwarder {
    async fn read(
        &self,
        _target: &operator::autoscale::metrics::Target,
    ) -> Result<operator::autoscale::policy::Observed, operator::autoscale::metrics::MetricsError>
    {
        Ok(operator::autoscale::policy::Observed {
            qps: Some(400.0),
            p99_ms: Some(900.0),
            error_rate: Some(0.0),
            inflight: Some(40.0),
            upstream_p99_ms: Some(100.0),
            reporting: 2,
            ..Default::default()
        })
    }
}

/// One autoscaler evaluation of a busy forwarder (it scales up: reads the
/// Deployment and the live pods, patches replicas, writes status, records
/// an Event): every request it makes is granted by the chart.
#[tokio::test]
async fn every_request_the_autoscaler_makes_is_granted_by_the_chart() {
    use kube::runtime::events::{Recorder, Reporter};
    use serde_json::json;
    let uid = "0b5e7f5c-0000-4000-8000-00000000a5ca";
    let mf = json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": "bot", "namespace": "ai", "uid": uid, "generation": 2, "resourceVersion": "5"},
        "spec": {
            "upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}],
            "replicas": {"min": 2, "max": 10},
            "slo": {"p99LatencyMs": 500, "maxErrorRate": 0.01, "targetQpsPerReplica": 50}
        }
    });
    let labels = operator::render::labels::pod("bot", &BTreeMap::new());
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "bot", "namespace": "ai", "generation": 4, "resourceVersion": "9",
                     "labels": labels,
                     "ownerReferences": [{"apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
                                          "name": "bot", "uid": uid, "controller": true}]},
        "spec": {"replicas": 2,
                 "selector": {"matchLabels": operator::render::labels::selector("bot")},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": []}}},
        "status": {"observedGeneration": 4, "replicas": 2, "readyReplicas": 2, "availableReplicas": 2, "updatedReplicas": 2}
    });
    let pod = |n: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": n, "namespace": "ai", "labels": labels},
            "spec": {"containers": []},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        })
    };
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "9"},
                      "items": [pod("bot-a"), pod("bot-b")]});

    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "default");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = tokio::spawn(fake_api_server(
        handle,
        vec![
            (
                "/apis/apps/v1/namespaces/ai/deployments/bot".into(),
                deployment,
            ),
            ("/api/v1/namespaces/ai/pods".into(), pods),
        ],
        mf.clone(),
        seen.clone(),
    ));
    let autoscaler = operator::autoscale::run::Autoscaler {
        client: client.clone(),
        namespace: Some("ai".into()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "modelforwarder-operator".into(),
                instance: Some("chart-test".into()),
            },
        ),
        metrics: operator::telemetry::Metrics::new().expect("metrics"),
        source: std::sync::Arc::new(BusyForwarder),
        interval: std::time::Duration::from_secs(15),
        window: std::time::Duration::from_secs(60),
        max_age: std::time::Duration::from_secs(45),
        prometheus_rules: false,
    };
    let mf: operator::crd::ModelForwarder = serde_json::from_value(mf).expect("resource");
    let mut evaluator =
        operator::autoscale::Evaluator::new(operator::autoscale::workload::policy_for(&mf.spec));
    let evaluation = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        autoscaler.evaluate_one(&mf, &mut evaluator),
    )
    .await
    .expect("evaluation finishes");
    server.abort();
    let evaluation = evaluation.expect("evaluation succeeds");
    eprintln!("autoscaler decision: {evaluation:?}");
    let calls = seen.lock().unwrap().clone();
    let kinds: BTreeSet<(String, String, String)> = calls
        .iter()
        .map(|(g, r, v, _, _)| (g.clone(), r.clone(), v.clone()))
        .collect();
    eprintln!("autoscaler requests: {kinds:?}");
    for want in [
        ("apps", "deployments", "get"),
        ("", "pods", "list"),
        ("apps", "deployments", "patch"),
        ("llm.forwarder.dev", "modelforwarders/status", "patch"),
    ] {
        assert!(
            kinds.contains(&(want.0.to_string(), want.1.to_string(), want.2.to_string())),
            "expected the autoscaler to {} {}/{}; it made {kinds:?}",
            want.2,
            want.0,
            want.1
        );
    }
    assert_calls_granted(&calls, &render(&[]));
    assert_calls_granted(&calls, &render(&["--set", "watchNamespace=ai"]));
}

/// The PrometheusRule the operator applies per resource (with
/// `--prometheus-rules`, which `rbac.prometheusRules=true` passes along with
/// `prometheusUrl`) is granted only when that value is on.
#[tokio::test]
async fn prometheus_rule_requests_are_granted_only_with_rbac_prometheus_rules() {
    use serde_json::json;
    let mf: operator::crd::ModelForwarder = serde_json::from_value(json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": "bot", "namespace": "ai", "uid": "0b5e7f5c-0000-4000-8000-0000000001e5"},
        "spec": {"upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}]}
    }))
    .expect("resource");
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(svc, "default");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = tokio::spawn(fake_api_server(handle, vec![], json!({}), seen.clone()));
    let rule = operator::autoscale::rules::render(&mf);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        operator::autoscale::rules::apply(client, &mf, &rule),
    )
    .await
    .expect("apply finishes")
    .expect("apply succeeds");
    server.abort();
    let calls = seen.lock().unwrap().clone();
    eprintln!("PrometheusRule requests: {calls:?}");
    assert!(
        calls
            .iter()
            .any(|c| c.0 == "monitoring.coreos.com" && c.1 == "prometheusrules"),
        "no PrometheusRule request: {calls:?}"
    );
    assert_calls_granted(&calls, &render(&["--set", "rbac.prometheusRules=true"]));
    assert_calls_granted(
        &calls,
        &render(&[
            "--set",
            "rbac.prometheusRules=true",
            "--set",
            "watchNamespace=ai",
        ]),
    );
    let default = grants(&render(&[]));
    assert!(
        !default.iter().any(|g| g.2 == "prometheusrules"),
        "PrometheusRules granted by default"
    );
    // The rules come with the autoscaler, which needs prometheusUrl.
    let url = "prometheusUrl=http://prometheus:9090";
    let docs = render(&["--set", "rbac.prometheusRules=true", "--set", url]);
    assert!(container_args(&docs).contains(&"--prometheus-rules=true".to_string()));
    let docs = render(&["--set", url]);
    assert!(!container_args(&docs)
        .iter()
        .any(|a| a.starts_with("--prometheus-rules")));
}
