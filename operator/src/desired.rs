//! The objects an EdgeService owns, built as pure functions of the service and
//! its placement: a Service without a selector, and the EndpointSlices that
//! list only the placed nodes that are ready.

use std::collections::BTreeMap;
use std::net::IpAddr;

use edgewire_api::crd::{EdgeService, ExposeType, NodePlacement, PlacementState};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

pub const MANAGER: &str = "edgewire-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const EDGESERVICE_LABEL: &str = "edgewire.dev/edgeservice";
/// The value of `endpointslice.kubernetes.io/managed-by` on our slices, so the
/// EndpointSlice controller leaves them alone.
pub const SLICE_MANAGER: &str = "edgewire-operator.edgewire.dev";
pub const PORT_NAME: &str = "edge";
/// Endpoints per slice, as the EndpointSlice controller does by default.
const MAX_ENDPOINTS_PER_SLICE: usize = 100;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DesiredError {
    #[error("the EdgeService has no {0}")]
    Missing(&'static str),
}

fn owner(es: &EdgeService) -> Result<OwnerReference, DesiredError> {
    es.controller_owner_ref(&())
        .ok_or(DesiredError::Missing("name or uid"))
}

fn labels(es_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
        (EDGESERVICE_LABEL.to_string(), es_name.to_string()),
    ])
}

pub(crate) fn meta(
    es: &EdgeService,
    name: String,
    extra: &[(&str, &str)],
) -> Result<ObjectMeta, DesiredError> {
    let es_name = es
        .metadata
        .name
        .clone()
        .ok_or(DesiredError::Missing("name"))?;
    let mut labels = labels(&es_name);
    for (k, v) in extra {
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(ObjectMeta {
        name: Some(name),
        namespace: es.metadata.namespace.clone(),
        labels: Some(labels),
        owner_references: Some(vec![owner(es)?]),
        ..ObjectMeta::default()
    })
}

/// Whether `meta` carries the labels and controller owner of `want`.
pub(crate) fn owned_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    want: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> bool {
    let labels_ok = want
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| meta.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    let owners_ok = want.owner_references.iter().flatten().all(|o| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|h| h.uid == o.uid && h.controller == o.controller)
    });
    labels_ok && owners_ok
}

