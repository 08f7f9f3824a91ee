//! Tests of the Helm chart (charts/modelforwarder-operator), rendered with
//! `helm template`: RBAC grants exactly the API calls the operator makes (no
//! more, no less) in cluster-wide and single-namespace mode; the operator pod
//! is locked down and wired to its flags; the monitoring parts select the
//! labels the operator puts on forwarder pods; the chart's CRD is the
//! generated one; and, on a real API server (envtest, `KUBEBUILDER_ASSETS`),
//! the operator runs as the chart's ServiceAccount without a single forbidden
//! request. Needs helm (`bash charts/install-helm.sh`, run by
//! scripts/test.sh, or `HELM=/path/to/helm`).
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
    // The autoscaler watches the forwarder pods' metadata (autoscale/cache.rs).
    ("", "pods", &["list", "watch"], Scope::Watched),
    // kube-runtime's Recorder: create, then patch a repeated series.
    (
        "events.k8s.io",
        "events",
        &["create", "patch"],
        Scope::Watched,
    ),
    // leader.rs: get, create when missing, merge patch (with the
    // resourceVersion read) to renew and release.
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
    &["get", "create", "patch"],
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
        // A Role is looked for in the binding's namespace (the same name
        // may stand in several).
        let role = docs
            .iter()
            .find(|d| {
                kind(d) == role_kind
                    && str_at(d, &["metadata", "name"]) == role_name
                    && (role_kind != "Role"
                        || s(d, &["metadata", "namespace"]).and_then(Value::as_str) == binding_ns)
            })
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
/// and nothing else. `watched`: ["*"] (cluster-wide) or the watched
/// namespaces.
fn assert_exact_rbac(docs: &[Value], calls: &[(&str, &str, &[&str], Scope)], watched: &[&str]) {
    let granted = grants(docs);
    let mut needed: BTreeMap<(String, String, String, String), ()> = BTreeMap::new();
    for (group, resource, verbs, scope) in calls {
        let places = match scope {
            Scope::Watched => watched,
            Scope::Own => &[RELEASE_NS][..],
        };
        for (place, verb) in places
            .iter()
            .flat_map(|p| verbs.iter().map(move |v| (p, v)))
        {
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
    assert_exact_rbac(&docs, OPERATOR_CALLS, &["*"]);
}

#[test]
fn rbac_single_namespace_uses_roles_only() {
    let docs = render(&["--set", "watchNamespace=ai"]);
    assert!(
        of_kind(&docs, "ClusterRole").is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty(),
        "namespaced mode must not create cluster-wide RBAC"
    );
    assert_exact_rbac(&docs, OPERATOR_CALLS, &["ai"]);
    let args = container_args(&docs);
    assert!(args.contains(&"--namespace=ai".to_string()), "{args:?}");
}

#[test]
fn rbac_for_a_list_of_namespaces_is_a_role_in_each() {
    let docs = render(&[
        "--set",
        "watchNamespace=ai",
        "--set",
        "watchNamespaces={ml,ai,ops}",
    ]);
    assert!(
        of_kind(&docs, "ClusterRole").is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty(),
        "namespaced mode must not create cluster-wide RBAC"
    );
    assert_exact_rbac(&docs, OPERATOR_CALLS, &["ai", "ml", "ops"]);
    let args = container_args(&docs);
    assert!(
        args.contains(&"--namespace=ai,ml,ops".to_string()),
        "{args:?}"
    );
}

#[test]
fn rbac_prometheus_rules_only_when_enabled() {
    let docs = render(&["--set", "rbac.prometheusRules=true"]);
    let mut calls = OPERATOR_CALLS.to_vec();
    calls.push(PROMETHEUS_RULE_CALLS);
    assert_exact_rbac(&docs, &calls, &["*"]);
}

#[test]
fn rbac_without_leader_election_has_no_lease_role() {
    let docs = render(&["--set", "leaderElection.enabled=false"]);
    let calls: Vec<_> = OPERATOR_CALLS
        .iter()
        .copied()
        .filter(|c| c.3 != Scope::Own)
        .collect();
    assert_exact_rbac(&docs, &calls, &["*"]);
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
                    .trim_start_matches("PartialObjectMeta<")
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
        "forwarder_cache_requests_total",
        "forwarder_queue_depth",
        "forwarder_job_wait_seconds_bucket",
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

// --- the operator as the chart's ServiceAccount, on a real API server -------
//
// The chart's RBAC is rendered with `helm template`, applied to a real API
// server (envtest), and the operator's controller, leader election and
// autoscaler run as the chart's ServiceAccount (impersonated). Every request
// the operator makes is then authorised by the real RBAC authoriser: a
// forbidden one is recorded and fails the test. Without KUBEBUILDER_ASSETS
// these tests are reported as ignored.

/// Requests answered 403, as "METHOD path".
type Forbidden = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Records every request the API server answers with 403 Forbidden.
#[derive(Clone)]
struct Audit<S> {
    inner: S,
    forbidden: Forbidden,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for Audit<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let what = format!("{} {}", req.method(), req.uri());
        let forbidden = self.forbidden.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if res.status() == http::StatusCode::FORBIDDEN {
                forbidden.lock().unwrap().push(what);
            }
            Ok(res)
        })
    }
}

