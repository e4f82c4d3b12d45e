//! The EdgeNode controller: writes each EdgeNode's `Ready` condition from its
//! heartbeat's freshness (as the shared `HeartbeatClock` judges it), only
//! when it changes, and comes back when it will; and its `Degraded`
//! condition when the agent claims an address its Node does not have (with
//! a Warning Event: the claim is ignored). It also watches the agents' node
//! Leases, whose renewals are heartbeats: one that brings a node back is
//! news for its EdgeNode, ordinary renewals are not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewire_api::crd::EdgeNode;
use edgewire_api::node_lease;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::caches::WatchEvent;
use crate::controller::Scope;
use crate::desired::MANAGER;
use crate::events;
use crate::freshness::{HeartbeatClock, Source};
use crate::metrics::Metrics;
use crate::placement::Freshness;
use crate::triggers::{Changes, node_digest};
use crate::watch::WatchBackoff;

struct Ctx {
    client: Client,
    metrics: Metrics,
    clock: Arc<HeartbeatClock>,
    nodes: Store<Node>,
    recorder: Recorder,
}

/// Why an EdgeNode is Degraded because of its address.
pub const ADDRESS_NOT_ON_NODE: &str = "AddressNotOnNode";
pub const NODE_NOT_FOUND: &str = "NodeNotFound";

/// The Ready condition an EdgeNode should carry now, given how fresh its
/// heartbeat is, keeping the transition time of an unchanged status.
pub fn ready_condition(node: &EdgeNode, fresh: Freshness, now: Timestamp) -> Condition {
    let (status, reason, message) = match (
        fresh,
        node.status.as_ref().and_then(|s| s.last_heartbeat.as_ref()),
    ) {
        (Freshness::Fresh, _) => ("True", "HeartbeatFresh", "the agent reports in time"),
        (_, None) => ("False", "NeverReported", "the agent has not reported yet"),
        _ => (
            "False",
            "HeartbeatStale",
            "the agent has not reported within the heartbeat timeout",
        ),
    };
    let old = node.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == status)
    });
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: node.metadata.generation,
        last_transition_time: old.map_or(Time(now), |c| c.last_transition_time.clone()),
    }
}

/// The Degraded condition an EdgeNode should carry: True when its agent
/// claims an address that is not one of its Node's (the operator uses the
/// Node's own address instead) or when there is no such Node.
pub fn address_condition(edge: &EdgeNode, node: Option<&Node>, now: Timestamp) -> Condition {
    let (status, reason, message) = match node {
        None => (
            "True",
            NODE_NOT_FOUND,
            format!(
                "there is no Node named {}; the EdgeNode is not used",
                edge.name_any()
            ),
        ),
        Some(node) => {
            let decision = crate::address::decide(node, Some(&edge.spec.address));
            match decision.rejected_claim {
                Some(claim) => (
                    "True",
                    ADDRESS_NOT_ON_NODE,
                    format!(
                        "spec.address {claim} is not one of the Node's addresses ({}); endpoints use {}",
                        crate::address::node_ips(node).join(", "),
                        decision.address.as_deref().unwrap_or("none"),
                    ),
                ),
                None => (
                    "False",
                    "AddressOnNode",
                    "the address is one of the Node's".to_string(),
                ),
            }
        }
    };
    let old = edge.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == status)
    });
    Condition {
        type_: "Degraded".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: edge.metadata.generation,
        last_transition_time: old.map_or(Time(now), |c| c.last_transition_time.clone()),
    }
}

