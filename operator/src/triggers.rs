//! Which Node and EdgeNode events are worth reconciling the EdgeServices
//! they concern. An agent's heartbeat changes its EdgeNode every few
//! seconds; passing each one on would reconcile every service that selects
//! the node, and with a thousand nodes the operator would fall behind its
//! own watch and judge live nodes stale from old heartbeats. So an event
//! passes only when something a service's status depends on changed:
//! labels, addresses, the services the agent reports, the node's Ready
//! condition, or whether its heartbeat is fresh (so a stale node coming back
//! is news at once). Freshness running out is the reconcile's own timer.
//! What the agent reports on one service is news for that service alone.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use edgewire_api::crd::{EdgeNode, EdgeService};
use k8s_openapi::api::core::v1::Node;

/// What every EdgeService that selects or runs on a node reads from its
/// EdgeNode, as a hash; `fresh` is whether its heartbeat is fresh now. The
/// agent's reports of single services are left out (see `service_reports`),
/// and so are connection counts: they change all the time, and status takes
/// them up on its own schedule.
pub fn edge_node_digest(en: &EdgeNode, fresh: bool) -> u64 {
    let mut h = DefaultHasher::new();
    fresh.hash(&mut h);
    en.metadata.labels.hash(&mut h);
    en.spec.address.hash(&mut h);
    en.spec.mesh_port.hash(&mut h);
    en.spec.mesh_public_key.hash(&mut h);
    if let Some(status) = &en.status {
        for c in status.conditions.iter().filter(|c| c.type_ == "Ready") {
            c.status.hash(&mut h);
        }
    }
    h.finish()
}

/// What one EdgeService's status reads of the agent's report on it, as a
/// hash per service (`namespace/name`): only that service is concerned when
/// it changes, not every service that selects the node.
pub fn service_reports(en: &EdgeNode) -> HashMap<String, u64> {
    let Some(status) = &en.status else {
        return HashMap::new();
    };
    status
        .services
        .iter()
        .map(|s| {
            let mut h = DefaultHasher::new();
            (s.listening, &s.error).hash(&mut h);
            for m in &s.modules {
                (&m.handler, &m.digest, &m.reason).hash(&mut h);
            }
            (format!("{}/{}", s.namespace, s.name), h.finish())
        })
        .collect()
}

/// Which EdgeServices an EdgeNode event concerns.
#[derive(Debug, PartialEq, Eq)]
pub enum Concern {
    /// Every service that selects the node or runs on it.
    All,
    /// Only these (`namespace/name`): the agent's report on them changed.
    Services(Vec<String>),
}

/// An EdgeNode's digest, and the digest of its report per service.
type NodeDigests = (u64, HashMap<String, u64>);

/// The last digests seen per EdgeNode.
#[derive(Debug, Default)]
pub struct EdgeNodeChanges {
    seen: Mutex<HashMap<String, NodeDigests>>,
}

impl EdgeNodeChanges {
    /// What this event is news for: everything when the node is new, gone
    /// (`exists` false) or changed in what every service reads; else the
    /// services whose report appeared, changed or went.
    pub fn changed(&self, en: &EdgeNode, fresh: bool, exists: bool) -> Concern {
        let name = en.metadata.name.clone().unwrap_or_default();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !exists {
            seen.remove(&name);
            return Concern::All;
        }
        let now = (edge_node_digest(en, fresh), service_reports(en));
        let Some(before) = seen.insert(name, now.clone()) else {
            return Concern::All;
        };
        if before.0 != now.0 {
            return Concern::All;
        }
        let mut keys: Vec<String> = now
            .1
            .iter()
            .filter(|(k, d)| before.1.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .chain(before.1.keys().filter(|k| !now.1.contains_key(*k)).cloned())
            .collect();
        keys.sort_unstable();
        Concern::Services(keys)
    }
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

    fn services(concern: Concern) -> Vec<String> {
        match concern {
            Concern::Services(keys) => keys,
            Concern::All => panic!("the whole node was news"),
        }
    }

    #[test]
    fn a_heartbeat_alone_is_not_news_but_what_status_reads_is() {
        let changes = EdgeNodeChanges::default();
        assert_eq!(
            changes.changed(&node(100, true, "True"), true, true),
            Concern::All
        );
        assert!(services(changes.changed(&node(110, true, "True"), true, true)).is_empty());
        // The report on one service concerns that service alone.
        assert_eq!(
            services(changes.changed(&node(120, false, "True"), true, true)),
            ["ns/svc"]
        );
        // Connection counts alone are not news either.
        let mut busier = node(130, false, "True");
        if let Some(status) = busier.status.as_mut() {
            status.services[0].connections = 500;
            status.connections = 500;
        }
        assert!(services(changes.changed(&busier, true, true)).is_empty());
        // A report gone concerns its service too.
        let mut none = node(140, false, "True");
        if let Some(status) = none.status.as_mut() {
            status.services.clear();
        }
        assert_eq!(services(changes.changed(&none, true, true)), ["ns/svc"]);
        // What every service reads: Ready, freshness (a stale node
        // heartbeating again), labels; and the node going.
        assert_eq!(
            changes.changed(&node(150, false, "False"), true, true),
            Concern::All
        );
        assert_eq!(
            changes.changed(&node(160, false, "False"), false, true),
            Concern::All
        );
        let mut relabelled = node(170, false, "False");
        relabelled.metadata.labels = Some([("zone".to_string(), "b".to_string())].into());
        assert_eq!(changes.changed(&relabelled, false, true), Concern::All);
        assert_eq!(changes.changed(&relabelled, false, false), Concern::All);
        assert_eq!(changes.changed(&relabelled, false, true), Concern::All);
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