/// A client acting as `system:serviceaccount:NS:NAME`, whose 403s are
/// recorded in `forbidden`.
async fn service_account_client(
    namespace: &str,
    name: &str,
    forbidden: &Forbidden,
) -> kube::Client {
    let mut config = envtest::control_plane().config().await;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".into(),
    ]);
    let forbidden = forbidden.clone();
    kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&tower::layer::layer_fn(move |inner| Audit {
            inner,
            forbidden: forbidden.clone(),
        }))
        .build()
}

/// Applies the chart's ServiceAccount and RBAC objects (as the admin) and
/// returns the ServiceAccount's name.
async fn install_rbac(admin: &kube::Client, release_ns: &str, docs: &[Value]) -> String {
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use kube::api::{Api, Patch, PatchParams};
    async fn apply<K>(api: Api<K>, doc: &Value)
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let obj: K = serde_json::from_value(serde_json::to_value(doc).unwrap()).expect("typed");
        let name = obj.meta().name.clone().expect("name");
        api.patch(
            &name,
            &PatchParams::apply("chart-test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": release_ns}})).unwrap();
    let _ = Api::<Namespace>::all(admin.clone())
        .create(&Default::default(), &ns)
        .await;
    let mut sa = None;
    for doc in docs {
        let namespace = s(doc, &["metadata", "namespace"])
            .and_then(|v| v.as_str())
            .unwrap_or(release_ns)
            .to_string();
        match kind(doc) {
            "ServiceAccount" => {
                sa = Some(str_at(doc, &["metadata", "name"]).to_string());
                apply(
                    Api::<ServiceAccount>::namespaced(admin.clone(), &namespace),
                    doc,
                )
                .await
            }
            "ClusterRole" => apply(Api::<ClusterRole>::all(admin.clone()), doc).await,
            "ClusterRoleBinding" => apply(Api::<ClusterRoleBinding>::all(admin.clone()), doc).await,
            "Role" => apply(Api::<Role>::namespaced(admin.clone(), &namespace), doc).await,
            "RoleBinding" => {
                apply(
                    Api::<RoleBinding>::namespaced(admin.clone(), &namespace),
                    doc,
                )
                .await
            }
            _ => {}
        }
    }
    sa.expect("the chart renders a ServiceAccount")
}