async fn reconcile(node: Arc<EdgeNode>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    let started = Instant::now();
    // While the EdgeNode watch is failing, no heartbeat can be seen: judge
    // nothing until it delivers again.
    if ctx.clock.behind() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let now = Timestamp::now();
    let (fresh, changes_in) = ctx.clock.freshness(&node);
    let condition = ready_condition(&node, fresh, now);
    let current = |type_: &str| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
    };
    // Until the Nodes have been listed a missing Node says nothing: keep
    // what Degraded says (Ready does not wait) and look again shortly.
    let nodes_listed = ctx.nodes.wait_until_ready().now_or_never().is_some();
    let own = ctx.nodes.get(&ObjectRef::new(&node.name_any()));
    let degraded = if nodes_listed || own.is_some() {
        Some(address_condition(&node, own.as_deref(), now))
    } else {
        current("Degraded").cloned()
    };
    let changes_in = if nodes_listed {
        changes_in
    } else {
        tracing::debug!(edgenode = %node.name_any(), "Nodes not listed yet; address check later");
        Some(changes_in.map_or(Duration::from_secs(1), |d| d.min(Duration::from_secs(1))))
    };
    let newly_degraded = degraded.as_ref().filter(|d| {
        d.status == "True"
            && current("Degraded").is_none_or(|c| c.status != "True" || c.reason != d.reason)
    });
    let mut result = Ok(());
    if current("Ready") != Some(&condition) || current("Degraded") != degraded.as_ref() {
        let api: Api<EdgeNode> = Api::all(ctx.client.clone());
        // The conditions list is atomic: apply all of them every time.
        let conditions: Vec<&Condition> = std::iter::once(&condition).chain(&degraded).collect();
        let patch = json!({
            "apiVersion": EdgeNode::api_version(&()),
            "kind": EdgeNode::kind(&()),
            "status": {"conditions": conditions},
        });
        result = api
            .patch_status(
                &node.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ctx.metrics.write("edgenode_status"));
        // Deleted since the cache saw it: nothing left to report on.
        if matches!(&result, Err(kube::Error::Api(e)) if e.code == 404) {
            return Ok(Action::await_change());
        }
        if let (true, Some(degraded)) = (result.is_ok(), newly_degraded) {
            let event = Event {
                type_: EventType::Warning,
                reason: degraded.reason.clone(),
                note: Some(degraded.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            };
            events::publish(&ctx.recorder, &ctx.metrics, &event, &node.object_ref(&())).await;
        }
    }
    ctx.metrics
        .reconciled("edgenode", started.elapsed(), result.is_err());
    result?;
    Ok(changes_in.map_or_else(Action::await_change, |d| {
        Action::requeue(d + Duration::from_millis(200))
    }))
}

/// The Node an event is news of for its EdgeNode: one whose addresses (or
/// labels) changed, or one gone. The kubelet rewrites its Node's status
/// every few seconds; reconciling every EdgeNode on each of those writes
/// would be most of this controller's work, for nothing it reads.
fn address_news(
    changes: &Changes,
    event: WatchEvent<Node>,
) -> Option<Result<Node, watcher::Error>> {
    match event {
        Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => changes
            .changed(&node.name_any(), node_digest(&node), true)
            .then_some(Ok(node)),
        Ok(watcher::Event::Delete(node)) => {
            changes.changed(&node.name_any(), 0, false);
            Some(Ok(node))
        }
        Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        Err(err) => Some(Err(err)),
    }
}

/// A Lease renewal is news for its EdgeNode only when it brings the node
/// back (or is its first sign of life): a stale node turns Ready again. Every
/// renewal is recorded in the clock, and the watch's health too.
fn renewal_news(
    clock: &HeartbeatClock,
    event: WatchEvent<Lease>,
) -> Option<Result<Lease, watcher::Error>> {
    clock.watch_event(Source::Lease, &event);
    match event {
        Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
            let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0.to_string();
            let revived = clock.observe_lease(node_lease::node(&lease.name_any())?, renewed);
            revived.then_some(Ok(lease))
        }
        // A deleted Lease simply stops being renewed.
        Ok(watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitDone) => None,
        Err(err) => Some(Err(err)),
    }
}

