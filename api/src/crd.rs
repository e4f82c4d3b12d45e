//! The CRDs: `EdgeService` (what to run, where) and `EdgeNode` (what an agent
//! reports about its node). Admission checks what one object can check on its
//! own (OpenAPI bounds and CEL rules); conflicts between objects are the
//! operator's to report.

// Each `printcolumn(...)` repeats `type_ = ...`, which clippy takes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::auth::AuthSpec;
use crate::config::{ChannelSpec, HandlerSpec, Limits};
use crate::hub::HubSpec;

pub const GROUP: &str = "edgewire.dev";

/// An edge service: a port on each chosen edge node serving handlers,
/// channels and the relay, with a Service routing clients to the ready nodes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "edgewire.dev",
    version = "v1alpha1",
    kind = "EdgeService",
    namespaced,
    shortname = "es",
    category = "edgewire",
    status = "EdgeServiceStatus",
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.nodes",
        description = "ready/desired nodes"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.handlers.all(h, self.handlers.exists_one(o, o.name == h.name))").message("handler names must be unique").field_path(".handlers"),
    validation = Rule::new("self.handlers.all(h, !has(h.path) || self.handlers.exists_one(o, has(o.path) && o.path == h.path))").message("handler paths must be unique").field_path(".handlers"),
    validation = Rule::new("self.handlers.all(h, !has(h.path) || h.path != self.relayPath)").message("a handler path may not be the relay path").field_path(".handlers"),
    validation = Rule::new("self.channels.all(c, self.channels.exists_one(o, o.name == c.name))").message("channel names must be unique").field_path(".channels"),
    validation = Rule::new("!has(self.auth) || (has(self.auth.keySecret) && !has(self.auth.keyFile))").message("auth takes its key from keySecret (a Secret in this namespace), never from a file on the node").field_path(".auth"),
    validation = Rule::new("self.handlers.all(h, !has(h.module) || !has(h.module.file))").message("a wasm module comes from configMap or image, never from a file on the node (module.file is the standalone agent's)").field_path(".handlers"),
    validation = Rule::new("self.handlers.all(h, !has(h.upstream) || !has(h.upstream.caFile))").message("an upstream's CA is never read from a file on the node (upstream.caFile is the standalone agent's)").field_path(".handlers"),
    validation = Rule::new("!has(self.hub) || (!has(self.hub.tokenFile) && !has(self.hub.caFile) && !has(self.hub.credentialsFile))").message("a hub's token, CA and credentials come from tokenSecret, caSecret and credentialsSecret (Secrets in this namespace), never from files on the node (hub.tokenFile, hub.caFile and hub.credentialsFile are the standalone agent's)").field_path(".hub"),
    validation = Rule::new("!has(self.hub) || self.channels.exists(c, (has(c.uplink) && c.uplink) || (has(c.downlink) && c.downlink))").message("a hub needs a channel marked uplink or downlink").field_path(".hub"),
    validation = Rule::new("has(self.hub) || self.channels.all(c, !(has(c.uplink) && c.uplink) && !(has(c.downlink) && c.downlink))").message("uplink and downlink need the service's hub").field_path(".channels")
)]
pub struct EdgeServiceSpec {
    /// Labels a node must have to run this service (all must match).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub placement: Placement,
    /// The port the service listens on at each node (the agent uses host networking).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub handlers: Vec<HandlerSpec>,
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub channels: Vec<ChannelSpec>,
    #[serde(default = "default_relay_path")]
    #[schemars(regex(pattern = r"^/[^?#\s]*$"), length(max = 256))]
    pub relay_path: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub expose: Expose,
    /// Client authentication with JWTs, its key from `keySecret` (a Secret
    /// in this namespace). Absent: every client is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Serve `wss://` and `https://` only, with the certificate of a Secret
    /// in this namespace. Absent: plain `ws://` and `http://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServiceTls>,
    /// A hub the channels marked `uplink`/`downlink` are bridged to, its
    /// token (`tokenSecret`) and CA (`caSecret`) from Secrets in this
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubSpec>,
}

/// The Secret key holding a `kubernetes.io/tls` Secret's certificate chain.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// The Secret key holding a `kubernetes.io/tls` Secret's private key.
pub const TLS_PRIVATE_KEY: &str = "tls.key";

/// Client TLS of an EdgeService.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTls {
    /// A `kubernetes.io/tls` Secret (what cert-manager writes): `tls.crt`,
    /// the certificate then any intermediates, and `tls.key`, its private
    /// key, both PEM. A renewed certificate is served to new connections.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Every Secret the spec names, all in the EdgeService's namespace: what its
/// agents may read (and nothing else). Each field that names a Secret feeds
/// this one function: those whose keys the agents store as files
/// ([`EdgeServiceSpec::stored_secret_keys`]), and the wasm modules'
/// `imagePullSecret`.
pub fn referenced_secrets(spec: &EdgeServiceSpec) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = spec
        .stored_secret_keys()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.extend(spec.image_pull_secrets().into_iter().map(str::to_string));
    names
}

