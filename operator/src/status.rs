//! EdgeService status as a pure function of the placement decision and what
//! each placed node's agent reports. Conditions keep their transition time
//! while their status does not change, so an unchanged world writes nothing.

use std::collections::BTreeMap;

use edgewire_api::crd::{
    EdgeServiceStatus, NodeModule, NodePlacement, PlacementState, ServiceModule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::desired::endpoint_family;
use crate::placement::Decision;

/// What the operator knows about one placed node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub address: Option<String>,
    /// The agent's mesh public key, from its EdgeNode (which only that
    /// node's agent may write).
    pub mesh_public_key: Option<String>,
    pub fresh: bool,
    /// The agent's report on this EdgeService: listening, error, connections.
    pub service: Option<(bool, Option<String>, i64)>,
    /// The agent's `wasm` handler modules for this EdgeService.
    pub modules: Vec<NodeModule>,
}

/// The module digests the placed nodes serve, per handler, with how many
/// nodes serve each.
fn module_digests(nodes: &[String], reports: &BTreeMap<String, NodeReport>) -> Vec<ServiceModule> {
    let mut counts: BTreeMap<(&str, &str), i32> = BTreeMap::new();
    for report in nodes.iter().filter_map(|n| reports.get(n)) {
        for m in &report.modules {
            if let Some(digest) = m.digest.as_deref() {
                *counts.entry((m.handler.as_str(), digest)).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|((handler, digest), nodes)| ServiceModule {
            handler: handler.into(),
            digest: digest.into(),
            nodes,
        })
        .collect()
}

/// The first `wasm` module a placed node reports unusable: (node, reason,
/// handler, message). Such a handler answers 503 there; the rest serves.
fn module_problem<'a>(
    nodes: &'a [String],
    reports: &'a BTreeMap<String, NodeReport>,
) -> Option<(&'a str, &'a str, &'a str, &'a str)> {
    nodes.iter().find_map(|node| {
        reports.get(node)?.modules.iter().find_map(|m| {
            Some((
                node.as_str(),
                m.reason.as_deref()?,
                m.handler.as_str(),
                m.message.as_deref().unwrap_or_default(),
            ))
        })
    })
}

fn placement_of(node: &str, report: Option<&NodeReport>) -> NodePlacement {
    let (state, message) = match report {
        None => (
            PlacementState::Pending,
            Some("no EdgeNode for this node yet".to_string()),
        ),
        Some(r) if !r.fresh => (
            PlacementState::Stale,
            Some("agent heartbeat is stale".to_string()),
        ),
        Some(r) => match &r.service {
            Some((true, _, _)) => (PlacementState::Ready, None),
            Some((false, Some(error), _)) => (PlacementState::Failed, Some(error.clone())),
            _ => (
                PlacementState::Pending,
                Some("waiting for the agent to start the service".to_string()),
            ),
        },
    };
    NodePlacement {
        node: node.to_string(),
        address: report.and_then(|r| r.address.clone()),
        state,
        message,
        mesh_public_key: report.and_then(|r| r.mesh_public_key.clone()),
    }
}

fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether `new` differs from `old` in the connection count alone.
pub fn only_connections_differ(old: &EdgeServiceStatus, new: &EdgeServiceStatus) -> bool {
    old.connections != new.connections
        && *old
            == (EdgeServiceStatus {
                connections: old.connections,
                ..new.clone()
            })
}

/// The Degraded reason for a Service in the EdgeService's name that it does
/// not own.
pub const SERVICE_CONFLICT: &str = "ServiceConflict";

/// Marks `status` Degraded because the EdgeService's Service name is taken by
/// a Service it does not own (`message` names it). This outranks every
/// other Degraded reason: clients cannot reach the service through the
/// cluster at all.
pub fn service_conflict(
    status: &mut EdgeServiceStatus,
    old: Option<&EdgeServiceStatus>,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    mark_degraded(status, old, SERVICE_CONFLICT, message, generation, now);
}

/// Marks `status` Degraded for `reason`, in place of the reason it was
/// computed with.
pub fn mark_degraded(
    status: &mut EdgeServiceStatus,
    old: Option<&EdgeServiceStatus>,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let degraded = condition(
        old_conditions,
        "Degraded",
        true,
        reason,
        message.to_string(),
        generation,
        now,
    );
    match status.conditions.iter_mut().find(|c| c.type_ == "Degraded") {
        Some(c) => *c = degraded,
        None => status.conditions.push(degraded),
    }
}

/// The status to write. `old` is the current status (for transition times).
pub fn compute(
    decision: &Decision,
    reports: &BTreeMap<String, NodeReport>,
    old: Option<&EdgeServiceStatus>,
    generation: Option<i64>,
    now: &Time,
) -> EdgeServiceStatus {
    let placement: Vec<NodePlacement> = decision
        .nodes
        .iter()
        .map(|n| placement_of(n, reports.get(n)))
        .collect();
    let desired = placement.len() as i32;
    let ready = placement
        .iter()
        .filter(|p| p.state == PlacementState::Ready)
        .count() as i32;
    let connections = decision
        .nodes
        .iter()
        .filter_map(|n| reports.get(n)?.service.as_ref().map(|s| s.2))
        .sum();
    let count = |state| {
        placement
            .iter()
            .filter(|p| p.state == state)
            .map(|p| p.node.as_str())
            .collect::<Vec<_>>()
    };
    let stale = count(PlacementState::Stale);
    let failed = count(PlacementState::Failed);
    let unroutable: Vec<&str> = placement
        .iter()
        .filter(|p| {
            p.state == PlacementState::Ready
                && p.address.as_deref().and_then(endpoint_family).is_none()
        })
        .map(|p| p.node.as_str())
        .collect();

    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conflicts = || {
        decision
            .conflicts
            .iter()
            .map(|(node, owner)| format!("{node} (port held by {owner})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let placed = if desired > 0 {
        condition(
            old_conditions,
            "Placed",
            true,
            "Placed",
            format!("placed on {desired} node(s)"),
            generation,
            now,
        )
    } else if !decision.conflicts.is_empty() {
        condition(
            old_conditions,
            "Placed",
            false,
            "PortConflict",
            format!("every eligible node has a port conflict: {}", conflicts()),
            generation,
            now,
        )
    } else {
        condition(
            old_conditions,
            "Placed",
            false,
            "NoEligibleNodes",
            "no ready edge node matches the node selector".into(),
            generation,
            now,
        )
    };
    let ready_condition = if desired > 0 && ready == desired {
        condition(
            old_conditions,
            "Ready",
            true,
            "AllNodesReady",
            format!("{ready} of {desired} node(s) serving"),
            generation,
            now,
        )
    } else if desired == 0 {
        condition(
            old_conditions,
            "Ready",
            false,
            "NotPlaced",
            "the service is placed on no node".into(),
            generation,
            now,
        )
    } else {
        condition(
            old_conditions,
            "Ready",
            false,
            "NodesNotReady",
            format!("{ready} of {desired} node(s) serving"),
            generation,
            now,
        )
    };
    let (degraded, reason, message) = if !decision.conflicts.is_empty() {
        (
            true,
            "PortConflict",
            format!("not placed on {}", conflicts()),
        )
    } else if !failed.is_empty() {
        (
            true,
            "ListenFailed",
            format!(
                "the agent could not start the service on {}",
                failed.join(", ")
            ),
        )
    } else if let Some((node, reason, handler, message)) = module_problem(&decision.nodes, reports)
    {
        (
            true,
            reason,
            format!("handler {handler} on {node}: {message}"),
        )
    } else if !stale.is_empty() {
        (
            true,
            "NodeStale",
            format!(
                "heartbeat stale, out of the endpoints: {}",
                stale.join(", ")
            ),
        )
    } else if !unroutable.is_empty() {
        (
            true,
            "InvalidAddress",
            format!(
                "address not usable in EndpointSlices (loopback, link-local...): {}",
                unroutable.join(", ")
            ),
        )
    } else {
        (
            false,
            "AsExpected",
            "all placed nodes are healthy".to_string(),
        )
    };
    let degraded = condition(
        old_conditions,
        "Degraded",
        degraded,
        reason,
        message,
        generation,
        now,
    );

    EdgeServiceStatus {
        observed_generation: generation,
        conditions: vec![ready_condition, placed, degraded],
        desired_nodes: desired,
        ready_nodes: ready,
        nodes: format!("{ready}/{desired}"),
        modules: module_digests(&decision.nodes, reports),
        placement,
        connections,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn report(fresh: bool, service: Option<(bool, Option<String>, i64)>) -> NodeReport {
        NodeReport {
            address: Some("192.0.2.1".into()),
            mesh_public_key: None,
            fresh,
            service,
            modules: Vec::new(),
        }
    }

    fn cond<'a>(s: &'a EdgeServiceStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn an_unusable_module_degrades_with_its_reason() {
        let decision = Decision {
            nodes: vec!["a".into(), "b".into()],
            ..Decision::default()
        };
        let mut b = report(true, Some((true, None, 0)));
        b.modules = vec![
            NodeModule {
                handler: "ok".into(),
                digest: Some("sha256:00".into()),
                reason: None,
                message: None,
            },
            NodeModule {
                handler: "filter".into(),
                digest: None,
                reason: Some("ModuleMissingExport".into()),
                message: Some("no wasi:http/incoming-handler".into()),
            },
        ];
        let reports = BTreeMap::from([
            ("a".to_string(), report(true, Some((true, None, 0)))),
            ("b".to_string(), b),
        ]);
        let s = compute(&decision, &reports, None, Some(1), &time(10));
        let degraded = cond(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ModuleMissingExport")
        );
        assert!(
            degraded.message.contains("filter on b"),
            "{}",
            degraded.message
        );
        assert_eq!(
            cond(&s, "Ready").status,
            "True",
            "the service still listens"
        );
    }

    #[test]
    fn module_digests_are_summed_per_handler() {
        let decision = Decision {
            nodes: vec!["a".into(), "b".into(), "c".into()],
            ..Decision::default()
        };
        let module = |digest: &str| NodeModule {
            handler: "add".into(),
            digest: Some(digest.into()),
            reason: None,
            message: None,
        };
        let reports: BTreeMap<String, NodeReport> =
            [("a", "sha256:01"), ("b", "sha256:02"), ("c", "sha256:02")]
                .into_iter()
                .map(|(node, digest)| {
                    let mut r = report(true, Some((true, None, 0)));
                    r.modules = vec![module(digest)];
                    (node.to_string(), r)
                })
                .collect();
        let s = compute(&decision, &reports, None, Some(1), &time(10));
        let summary: Vec<(&str, &str, i32)> = s
            .modules
            .iter()
            .map(|m| (m.handler.as_str(), m.digest.as_str(), m.nodes))
            .collect();
        assert_eq!(
            summary,
            vec![("add", "sha256:01", 1), ("add", "sha256:02", 2)]
        );
    }

    #[test]
    fn all_ready() {
        let decision = Decision {
            nodes: vec!["a".into(), "b".into()],
            ..Decision::default()
        };
        let reports = BTreeMap::from([
            ("a".to_string(), report(true, Some((true, None, 3)))),
            ("b".to_string(), report(true, Some((true, None, 4)))),
        ]);
        let s = compute(&decision, &reports, None, Some(2), &time(10));
        assert_eq!(
            (
                s.desired_nodes,
                s.ready_nodes,
                s.nodes.as_str(),
                s.connections
            ),
            (2, 2, "2/2", 7)
        );
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Degraded").reason, "AsExpected");
        assert_eq!(cond(&s, "Ready").observed_generation, Some(2));
    }

    #[test]
    fn each_placed_node_carries_the_mesh_key_its_edgenode_publishes() {
        let decision = Decision {
            nodes: vec!["a".into(), "b".into(), "c".into()],
            ..Decision::default()
        };
        let key = "ab".repeat(32);
        let reports = BTreeMap::from([
            (
                "a".to_string(),
                NodeReport {
                    mesh_public_key: Some(key.clone()),
                    ..report(true, Some((true, None, 0)))
                },
            ),
            ("b".to_string(), report(true, Some((true, None, 0)))),
        ]);
        let s = compute(&decision, &reports, None, Some(1), &time(10));
        let keys: Vec<Option<&str>> = s
            .placement
            .iter()
            .map(|p| p.mesh_public_key.as_deref())
            .collect();
        assert_eq!(keys, [Some(key.as_str()), None, None]);
    }

    #[test]
    fn stale_failed_and_pending_nodes() {
        let decision = Decision {
            nodes: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            ..Decision::default()
        };
        let reports = BTreeMap::from([
            ("a".to_string(), report(false, Some((true, None, 1)))),
            (
                "b".to_string(),
                report(true, Some((false, Some("address in use".into()), 0))),
            ),
            ("c".to_string(), report(true, None)),
        ]);
        let s = compute(&decision, &reports, None, Some(1), &time(10));
        let states: Vec<PlacementState> = s.placement.iter().map(|p| p.state).collect();
        use PlacementState::*;
        assert_eq!(states, [Stale, Failed, Pending, Pending]);
        assert_eq!(cond(&s, "Ready").reason, "NodesNotReady");
        assert_eq!(cond(&s, "Degraded").reason, "ListenFailed");
        assert!(cond(&s, "Degraded").message.contains('b'));
    }

    #[test]
    fn conflicts_and_no_nodes() {
        let decision = Decision {
            nodes: vec![],
            conflicts: BTreeMap::from([("a".to_string(), "ns/older".to_string())]),
        };
        let s = compute(&decision, &BTreeMap::new(), None, Some(1), &time(10));
        assert_eq!(cond(&s, "Placed").reason, "PortConflict");
        assert_eq!(cond(&s, "Degraded").reason, "PortConflict");
        assert!(cond(&s, "Degraded").message.contains("ns/older"));
        let none = compute(
            &Decision::default(),
            &BTreeMap::new(),
            None,
            Some(1),
            &time(10),
        );
        assert_eq!(cond(&none, "Placed").reason, "NoEligibleNodes");
        assert_eq!(cond(&none, "Ready").reason, "NotPlaced");
    }

    #[test]
    fn transition_times_hold_while_nothing_changes() {
        let decision = Decision {
            nodes: vec!["a".into()],
            ..Decision::default()
        };
        let reports = BTreeMap::from([("a".to_string(), report(true, Some((true, None, 0))))]);
        let first = compute(&decision, &reports, None, Some(1), &time(10));
        let again = compute(&decision, &reports, Some(&first), Some(1), &time(99));
        assert_eq!(first, again, "same inputs, same status: nothing to write");
        let stale = BTreeMap::from([("a".to_string(), report(false, Some((true, None, 0))))]);
        let changed = compute(&decision, &stale, Some(&first), Some(1), &time(99));
        assert_eq!(cond(&changed, "Ready").last_transition_time, time(99));
    }

    #[test]
    fn a_connection_count_alone_is_told_apart() {
        let decision = Decision {
            nodes: vec!["a".into()],
            conflicts: BTreeMap::new(),
        };
        let with = |n| BTreeMap::from([("a".to_string(), report(true, Some((true, None, n))))]);
        let old = compute(&decision, &with(2), None, Some(1), &time(10));
        let busier = compute(&decision, &with(9), Some(&old), Some(1), &time(20));
        assert!(only_connections_differ(&old, &busier));
        assert!(!only_connections_differ(&old, &old));
        let stale = BTreeMap::from([("a".to_string(), report(false, Some((true, None, 9))))]);
        let changed = compute(&decision, &stale, Some(&old), Some(1), &time(20));
        assert!(!only_connections_differ(&old, &changed));
    }

    #[test]
    fn a_foreign_service_marks_the_status_degraded() {
        let decision = Decision {
            nodes: vec!["a".into()],
            conflicts: BTreeMap::new(),
        };
        let reports = BTreeMap::from([("a".to_string(), report(true, Some((true, None, 0))))]);
        let mut s = compute(&decision, &reports, None, Some(3), &time(10));
        service_conflict(&mut s, None, "Service ns/chat exists", Some(3), &time(10));
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", SERVICE_CONFLICT)
        );
        assert_eq!(degraded.observed_generation, Some(3));
        assert_eq!(
            s.conditions
                .iter()
                .filter(|c| c.type_ == "Degraded")
                .count(),
            1
        );
        // Unchanged on the next pass: same transition time.
        let mut again = compute(&decision, &reports, Some(&s), Some(3), &time(50));
        service_conflict(
            &mut again,
            Some(&s),
            "Service ns/chat exists",
            Some(3),
            &time(50),
        );
        assert_eq!(again, s);
    }
}
