//! The forwarder Deployment.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretProjection, SecretVolumeSource, SecurityContext,
    TCPSocketAction, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{
    CALLBACK_SECRETS_DIR, CLIENT_CA_DIR, CLIENT_KEYS_DIR, CONFIG_KEY, CONFIG_PATH, DRAIN_DELAY,
    ENCRYPTION_KEYS_DIR, ENCRYPTION_PRIMARY_KEY, GRACE_PERIOD, GRPC_PORT, HTTP_PORT, JWT_KEYS_DIR,
    KAFKA_CA_DIR, KAFKA_SASL_DIR, KEY_RING_PRIMARY, REDIS_CA_DIR, REDIS_CLIENT_CERT_DIR,
    REDIS_PASSWORD_DIR, TLS_DIR, UPSTREAM_KEYS_DIR,
};
use super::{config_map_name, labels, metadata, Inputs};
use crate::crd::{ModelForwarderSpec, Protocol, SecretKeyRef};

/// UID/GID the forwarder runs as (the distroless `nonroot` user).
pub const RUN_AS: i64 = 65532;
/// Secret files readable by owner and the pod's fsGroup only.
const SECRET_MODE: i32 = 0o440;

/// Volume of the store's key ring.
const ENCRYPTION_VOLUME: &str = "encryption-keys";

/// Volume name of an upstream's API-key Secret.
pub fn upstream_volume(upstream: &str) -> String {
    format!("upstream-key-{upstream}")
}

/// Seconds Kubernetes waits after SIGTERM: the forwarder's drain delay and
/// grace period, plus a margin so it never gets SIGKILLed mid-drain.
pub fn termination_grace_seconds() -> i64 {
    (DRAIN_DELAY + GRACE_PERIOD).as_secs() as i64 + 10
}