/// The Service clients use: same name as the EdgeService, no selector (its
/// endpoints are the slices below), of the exposure type the spec asks for.
pub fn service(es: &EdgeService) -> Result<Service, DesiredError> {
    let name = es
        .metadata
        .name
        .clone()
        .ok_or(DesiredError::Missing("name"))?;
    let expose = &es.spec.expose;
    let node_port = match expose.type_ {
        ExposeType::ClusterIP => None,
        ExposeType::NodePort | ExposeType::LoadBalancer => expose.node_port,
    };
    Ok(Service {
        metadata: meta(es, name, &[])?,
        spec: Some(ServiceSpec {
            type_: Some(expose.type_.as_str().to_string()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: es.spec.port,
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(es.spec.port),
                ),
                protocol: Some("TCP".into()),
                node_port,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// An address the API accepts in an EndpointSlice, with its family; None
/// for what Kubernetes refuses there (loopback, link-local, unspecified,
/// multicast) or what is not an IP.
pub fn endpoint_family(address: &str) -> Option<&'static str> {
    match address.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip)
            if !(ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_multicast()) =>
        {
            Some("IPv4")
        }
        IpAddr::V6(ip)
            if !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (ip.segments()[0] & 0xffc0) == 0xfe80) =>
        {
            Some("IPv6")
        }
        _ => None,
    }
}

/// The EndpointSlices for the ready placed nodes: one family per slice, at
/// most 100 endpoints each, named `<service>-<family>-<n>`. Always at least
/// one (possibly empty) IPv4 slice, so a service with no ready node has an
/// explicit empty endpoint list rather than a leftover one.
pub fn endpoint_slices(
    es: &EdgeService,
    placement: &[NodePlacement],
) -> Result<Vec<EndpointSlice>, DesiredError> {
    let es_name = es
        .metadata
        .name
        .clone()
        .ok_or(DesiredError::Missing("name"))?;
    let mut by_family: BTreeMap<&'static str, Vec<Endpoint>> = BTreeMap::new();
    by_family.entry("IPv4").or_default();
    for p in placement
        .iter()
        .filter(|p| p.state == PlacementState::Ready)
    {
        let Some(address) = &p.address else { continue };
        let Some(family) = endpoint_family(address) else {
            continue;
        };
        by_family.entry(family).or_default().push(Endpoint {
            addresses: vec![address.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(p.node.clone()),
            ..Endpoint::default()
        });
    }
    let mut slices = Vec::new();
    for (family, endpoints) in by_family {
        let chunks: Vec<Vec<Endpoint>> = if endpoints.is_empty() {
            vec![Vec::new()]
        } else {
            endpoints
                .chunks(MAX_ENDPOINTS_PER_SLICE)
                .map(<[Endpoint]>::to_vec)
                .collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let name = format!("{es_name}-{}-{i}", family.to_ascii_lowercase());
            slices.push(EndpointSlice {
                metadata: meta(
                    es,
                    name,
                    &[
                        ("kubernetes.io/service-name", &es_name),
                        ("endpointslice.kubernetes.io/managed-by", SLICE_MANAGER),
                    ],
                )?,
                address_type: family.to_string(),
                endpoints: chunk,
                ports: Some(vec![EndpointPort {
                    name: Some(PORT_NAME.into()),
                    port: Some(es.spec.port),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                }]),
            });
        }
    }
    Ok(slices)
}

#[cfg(test)]
mod tests {
    use edgewire_api::crd::{EdgeServiceSpec, Expose};

    use super::*;

    fn es(expose: ExposeType) -> EdgeService {
        let mut es = EdgeService::new(
            "chat",
            EdgeServiceSpec {
                node_selector: Default::default(),
                placement: Default::default(),
                port: 8765,
                handlers: vec![],
                channels: vec![],
                relay_path: "/relay".into(),
                limits: Default::default(),
                expose: Expose {
                    type_: expose,
                    node_port: Some(30080),
                },
                auth: None,
                tls: None,
                hub: None,
            },
        );
        es.metadata.namespace = Some("edge".into());
        es.metadata.uid = Some("uid-1".into());
        es
    }

    fn placed(node: &str, address: &str, state: PlacementState) -> NodePlacement {
        NodePlacement {
            address: Some(address.into()),
            ..crate::fixtures::placed(node, state)
        }
    }

    #[test]
    fn service_is_owned_selectorless_and_typed() {
        let svc = service(&es(ExposeType::NodePort)).unwrap();
        let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("EdgeService", "chat", Some(true))
        );
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector, None);
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.port, port.node_port), (8765, Some(30080)));
        let cluster_ip = service(&es(ExposeType::ClusterIP)).unwrap();
        assert_eq!(cluster_ip.spec.unwrap().ports.unwrap()[0].node_port, None);
    }

    #[test]
    fn slices_list_only_ready_nodes_by_family() {
        let placement = [
            placed("a", "192.0.2.1", PlacementState::Ready),
            placed("b", "192.0.2.2", PlacementState::Stale),
            placed("c", "2001:db8::3", PlacementState::Ready),
            placed("d", "192.0.2.4", PlacementState::Pending),
            placed("e", "127.0.0.5", PlacementState::Ready),
        ];
        let slices = endpoint_slices(&es(ExposeType::ClusterIP), &placement).unwrap();
        let summary: Vec<(String, String, Vec<String>)> = slices
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap(),
                    s.address_type.clone(),
                    s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "chat-ipv4-0".into(),
                    "IPv4".into(),
                    vec!["192.0.2.1".into()]
                ),
                (
                    "chat-ipv6-0".into(),
                    "IPv6".into(),
                    vec!["2001:db8::3".into()]
                ),
            ]
        );
        let labels = slices[0].metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "chat");
        assert_eq!(
            labels["endpointslice.kubernetes.io/managed-by"],
            SLICE_MANAGER
        );
    }

    #[test]
    fn no_ready_node_means_one_empty_slice_and_many_mean_chunks() {
        let empty = endpoint_slices(&es(ExposeType::ClusterIP), &[]).unwrap();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].endpoints.is_empty());
        let many: Vec<NodePlacement> = (0..250)
            .map(|i| {
                placed(
                    &format!("n{i}"),
                    &format!("192.0.{}.{}", 2 + i / 200, i % 200 + 1),
                    PlacementState::Ready,
                )
            })
            .collect();
        let slices = endpoint_slices(&es(ExposeType::ClusterIP), &many).unwrap();
        let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
    }

    #[test]
    fn endpoint_addresses_kubernetes_refuses_are_left_out() {
        assert_eq!(endpoint_family("192.0.2.1"), Some("IPv4"));
        assert_eq!(endpoint_family("2001:db8::1"), Some("IPv6"));
        for bad in [
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "node-a",
            "",
        ] {
            assert_eq!(endpoint_family(bad), None, "{bad}");
        }
    }
}