/// `helm template` with a release name and namespace of its own.
fn render_release(release: &str, namespace: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(helm())
        .args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm template failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

async fn install_crd(admin: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&operator::crdgen::render().expect("crd")).expect("crd yaml");
    let name = kube::ResourceExt::name_any(&crd);
    crds.patch(
        &name,
        &PatchParams::apply("chart-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("install CRD");
    until("the CRD is established", || async {
        crds.get(&name).await.ok().is_some_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
    })
    .await;
}

async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The whole operator as the chart's ServiceAccount: leader election in its
/// own namespace; the controller (every watch, a new resource's children
/// with Secrets and a PDB, status, Events, deleting the PDB again); one
/// autoscaler evaluation that scales up. No request may be forbidden.
async fn operator_as_the_charts_service_account(release: &str, namespaced: bool) {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use kube::runtime::events::{Recorder, Reporter};
    use serde_json::json;

    let cp = envtest::control_plane();
    let admin = cp.client().await;
    install_crd(&admin).await;
    let ns = cp.namespace(&admin, &format!("{release}-ai")).await;
    let release_ns = format!("{release}-system");
    let mut args = vec![];
    let watch = format!("watchNamespace={ns}");
    if namespaced {
        args = vec!["--set", watch.as_str()];
    }
    let docs = render_release(release, &release_ns, &args);
    let sa = install_rbac(&admin, &release_ns, &docs).await;
    let forbidden = Forbidden::default();
    let client = service_account_client(&release_ns, &sa, &forbidden).await;

    // Leader election, in the operator's namespace.
    let cfg =
        operator::leader::LeaderConfig::new(LEASE.into(), release_ns.clone(), "chart-test".into());
    let mut election = operator::leader::Election::start(client.clone(), &cfg)
        .await
        .expect("election");
    tokio::time::timeout(std::time::Duration::from_secs(20), election.acquired())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no lease as the chart's ServiceAccount; forbidden: {:?}",
                forbidden.lock().unwrap()
            )
        })
        .expect("acquired");

    // The controller, watching the namespace or everything.
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "modelforwarder-operator".into(),
            instance: Some("chart-test".into()),
        },
    );
    let ctx = operator::reconcile::Context::new(
        client.clone(),
        recorder.clone(),
        operator::DEFAULT_FORWARDER_IMAGE.into(),
        operator::telemetry::Metrics::new().expect("metrics"),
    );
    let watched = namespaced.then(|| ns.clone());
    let controller = tokio::spawn(operator::controller::run(
        client.clone(),
        watched.clone(),
        ctx,
    ));

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    for (name, key) in [("clients", "web"), ("llm-keys", "primary")] {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name}, "stringData": {key: "x"}
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let mfs: Api<operator::crd::ModelForwarder> = Api::namespaced(admin.clone(), &ns);
    let mf: operator::crd::ModelForwarder = serde_json::from_value(json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1", "kind": "ModelForwarder",
        "metadata": {"name": "bot", "namespace": ns},
        "spec": {
            "protocols": ["http", "websocket", "grpc"],
            "upstreams": [{"name": "primary", "provider": "openai", "baseUrl": "https://llm.internal/v1",
                           "models": ["m"], "apiKeySecretRef": {"name": "llm-keys", "key": "primary"}}],
            "auth": {"apiKeysSecretRef": {"name": "clients"}},
            "replicas": {"min": 2, "max": 10},
            "slo": {"p99LatencyMs": 500, "maxErrorRate": 0.01, "targetQpsPerReplica": 50}
        }
    }))
    .unwrap();
    mfs.create(&PostParams::default(), &mf)
        .await
        .expect("create");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
    let report = || format!("forbidden: {:?}", forbidden.lock().unwrap());
    until("children and status", || async {
        deps.get_opt("bot").await.unwrap().is_some()
            && pdbs.get_opt("bot").await.unwrap().is_some()
            && mfs.get("bot").await.unwrap().status.is_some()
    })
    .await;
    assert!(forbidden.lock().unwrap().is_empty(), "{}", report());

    // One autoscaler evaluation: reads the Deployment and pods from its
    // caches, scales, writes status and an Event.
    let autoscaler = operator::autoscale::run::Autoscaler {
        client: client.clone(),
        namespaces: watched.iter().cloned().collect(),
        recorder,
        metrics: operator::telemetry::Metrics::new().expect("metrics"),
        source: std::sync::Arc::new(BusyForwarder),
        interval: std::time::Duration::from_secs(15),
        window: std::time::Duration::from_secs(60),
        max_age: std::time::Duration::from_secs(45),
        prometheus_rules: false,
        handover: None,
    };
    // Its caches, watched as the ServiceAccount (the chart's RBAC must
    // allow the watches).
    let namespaces: Vec<String> = watched.iter().cloned().collect();
    let (cluster, feed) = operator::autoscale::cache::Cluster::watch(&client, &namespaces);
    let feed = tokio::spawn(feed);
    tokio::time::timeout(std::time::Duration::from_secs(20), cluster.ready())
        .await
        .unwrap_or_else(|_| panic!("autoscaler caches not filled; {}", report()));
    until("the Deployment in the autoscaler's cache", || async {
        cluster.deployment(&ns, "bot").is_some()
    })
    .await;
    let stored = mfs.get("bot").await.unwrap();
    let mut evaluator = operator::autoscale::Evaluator::new(
        operator::autoscale::workload::policy_for(&stored.spec),
    );
    let evaluation = autoscaler
        .evaluate_one(&cluster, &stored, &mut evaluator)
        .await;
    feed.abort();
    eprintln!("autoscaler: {evaluation:?}");
    assert!(forbidden.lock().unwrap().is_empty(), "{}", report());

    // min back to 1 and one replica: the PDB is deleted.
    mfs.patch(
        "bot",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": {"min": 1, "desired": 1}}})),
    )
    .await
    .unwrap();
    until("the PDB to go", || async {
        pdbs.get_opt("bot").await.unwrap().is_none()
    })
    .await;

    controller.abort();
    election.release().await.expect("release");
    assert!(forbidden.lock().unwrap().is_empty(), "{}", report());
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_operator_runs_as_the_charts_service_account_cluster_wide() {
    operator_as_the_charts_service_account("cw", false).await;
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn the_operator_runs_as_the_charts_service_account_in_one_namespace() {
    operator_as_the_charts_service_account("one", true).await;
}

/// The PrometheusRules the operator applies per resource (with
/// `--prometheus-rules`, which `rbac.prometheusRules=true` passes along with
/// `prometheusUrl`) are granted only when that value is on.
#[test]
fn prometheus_rules_are_granted_only_with_rbac_prometheus_rules() {
    for args in [
        vec!["--set", "rbac.prometheusRules=true"],
        vec![
            "--set",
            "rbac.prometheusRules=true",
            "--set",
            "watchNamespace=ai",
        ],
    ] {
        let granted = grants(&render(&args));
        for verb in PROMETHEUS_RULE_CALLS.2 {
            assert!(
                granted
                    .iter()
                    .any(|g| g.2 == "prometheusrules" && g.3 == *verb),
                "{args:?}: {verb} prometheusrules not granted"
            );
        }
    }
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