/// The container's resources: `spec.pod.resources`, else the defaults.
pub fn resources(spec: &ModelForwarderSpec) -> ResourceRequirements {
    spec.pod.resources.clone().unwrap_or_else(default_resources)
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("256Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// A probe of `path` on the HTTP port: over HTTPS when the listener has
/// TLS (the kubelet does not verify the certificate); a TCP check when it
/// requires client certificates, which the kubelet cannot present.
fn probe(path: &str, period: i32, failures: i32, tls: Option<&crate::crd::Tls>) -> Probe {
    let port = IntOrString::String("http".into());
    let (http_get, tcp_socket) = match tls {
        Some(t) if t.client_ca_secret_ref.is_some() => (
            None,
            Some(TCPSocketAction {
                port,
                ..TCPSocketAction::default()
            }),
        ),
        _ => (
            Some(HTTPGetAction {
                path: Some(path.into()),
                port,
                scheme: tls.map(|_| "HTTPS".into()),
                ..HTTPGetAction::default()
            }),
            None,
        ),
    };
    Probe {
        http_get,
        tcp_socket,
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// One Secret mounted read-only into the container: either only the listed
/// (key, file name) pairs, or (`items: None`) every key as a file, for the
/// sources the forwarder reloads as a directory. `field` is the spec path of
/// the reference, for messages.
pub struct SecretMount<'a> {
    pub field: String,
    volume: String,
    dir: String,
    pub secret: &'a str,
    pub items: Option<Vec<(&'a str, &'a str)>>,
}

impl<'a> SecretMount<'a> {
    fn keys(
        field: &str,
        volume: &str,
        dir: &str,
        secret: &'a str,
        items: Vec<(&'a str, &'a str)>,
    ) -> Self {
        Self {
            field: field.into(),
            volume: volume.into(),
            dir: dir.into(),
            secret,
            items: Some(items),
        }
    }

    fn whole(field: &str, volume: &str, dir: &str, secret: &'a str) -> Self {
        Self {
            field: field.into(),
            volume: volume.into(),
            dir: dir.into(),
            secret,
            items: None,
        }
    }

    fn render(self) -> (Volume, VolumeMount) {
        let items = self.items.map(|items| {
            items
                .into_iter()
                .map(|(key, path)| KeyToPath {
                    key: key.into(),
                    path: path.into(),
                    mode: None,
                })
                .collect()
        });
        let volume = Volume {
            name: self.volume.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(self.secret.into()),
                items,
                default_mode: Some(SECRET_MODE),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        };
        let mount = VolumeMount {
            name: self.volume,
            mount_path: self.dir,
            read_only: Some(true),
            ..VolumeMount::default()
        };
        (volume, mount)
    }
}

/// Every Secret the spec references, each at the fixed path the rendered
/// config names, projecting only the referenced keys where the forwarder
/// reads single files. The one list both the pod template and the Secret
/// checks (`reconcile::secret_uses`) are built from.
pub fn secret_mounts<'a>(spec: &'a ModelForwarderSpec) -> Vec<SecretMount<'a>> {
    let auth = spec.auth.as_ref();
    let jwt = auth.and_then(|a| a.jwt.as_ref());
    let tls = spec.tls.as_ref();
    let jobs = spec.async_jobs.as_ref();
    let store = spec.store.as_ref();
    let one = |field: &str, volume: &str, dir: &str, r: &'a SecretKeyRef, file: &'static str| {
        SecretMount::keys(field, volume, dir, &r.name, vec![(r.key.as_str(), file)])
    };
    let crt_key = || vec![("tls.crt", "tls.crt"), ("tls.key", "tls.key")];
    let mut mounts = Vec::new();
    // Directories the forwarder reloads when the Secret changes (the pod
    // hash rolls the pods as well).
    if let Some(r) = auth.and_then(|a| a.api_keys_secret_ref.as_ref()) {
        let field = "spec.auth.apiKeysSecretRef";
        mounts.push(SecretMount::whole(
            field,
            "client-keys",
            CLIENT_KEYS_DIR,
            &r.name,
        ));
    }
    if let Some(e) = &spec.encryption {
        let (field, name) = ("spec.encryption.keySecretRef", &e.key_secret_ref.name);
        mounts.push(SecretMount::whole(
            field,
            ENCRYPTION_VOLUME,
            ENCRYPTION_KEYS_DIR,
            name,
        ));
    }
    if let Some(r) = jwt.and_then(|j| j.jwks_secret_ref.as_ref()) {
        mounts.push(one(
            "spec.auth.jwt.jwksSecretRef",
            "jwt-keys",
            JWT_KEYS_DIR,
            r,
            "jwks.json",
        ));
    }
    if let Some(r) = jwt.and_then(|j| j.secret_ref.as_ref()) {
        mounts.push(one(
            "spec.auth.jwt.secretRef",
            "jwt-secret",
            JWT_KEYS_DIR,
            r,
            "secret",
        ));
    }
    if let Some(t) = tls {
        let name = &t.secret_ref.name;
        mounts.push(SecretMount::keys(
            "spec.tls.secretRef",
            "tls",
            TLS_DIR,
            name,
            crt_key(),
        ));
    }
    if let Some(r) = tls.and_then(|t| t.client_ca_secret_ref.as_ref()) {
        mounts.push(one(
            "spec.tls.clientCaSecretRef",
            "client-ca",
            CLIENT_CA_DIR,
            r,
            "ca.crt",
        ));
    }
    if let Some(r) = jobs.and_then(|a| a.sasl_secret_ref.as_ref()) {
        let pair = vec![("username", "username"), ("password", "password")];
        let field = "spec.async.saslSecretRef";
        mounts.push(SecretMount::keys(
            field,
            "kafka-sasl",
            KAFKA_SASL_DIR,
            &r.name,
            pair,
        ));
    }
    if let Some(r) = jobs.and_then(|a| a.ca_secret_ref.as_ref()) {
        mounts.push(one(
            "spec.async.caSecretRef",
            "kafka-ca",
            KAFKA_CA_DIR,
            r,
            "ca.crt",
        ));
    }
    if let Some(r) = jobs.and_then(|a| a.callback_secret_ref.as_ref()) {
        let field = "spec.async.callbackSecretRef";
        mounts.push(one(
            field,
            "callback-secrets",
            CALLBACK_SECRETS_DIR,
            r,
            "secrets",
        ));
    }
    if let Some(r) = store.and_then(|s| s.password_secret_ref.as_ref()) {
        let field = "spec.store.passwordSecretRef";
        mounts.push(SecretMount::keys(
            field,
            "redis-password",
            REDIS_PASSWORD_DIR,
            &r.name,
            vec![(r.key.as_str(), r.key.as_str())],
        ));
    }
    if let Some(r) = store.and_then(|s| s.ca_secret_ref.as_ref()) {
        mounts.push(one(
            "spec.store.caSecretRef",
            "redis-ca",
            REDIS_CA_DIR,
            r,
            "ca.crt",
        ));
    }
    if let Some(r) = store.and_then(|s| s.client_cert_secret_ref.as_ref()) {
        let field = "spec.store.clientCertSecretRef";
        mounts.push(SecretMount::keys(
            field,
            "redis-client",
            REDIS_CLIENT_CERT_DIR,
            &r.name,
            crt_key(),
        ));
    }
    for (i, u) in spec.upstreams.iter().enumerate() {
        if let Some(r) = &u.api_key_secret_ref {
            let field = format!("spec.upstreams[{i}].apiKeySecretRef");
            let dir = format!("{UPSTREAM_KEYS_DIR}/{}", u.name);
            let items = vec![(r.key.as_str(), r.key.as_str())];
            mounts.push(SecretMount::keys(
                &field,
                &upstream_volume(&u.name),
                &dir,
                &r.name,
                items,
            ));
        }
    }
    mounts
}

fn volumes_and_mounts(inputs: &Inputs<'_>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(inputs.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        // The root filesystem is read-only; give the process a scratch dir.
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        // A single-file mount: the pod hash, not a live update, carries changes.
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_PATH.into(),
            sub_path: Some(CONFIG_KEY.into()),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    for m in secret_mounts(inputs.spec) {
        let (mut volume, mount) = m.render();
        if let (ENCRYPTION_VOLUME, Some(_)) = (volume.name.as_str(), inputs.encryption_primary) {
            volume = with_primary(volume, config_map_name(inputs.name));
        }
        volumes.push(volume);
        mounts.push(mount);
    }
    (volumes, mounts)
}

/// The key ring's Secret volume, projected together with the ConfigMap's
/// `primary` entry: the operator names the encrypting key (a rotation in
/// two phases), and the forwarder reloads the directory as it changes.
fn with_primary(secret_volume: Volume, config_map: String) -> Volume {
    let secret = secret_volume.secret.unwrap_or_default();
    Volume {
        name: secret_volume.name,
        projected: Some(ProjectedVolumeSource {
            default_mode: secret.default_mode,
            sources: Some(vec![
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: secret.secret_name.unwrap_or_default(),
                        ..SecretProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: config_map,
                        items: Some(vec![KeyToPath {
                            key: ENCRYPTION_PRIMARY_KEY.into(),
                            path: KEY_RING_PRIMARY.into(),
                            mode: None,
                        }]),
                        ..ConfigMapProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
            ]),
        }),
        ..Volume::default()
    }
}

fn ports(inputs: &Inputs<'_>) -> Vec<ContainerPort> {
    let mut ports = vec![ContainerPort {
        name: Some("http".into()),
        container_port: i32::from(HTTP_PORT),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }];
    if inputs.spec.protocols.contains(&Protocol::Grpc) {
        ports.push(ContainerPort {
            name: Some("grpc".into()),
            container_port: i32::from(GRPC_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }
    ports
}

/// The forwarder's config override (`FORWARDER_` + path, `__` between
/// segments) for Kafka's `group.instance.id`.
pub const GROUP_INSTANCE_ID_ENV: &str = "FORWARDER_ASYNC__KAFKA__GROUP_INSTANCE_ID";

/// Environment of the forwarder container: with `spec.async` and static
/// membership, the pod's own name as its consumer-group instance id (the
/// downward API; a ConfigMap is shared by every pod, so it cannot carry a
/// per-pod value). Pod names start with the resource's name, a DNS-1035
/// label, so the override is always read as a string.
fn env(inputs: &Inputs<'_>) -> Option<Vec<EnvVar>> {
    let a = inputs.spec.async_jobs.as_ref()?;
    a.static_membership.then(|| {
        vec![EnvVar {
            name: GROUP_INSTANCE_ID_ENV.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".into()),
                    field_path: "metadata.name".into(),
                }),
                ..EnvVarSource::default()
            }),
        }]
    })
}

