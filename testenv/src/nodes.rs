//! Simulated nodes: Node objects that kwok takes over and keeps ready.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec as NodeObjectSpec, NodeStatus};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::Error;

/// The annotation kwok is started to manage nodes by.
pub const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// A node to simulate: its name, labels, and the address it reports.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The node's InternalIP. Tests give each simulated edge node its own
    /// loopback address (127.0.0.x), where its agent listens.
    pub internal_ip: Option<String>,
    /// The node's `spec.podCIDR`: kwok gives the pods it runs there
    /// addresses from it (from one shared /24 when unset).
    pub pod_cidr: Option<String>,
}

impl NodeSpec {
    pub fn new(name: impl Into<String>) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            ..NodeSpec::default()
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> NodeSpec {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn internal_ip(mut self, ip: impl Into<String>) -> NodeSpec {
        self.internal_ip = Some(ip.into());
        self
    }

    pub fn pod_cidr(mut self, cidr: impl Into<String>) -> NodeSpec {
        self.pod_cidr = Some(cidr.into());
        self
    }

    /// The Node object to create.
    pub fn to_node(&self) -> Node {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), self.name.clone());
        labels.insert("type".into(), "kwok".into());
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    KWOK_ANNOTATION.to_string(),
                    "fake".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: self.pod_cidr.as_ref().map(|cidr| NodeObjectSpec {
                pod_cidr: Some(cidr.clone()),
                pod_cidrs: Some(vec![cidr.clone()]),
                ..NodeObjectSpec::default()
            }),
            status: self.internal_ip.as_ref().map(|ip| NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.clone(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: self.name.clone(),
                    },
                ]),
                ..NodeStatus::default()
            }),
        }
    }
}

/// Creates the nodes; kwok marks them Ready within a second or two.
pub async fn add_nodes(client: &kube::Client, nodes: &[NodeSpec]) -> Result<(), Error> {
    let api: Api<Node> = Api::all(client.clone());
    for node in nodes {
        api.create(&PostParams::default(), &node.to_node())
            .await
            .map_err(Error::Kube)?;
    }
    Ok(())
}

/// Whether a node reports Ready=True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