impl EdgeServiceSpec {
    /// The (Secret, key) pairs of this namespace whose bytes the agents
    /// store as files for the service to read: the `tls` pair, the token
    /// key `auth.keySecret`, the hub's `tokenSecret`, `caSecret` and
    /// `credentialsSecret`, and each upstream handler's `caSecret`.
    pub fn stored_secret_keys(&self) -> Vec<(String, String)> {
        let mut keys = Vec::new();
        if let Some(tls) = &self.tls {
            for key in [TLS_CERT_KEY, TLS_PRIVATE_KEY] {
                keys.push((tls.secret_name.clone(), key.to_string()));
            }
        }
        let auth_key = self.auth.as_ref().and_then(|a| a.key_secret.as_ref());
        let hub = self
            .hub
            .iter()
            .flat_map(|h| h.secret_refs())
            .map(|(_, s)| s);
        let upstream_cas = self
            .handlers
            .iter()
            .map(|h| h.upstream.as_ref().and_then(|u| u.ca_secret.as_ref()));
        for secret in std::iter::once(auth_key)
            .chain(hub)
            .chain(upstream_cas)
            .flatten()
        {
            keys.push((secret.name.clone(), secret.key.clone()));
        }
        keys
    }

    /// The Secrets (in the EdgeService's namespace) that its Wasm modules are
    /// pulled with, `module.imagePullSecret`: the agents placed for it need to
    /// read these, and no other Secret, for its modules.
    pub fn image_pull_secrets(&self) -> BTreeSet<&str> {
        self.handlers
            .iter()
            .filter_map(|h| h.module.as_ref()?.image_pull_secret.as_deref())
            .collect()
    }
}

fn default_relay_path() -> String {
    "/relay".into()
}

/// Where, among the matching ready nodes, the service runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// At most this many nodes; all matching nodes when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_nodes: Option<i32>,
    /// A node label (e.g. `topology.kubernetes.io/zone`) to spread the nodes
    /// over: the chosen nodes are balanced across its values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 316))]
    pub spread_by: Option<String>,
}

