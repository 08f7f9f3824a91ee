//! The forwarder Service: one named port per listener.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{GRPC_PORT, HTTP_PORT};
use super::{labels, metadata, Inputs};
use crate::crd::Protocol;

/// The Service. `http` carries HTTP and WebSocket (one listener); `grpc` is
/// present only when the gRPC protocol is enabled.
pub fn service(inputs: &Inputs<'_>) -> Service {
    let mut ports = vec![ServicePort {
        name: Some("http".into()),
        port: i32::from(HTTP_PORT),
        target_port: Some(IntOrString::String("http".into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }];
    if inputs.spec.protocols.contains(&Protocol::Grpc) {
        ports.push(ServicePort {
            name: Some("grpc".into()),
            port: i32::from(GRPC_PORT),
            target_port: Some(IntOrString::String("grpc".into())),
            protocol: Some("TCP".into()),
            app_protocol: Some("kubernetes.io/h2c".into()),
            ..ServicePort::default()
        });
    }
    Service {
        metadata: metadata(inputs, inputs.name.to_string()),
        spec: Some(ServiceSpec {
            selector: Some(labels::selector(inputs.name)),
            ports: Some(ports),
            type_: Some("ClusterIP".into()),
            ..ServiceSpec::default()
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

    fn ports(protocols: Vec<Protocol>) -> Vec<(String, i32)> {
        let mut s = spec();
        s.protocols = protocols;
        let secrets = BTreeMap::new();
        service(&inputs(&s, &secrets))
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port))
            .collect()
    }

    #[test]
    fn one_named_port_per_listener() {
        assert_eq!(ports(vec![Protocol::Http]), vec![("http".into(), 8080)]);
        assert_eq!(
            ports(vec![Protocol::Http, Protocol::Websocket]),
            vec![("http".into(), 8080)],
            "websocket shares the http port"
        );
        assert_eq!(
            ports(vec![Protocol::Grpc]),
            vec![("http".into(), 8080), ("grpc".into(), 9090)],
            "health and metrics stay on http"
        );
    }

    #[test]
    fn selects_the_instance_pods() {
        let s = spec();
        let secrets = BTreeMap::new();
        let svc = service(&inputs(&s, &secrets));
        assert_eq!(
            svc.spec.and_then(|s| s.selector),
            Some(labels::selector("bot"))
        );
    }
}