/// The Deployment. `spec.replicas` is deliberately absent: it belongs to the
/// scaler's field manager, so applying this never resets a scaled count.
pub fn deployment(inputs: &Inputs<'_>, config_hash: &str) -> Deployment {
    let pod = &inputs.spec.pod;
    let (volumes, volume_mounts) = volumes_and_mounts(inputs);

    let mut annotations = pod.annotations.clone();
    annotations.extend([
        (labels::CONFIG_HASH.to_string(), config_hash.to_string()),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), HTTP_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    if inputs.spec.tls.is_some() {
        annotations.insert("prometheus.io/scheme".to_string(), "https".to_string());
    }

    let container = Container {
        name: "forwarder".into(),
        image: Some(
            pod.image
                .clone()
                .unwrap_or_else(|| inputs.default_image.to_string()),
        ),
        image_pull_policy: pod.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["forwarder".into()]),
        args: Some(vec!["serve".into(), "--config".into(), CONFIG_PATH.into()]),
        env: env(inputs),
        ports: Some(ports(inputs)),
        liveness_probe: Some(probe("/healthz", 10, 3, inputs.spec.tls.as_ref())),
        readiness_probe: Some(probe("/readyz", 5, 2, inputs.spec.tls.as_ref())),
        resources: Some(resources(inputs.spec)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };

    Deployment {
        metadata: metadata(inputs, inputs.name.to_string()),
        spec: Some(DeploymentSpec {
            replicas: None,
            selector: LabelSelector {
                match_labels: Some(labels::selector(inputs.name)),
                match_expressions: None,
            },
            // Surge before removing: capacity never drops during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels::pod(inputs.name, &pod.labels)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    service_account_name: pod.service_account_name.clone(),
                    // The forwarder never calls the Kubernetes API.
                    automount_service_account_token: Some(false),
                    // Service links inject `<SERVICE>_PORT`-style variables; a
                    // Service named `forwarder` would put `FORWARDER_*`
                    // variables, which the forwarder reads as config
                    // overrides, into every pod of the namespace.
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(termination_grace_seconds()),
                    node_selector: (!pod.node_selector.is_empty())
                        .then(|| pod.node_selector.clone()),
                    tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::render::config::tests::spec;
    use crate::render::tests::inputs;

    fn render(spec: &crate::crd::ModelForwarderSpec) -> Deployment {
        let secrets = BTreeMap::new();
        deployment(&inputs(spec, &secrets), "abc123")
    }

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    #[test]
    fn async_secrets_are_mounted_where_the_config_names_them() {
        let mut s = spec();
        s.async_jobs = serde_json::from_value(serde_json::json!({
            "bootstrapServers": ["kafka:9092"],
            "saslMechanism": "PLAIN", "saslSecretRef": {"name": "kafka-user"},
            "callbackSecretRef": {"name": "hooks", "key": "whsec"}
        }))
        .expect("async");
        let d = render(&s);
        let pod = pod_spec(&d);
        let volumes = pod.volumes.as_ref().expect("volumes");
        let sasl = volumes
            .iter()
            .find(|v| v.name == "kafka-sasl")
            .and_then(|v| v.secret.as_ref())
            .expect("sasl volume");
        assert_eq!(sasl.secret_name.as_deref(), Some("kafka-user"));
        assert_eq!(sasl.items.as_ref().map(Vec::len), Some(2));
        assert!(volumes.iter().any(|v| v.name == "callback-secrets"));
        assert!(!volumes.iter().any(|v| v.name == "kafka-ca"));
        let mounts = pod.containers[0].volume_mounts.as_ref().expect("mounts");
        for (name, dir) in [
            ("kafka-sasl", KAFKA_SASL_DIR),
            ("callback-secrets", CALLBACK_SECRETS_DIR),
        ] {
            assert!(
                mounts.iter().any(|m| m.name == name && m.mount_path == dir),
                "{name}"
            );
        }
    }

    #[test]
    fn kafka_static_membership_takes_the_pod_name_from_the_downward_api() {
        let mut s = spec();
        assert_eq!(pod_spec(&render(&s)).containers[0].env, None, "no async");
        s.async_jobs = serde_json::from_value(serde_json::json!({
            "bootstrapServers": ["kafka:9092"]
        }))
        .expect("async");
        let d = render(&s);
        let env = pod_spec(&d).containers[0].env.clone().expect("env");
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].name, GROUP_INSTANCE_ID_ENV);
        assert_eq!(
            env[0]
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.name")
        );
        // Opted out: dynamic membership.
        s.async_jobs.as_mut().expect("async").static_membership = false;
        assert_eq!(pod_spec(&render(&s)).containers[0].env, None);
    }

    /// The variable the Deployment sets is the one the forwarder reads as
    /// `async.kafka.group_instance_id`: its config loader run with it, in a
    /// child process (the environment is process-wide).
    #[test]
    fn the_forwarder_reads_the_rendered_variable_as_its_group_instance_id() {
        const CHILD: &str = "MF_TEST_GROUP_INSTANCE_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let c = forwarder_config::load(None).expect("config loads");
            assert_eq!(
                c.async_jobs.kafka.group_instance_id.as_deref(),
                Some("bot-7d9f8c6b5-x2k9q")
            );
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "render::deployment::tests::the_forwarder_reads_the_rendered_variable_as_its_group_instance_id",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env(GROUP_INSTANCE_ID_ENV, "bot-7d9f8c6b5-x2k9q")
            .output()
            .expect("child runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn jwt_and_tls_secrets_are_projected_and_probes_follow_tls() {
        let mut s = spec();
        s.auth = serde_json::from_value(serde_json::json!({
            "jwt": {"jwksSecretRef": {"name": "jwks", "key": "keys.json"}}
        }))
        .expect("auth");
        s.tls = serde_json::from_value(serde_json::json!({"secretRef": {"name": "mf-tls"}}))
            .expect("tls");
        let d = render(&s);
        let pod = pod_spec(&d);
        let volumes = pod.volumes.as_ref().expect("volumes");
        let items = |name: &str| {
            volumes
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.secret.as_ref())
                .map(|s| {
                    let items = s.items.clone().unwrap_or_default();
                    let pairs: Vec<(String, String)> =
                        items.into_iter().map(|i| (i.key, i.path)).collect();
                    (s.secret_name.clone().unwrap_or_default(), pairs)
                })
        };
        assert_eq!(
            items("jwt-keys"),
            Some((
                "jwks".into(),
                vec![("keys.json".into(), "jwks.json".into())]
            ))
        );
        assert_eq!(
            items("tls"),
            Some((
                "mf-tls".into(),
                vec![
                    ("tls.crt".into(), "tls.crt".into()),
                    ("tls.key".into(), "tls.key".into())
                ]
            ))
        );
        let c = &pod.containers[0];
        let mounts: BTreeMap<_, _> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(mounts["jwt-keys"], JWT_KEYS_DIR);
        assert_eq!(mounts["tls"], TLS_DIR);
        let get = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
        assert_eq!(get.and_then(|g| g.scheme.as_deref()), Some("HTTPS"));
        // With client certificates required the kubelet cannot speak
        // HTTPS to it: the probes fall back to TCP.
        s.tls = serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "mf-tls"},
            "clientCaSecretRef": {"name": "ca", "key": "bundle.pem"}
        }))
        .expect("tls");
        let d = render(&s);
        let c = &pod_spec(&d).containers[0];
        let probe = c.liveness_probe.as_ref().expect("probe");
        assert!(probe.http_get.is_none() && probe.tcp_socket.is_some());
    }

    #[test]
    fn replicas_are_left_to_the_scaler() {
        assert_eq!(render(&spec()).spec.expect("spec").replicas, None);
    }

    #[test]
    fn runs_forwarder_serve_with_the_config_file() {
        let d = render(&spec());
        let c = &pod_spec(&d).containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/modelforwarder/forwarder:0.1.0")
        );
        assert_eq!(c.command, Some(vec!["forwarder".to_string()]));
        assert_eq!(
            c.args,
            Some(vec![
                "serve".to_string(),
                "--config".to_string(),
                "/etc/forwarder/config.yaml".to_string()
            ])
        );
    }

    #[test]
    fn image_and_pod_overrides_apply() {
        let mut s = spec();
        s.pod.image = Some("registry.local/fwd:dev".into());
        s.pod.node_selector = BTreeMap::from([("pool".into(), "gpu".into())]);
        s.pod.labels = BTreeMap::from([("team".into(), "ai".into())]);
        s.pod.annotations = BTreeMap::from([(labels::CONFIG_HASH.into(), "forged".into())]);
        let d = render(&s);
        let p = pod_spec(&d);
        assert_eq!(
            p.containers[0].image.as_deref(),
            Some("registry.local/fwd:dev")
        );
        assert_eq!(p.node_selector.as_ref().expect("ns")["pool"], "gpu");
        let meta = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .expect("meta");
        assert_eq!(meta.labels.as_ref().expect("labels")["team"], "ai");
        assert_eq!(
            meta.annotations.as_ref().expect("ann")[labels::CONFIG_HASH],
            "abc123",
            "the operator's hash wins"
        );
    }

    #[test]
    fn security_context_is_locked_down() {
        let d = render(&spec());
        let p = pod_spec(&d);
        let psc = p.security_context.as_ref().expect("pod sc");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(RUN_AS));
        let sc = p.containers[0].security_context.as_ref().expect("sc");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(p.automount_service_account_token, Some(false));
        assert_eq!(
            p.enable_service_links,
            Some(false),
            "no FORWARDER_* service env"
        );
        assert!(p.termination_grace_period_seconds.expect("grace") > 35);
    }

    #[test]
    fn probes_hit_healthz_and_readyz_on_the_http_port() {
        let d = render(&spec());
        let c = &pod_spec(&d).containers[0];
        for (probe, path) in [
            (&c.liveness_probe, "/healthz"),
            (&c.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("http probe");
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("http".into()));
        }
    }

    #[test]
    fn labels_selector_and_prometheus_annotations() {
        let d = render(&spec());
        let s = d.spec.as_ref().expect("spec");
        assert_eq!(s.selector.match_labels, Some(labels::selector("bot")));
        let meta = s.template.metadata.as_ref().expect("meta");
        let l = meta.labels.as_ref().expect("labels");
        assert_eq!(l[labels::INSTANCE], "bot");
        assert_eq!(l[labels::NAME], "forwarder");
        assert_eq!(l[labels::MANAGED_BY], "modelforwarder-operator");
        let a = meta.annotations.as_ref().expect("annotations");
        assert_eq!(a["prometheus.io/scrape"], "true");
        assert_eq!(a["prometheus.io/port"], "8080");
        assert_eq!(a["prometheus.io/path"], "/metrics");
    }

    #[test]
    fn secrets_are_mounted_as_files_with_only_the_referenced_key() {
        let d = render(&spec());
        let p = pod_spec(&d);
        let vols = p.volumes.as_ref().expect("volumes");
        let clients = vols
            .iter()
            .find(|v| v.name == "client-keys")
            .expect("client keys");
        assert_eq!(
            clients
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("clients")
        );
        let up = vols
            .iter()
            .find(|v| v.name == "upstream-key-primary")
            .expect("upstream");
        let items = up
            .secret
            .as_ref()
            .and_then(|s| s.items.clone())
            .expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].key, "primary");
        assert!(
            !vols.iter().any(|v| v.name == "upstream-key-local"),
            "no key, no volume"
        );
        let mounts: BTreeMap<_, _> = p.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(mounts["config"], "/etc/forwarder/config.yaml");
        assert_eq!(mounts["client-keys"], "/etc/forwarder/client-keys");
        assert_eq!(
            mounts["upstream-key-primary"],
            "/etc/forwarder/upstream-keys/primary"
        );
    }

    #[test]
    fn grpc_adds_a_container_port() {
        let names = |d: &Deployment| -> Vec<String> {
            pod_spec(d).containers[0]
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.name.clone())
                .collect()
        };
        let mut s = spec();
        assert_eq!(names(&render(&s)), vec!["http"]);
        s.protocols = vec![Protocol::Http, Protocol::Websocket, Protocol::Grpc];
        assert_eq!(names(&render(&s)), vec!["http", "grpc"]);
    }
}
