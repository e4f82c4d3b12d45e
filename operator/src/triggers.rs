//! Which Node and EdgeNode events are worth reconciling the EdgeServices
//! they concern. An agent's heartbeat changes its EdgeNode every few
//! seconds; passing each one on would reconcile every service that selects
//! the node, and with a thousand nodes the operator would fall behind its
//! own watch and judge live nodes stale from old heartbeats. So an event
//! passes only when something a service's status depends on changed:
//! labels, addresses, the services the agent reports, the node's Ready
//! condition, or whether its heartbeat is fresh (so a stale node coming back
//! is news at once). Freshness running out is the reconcile's own timer.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use edgewire_api::crd::{EdgeNode, EdgeService};
use k8s_openapi::api::core::v1::Node;

/// What EdgeService status reads from an EdgeNode, as a hash; `fresh` is
/// whether its heartbeat is fresh now. Connection counts are left out: they
/// change all the time, and status takes them up on its own schedule.
pub fn edge_node_digest(en: &EdgeNode, fresh: bool) -> u64 {
    let mut h = DefaultHasher::new();
    fresh.hash(&mut h);
    en.metadata.labels.hash(&mut h);
    en.spec.address.hash(&mut h);
    en.spec.mesh_port.hash(&mut h);
    en.spec.mesh_public_key.hash(&mut h);
    if let Some(status) = &en.status {
        for s in &status.services {
            (&s.namespace, &s.name, s.listening, &s.error).hash(&mut h);
            for m in &s.modules {
                (&m.handler, &m.digest, &m.reason).hash(&mut h);
            }
        }
        for c in status.conditions.iter().filter(|c| c.type_ == "Ready") {
            c.status.hash(&mut h);
        }
    }
    h.finish()
}

/// What other EdgeServices' placement reads from an EdgeService object, as
/// a hash: its port, and whether it has decided on its latest spec (a
/// younger service on the port waits for that). The nodes it holds the
/// port on are in its PlacementSlices, whose changes trigger on their own.
pub fn claim_digest(es: &EdgeService) -> u64 {
    let mut h = DefaultHasher::new();
    es.spec.port.hash(&mut h);
    let decided = es.status.as_ref().and_then(|s| s.observed_generation) == es.metadata.generation;
    decided.hash(&mut h);
    h.finish()
}

/// What placement reads from a Node, as a hash: its labels and addresses.
pub fn node_digest(node: &Node) -> u64 {
    let mut h = DefaultHasher::new();
    node.metadata.labels.hash(&mut h);
    for a in node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
    {
        (&a.type_, &a.address).hash(&mut h);
    }
    h.finish()
}

/// The last digest seen per object name.
#[derive(Debug, Default)]
pub struct Changes {
    seen: Mutex<HashMap<String, u64>>,
}

impl Changes {
    /// Whether this event is news: the object is new, gone (`exists` false
    /// once the cache has dropped it), or its digest differs from the last.
    pub fn changed(&self, name: &str, digest: u64, exists: bool) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !exists {
            seen.remove(name);
            return true;
        }
        seen.insert(name.to_string(), digest) != Some(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewire_api::crd::{EdgeNodeSpec, EdgeNodeStatus, NodeService};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;

    fn node(beat: i64, listening: bool, ready: &str) -> EdgeNode {
        let mut en = EdgeNode::new(
            "n1",
            EdgeNodeSpec {
                address: "192.0.2.1".into(),
                mesh_port: None,
                mesh_public_key: None,
            },
        );
        en.status = Some(EdgeNodeStatus {
            last_heartbeat: Some(Time(Timestamp::from_second(beat).unwrap())),
            agent_version: None,
            services: vec![NodeService {
                namespace: "ns".into(),
                name: "svc".into(),
                listening,
                error: None,
                connections: 0,
                modules: Vec::new(),
            }],
            service_count: 1,
            connections: 0,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: "r".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::from_second(beat).unwrap()),
            }],
        });
        en
    }

    #[test]
    fn a_heartbeat_alone_is_not_news_but_what_status_reads_is() {
        let base = edge_node_digest(&node(100, true, "True"), true);
        assert_eq!(base, edge_node_digest(&node(110, true, "True"), true));
        assert_ne!(base, edge_node_digest(&node(110, false, "True"), true));
        assert_ne!(base, edge_node_digest(&node(110, true, "False"), true));
        // A stale node heartbeating again.
        assert_ne!(base, edge_node_digest(&node(110, true, "True"), false));
        // Connection counts alone are not news either.
        let mut busier = node(110, true, "True");
        if let Some(status) = busier.status.as_mut() {
            status.services[0].connections = 500;
            status.connections = 500;
        }
        assert_eq!(base, edge_node_digest(&busier, true));
        let mut relabelled = node(100, true, "True");
        relabelled.metadata.labels = Some([("zone".to_string(), "b".to_string())].into());
        assert_ne!(base, edge_node_digest(&relabelled, true));
    }

    #[test]
    fn changes_pass_new_changed_and_deleted_objects_once() {
        let changes = Changes::default();
        assert!(changes.changed("a", 1, true));
        assert!(!changes.changed("a", 1, true));
        assert!(changes.changed("a", 2, true));
        assert!(changes.changed("a", 2, false));
        assert!(changes.changed("a", 2, true));
    }
}