fn error_policy(_node: Arc<EdgeNode>, err: &kube::Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "edgenode reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

pub async fn run(
    client: Client,
    recorder: Recorder,
    metrics: Metrics,
    clock: Arc<HeartbeatClock>,
    scope: Scope,
    concurrency: u16,
    stop: CancellationToken,
) {
    let mut wc = watcher::Config::default();
    if let Some(selector) = &scope.node_selector {
        wc = wc.labels(selector);
    }
    // The Nodes, for their addresses: a change of those is its EdgeNode's.
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_changes = Changes::default();
    let node_stream = watcher(Api::<Node>::all(client.clone()), wc.clone())
        .backoff(WatchBackoff::default())
        // Only the addresses are read here: the rest of a Node (its image
        // list above all) is not worth a second copy in memory.
        .modify(crate::caches::trim_node)
        .reflect(node_writer)
        .filter_map(move |event| std::future::ready(address_news(&node_changes, event)));
    // The node Leases, for their renewals: no cache, only the clock.
    let lease_clock = Arc::clone(&clock);
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), &scope.lease_namespace),
        watcher::Config::default().labels(node_lease::LABEL),
    )
    .backoff(WatchBackoff::default())
    .filter_map(move |event| std::future::ready(renewal_news(&lease_clock, event)));
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        metrics,
        clock,
        nodes,
        recorder,
    });
    Controller::new(Api::<EdgeNode>::all(client), wc)
        .watches_stream(node_stream, |node: Node| {
            Some(ObjectRef::<EdgeNode>::new(&node.name_any()))
        })
        .watches_stream(lease_stream, |lease: Lease| {
            node_lease::node(&lease.name_any()).map(ObjectRef::<EdgeNode>::new)
        })
        .trigger_backoff(WatchBackoff::default())
        // A new leader's first pass reconciles every EdgeNode at once;
        // unbounded, a thousand writes in flight together are a memory peak
        // the allocator keeps long after.
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewire_api::crd::EdgeNodeSpec;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(ip: &str) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn edge(address: &str) -> EdgeNode {
        EdgeNode::new(
            "edge-1",
            EdgeNodeSpec {
                address: address.into(),
                mesh_port: None,
                mesh_public_key: None,
            },
        )
    }

    #[test]
    fn an_address_not_on_the_node_is_degraded_and_says_what_is_used() {
        let now = Timestamp::now();
        let c = address_condition(&edge("192.0.2.66"), Some(&node("10.0.0.5")), now);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", ADDRESS_NOT_ON_NODE)
        );
        assert!(c.message.contains("192.0.2.66") && c.message.contains("endpoints use 10.0.0.5"));
        let ok = address_condition(&edge("10.0.0.5"), Some(&node("10.0.0.5")), now);
        assert_eq!(ok.status, "False");
        let missing = address_condition(&edge("10.0.0.5"), None, now);
        assert_eq!(missing.reason, NODE_NOT_FOUND);
    }

    #[test]
    fn only_address_changes_and_deletions_of_nodes_are_news() {
        let changes = Changes::default();
        let mut n = node("10.0.0.5");
        n.metadata.name = Some("edge-1".into());
        let news = |event| address_news(&changes, Ok(event)).is_some();
        assert!(news(watcher::Event::InitApply(n.clone())), "first sight");
        let mut heartbeat = n.clone();
        if let Some(status) = heartbeat.status.as_mut() {
            status.conditions = Some(Vec::new());
        }
        assert!(
            !news(watcher::Event::Apply(heartbeat)),
            "a kubelet status write"
        );
        assert!(!news(watcher::Event::Apply(n.clone())));
        let moved = {
            let mut m = node("10.0.0.6");
            m.metadata.name = Some("edge-1".into());
            m
        };
        assert!(news(watcher::Event::Apply(moved.clone())), "a new address");
        assert!(news(watcher::Event::Delete(moved.clone())), "gone");
        assert!(news(watcher::Event::Apply(moved)), "back again");
        assert!(!news(watcher::Event::InitDone));
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let earlier = Timestamp::from_second(1_700_000_000).unwrap();
        let mut en = edge("192.0.2.66");
        let first = address_condition(&en, Some(&node("10.0.0.5")), earlier);
        en.status = Some(edgewire_api::crd::EdgeNodeStatus {
            conditions: vec![first.clone()],
            ..Default::default()
        });
        let again = address_condition(&en, Some(&node("10.0.0.5")), Timestamp::now());
        assert_eq!(again, first);
    }
}