/// How clients inside and outside the cluster reach the service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Expose {
    #[serde(default, rename = "type")]
    pub type_: ExposeType,
    /// For NodePort and LoadBalancer: a fixed node port; assigned when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExposeType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ExposeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExposeType::ClusterIP => "ClusterIP",
            ExposeType::NodePort => "NodePort",
            ExposeType::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Placed` and `Degraded`, each with a reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub desired_nodes: i32,
    #[serde(default)]
    pub ready_nodes: i32,
    /// `ready/desired`, for `kubectl get es`.
    #[serde(default)]
    pub nodes: String,
    /// The placed nodes, for people: every one while there are at most
    /// 100, else the 100 a reader most needs (those not Ready first). The
    /// whole placement is in the service's PlacementSlices.
    #[serde(default)]
    pub placement: Vec<NodePlacement>,
    /// Open client connections summed over the placed nodes.
    #[serde(default)]
    pub connections: i64,
    /// The Wasm module digests the placed nodes report, per handler, with
    /// how many nodes serve each (two digests while a new one rolls out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ServiceModule>,
}

/// One module digest of a `wasm` handler and the nodes serving it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceModule {
    pub handler: String,
    pub digest: String,
    pub nodes: i32,
}

/// One node the service is placed on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePlacement {
    pub node: String,
    /// Where clients reach the service on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub state: PlacementState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The node's mesh public key, from its EdgeNode: the key the other
    /// placed agents require of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_public_key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlacementState {
    /// Placed; the agent has not reported the service listening yet.
    Pending,
    /// Listening, and the node's heartbeat is fresh.
    Ready,
    /// The node's heartbeat is stale: out of the endpoints until it returns.
    Stale,
    /// The agent reported an error (e.g. port in use).
    Failed,
}

/// A bounded part of an EdgeService's placement: the nodes it runs on, at
/// most a few hundred per object, as EndpointSlices split a Service's
/// endpoints. The operator writes them (owned by the EdgeService, labelled
/// `edgewire.dev/edgeservice`); agents read them to learn what runs on their
/// node and who their mesh peers are. So a service on ten thousand nodes
/// never needs one object near etcd's size limit, and a change on one node
/// rewrites one slice, not the whole list.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "edgewire.dev",
    version = "v1alpha1",
    kind = "PlacementSlice",
    namespaced,
    shortname = "epl",
    category = "edgewire",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSliceSpec {
    /// The EdgeService, in the same namespace, these nodes run.
    pub service: String,
    /// The nodes, by name; each node appears in one slice of its service.
    #[serde(default)]
    pub nodes: Vec<NodePlacement>,
}

/// What the agent on one node reports: one per node, named after the node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "edgewire.dev",
    version = "v1alpha1",
    kind = "EdgeNode",
    shortname = "en",
    category = "edgewire",
    status = "EdgeNodeStatus",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Services",
        type_ = "integer",
        json_path = ".status.serviceCount"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections"
    ),
    printcolumn(
        name = "Last Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat"
    ),
    printcolumn(
        name = "Address",
        type_ = "string",
        json_path = ".spec.address",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeSpec {
    /// The address clients and peer agents reach this node's agent at.
    pub address: String,
    /// The port of the agent's mesh listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub mesh_port: Option<i32>,
    /// The agent's mesh public key (X25519, 64 hex digits); its private key
    /// never leaves the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub mesh_public_key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeStatus {
    /// When the agent last wrote this status, by its own clock. An agent
    /// with a node Lease writes it when what it reports changes (and every
    /// few minutes); its heartbeat is the Lease. The operator treats the
    /// node as ready while it has seen either change recently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub services: Vec<NodeService>,
    #[serde(default)]
    pub service_count: i32,
    #[serde(default)]
    pub connections: i64,
    /// `Ready`, written by the operator from heartbeat freshness.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One EdgeService as its agent runs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeService {
    pub namespace: String,
    pub name: String,
    pub listening: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub connections: i64,
    /// Each `wasm` handler's module on this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<NodeModule>,
}

/// A `wasm` handler's module as one agent runs it: the digest in use (for
/// an image, its manifest digest), or why there is none (`reason`:
/// `ModulePullFailed`, `ModuleInvalid`, `ModuleMissingExport`,
/// `ModuleUnsupportedImport`); `ModuleDigestMismatch` may stand beside the
/// digest still served when the image now resolves to another one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeModule {
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn the_pull_secrets_a_spec_names() {
        let spec: EdgeServiceSpec = serde_json::from_value(serde_json::json!({
            "port": 8080,
            "handlers": [
                {"name": "a", "kind": "wasm", "module": {"image": "r/a:1", "imagePullSecret": "creds"}},
                {"name": "b", "kind": "wasm", "module": {"image": "r/b:1", "imagePullSecret": "creds"}},
                {"name": "c", "kind": "wasm", "module": {"image": "r/c:1", "imagePullSecret": "other"}},
                {"name": "d", "kind": "wasm", "module": {"image": "public/d:1"}},
                {"name": "e", "kind": "echo"}
            ]
        }))
        .unwrap();
        assert_eq!(
            spec.image_pull_secrets().into_iter().collect::<Vec<_>>(),
            vec!["creds", "other"]
        );
    }

    #[test]
    fn crds_carry_names_columns_and_validation() {
        let es = serde_json::to_string(&EdgeService::crd()).unwrap();
        for needle in [
            r#""shortNames":["es"]"#,
            r#""scope":"Namespaced""#,
            "handler names must be unique",
            "handler paths must be unique",
            r#""maximum":65535"#,
            r#""enum":["echo","add","wasm","upstream"]"#,
            r#""jsonPath":".status.nodes""#,
        ] {
            assert!(es.contains(needle), "EdgeService CRD lacks {needle}");
        }
        assert!(es.contains("auth takes its key from keySecret"));
        for needle in [
            r#""tokenSecret""#,
            r#""caSecret""#,
            r#""uplink""#,
            r#""downlink""#,
            "a hub needs a channel marked uplink or downlink",
        ] {
            assert!(es.contains(needle), "EdgeService CRD lacks {needle}");
        }
        let en = serde_json::to_string(&EdgeNode::crd()).unwrap();
        assert!(en.contains(r#""scope":"Cluster""#));
        assert!(en.contains(r#""name":"Last Heartbeat""#));
    }

    #[test]
    fn referenced_secrets_are_the_tls_auth_key_and_pull_secrets() {
        let spec: EdgeServiceSpec = serde_yaml_ng::from_str(
            "port: 8443\ntls: {secretName: web-tls}\nauth: {algorithm: HS256, keySecret: {name: jwt, key: secret}}\nhandlers:\n  - {name: f, kind: wasm, path: /f, module: {image: 'registry.example/f:1', imagePullSecret: regcred}}\n",
        )
        .unwrap();
        assert_eq!(
            referenced_secrets(&spec),
            BTreeSet::from([
                "jwt".to_string(),
                "regcred".to_string(),
                "web-tls".to_string()
            ])
        );
        let plain: EdgeServiceSpec = serde_yaml_ng::from_str("port: 80\n").unwrap();
        assert!(referenced_secrets(&plain).is_empty());
        let linked: EdgeServiceSpec = serde_yaml_ng::from_str(
            "port: 80\nchannels: [{name: t, uplink: true}]\nhub: {url: 'wss://h/relay', tokenSecret: {name: hub-token, key: token}, caSecret: {name: hub-ca, key: ca.crt}}\nhandlers: [{name: u, kind: upstream, upstream: {url: 'https://c/u', caSecret: {name: cloud-ca, key: ca.pem}}}]\n",
        )
        .unwrap();
        assert_eq!(
            referenced_secrets(&linked),
            BTreeSet::from([
                "cloud-ca".to_string(),
                "hub-ca".to_string(),
                "hub-token".to_string()
            ])
        );
        let example: EdgeService =
            serde_yaml_ng::from_str(include_str!("../../examples/edgeservice-tls.yaml")).unwrap();
        assert_eq!(
            referenced_secrets(&example.spec),
            BTreeSet::from(["telemetry-jwt".to_string(), "telemetry-tls".to_string()])
        );
    }
}
