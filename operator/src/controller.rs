//! The EdgeService reconcile loop: gather the cluster's view from the caches,
//! decide (pure functions in `placement`, `desired`, `status`), then write
//! only what differs, with server-side apply under one field manager.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeService, EdgeServiceStatus, PlacementState};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::desired::{self, MANAGED_BY_LABEL, MANAGER};
use crate::metrics::Metrics;
use crate::placement::{self, Candidate, Decision, Freshness, PortClaim};
use crate::status::{self, NodeReport};
use crate::triggers::{self, Changes};
use crate::watch::{ViewHealth, WatchBackoff};

#[derive(Clone, Debug)]
pub struct Settings {
    /// A node whose agent has not reported for this long is stale: out of the
    /// endpoints, marked in status.
    pub heartbeat_timeout: Duration,
    /// A node stale for this long is replaced in the placement.
    pub eviction_timeout: Duration,
    /// The host ports EdgeServices may use.
    pub ports: crate::ports::PortPolicy,
}

pub struct Context {
    pub client: Client,
    pub services: Store<EdgeService>,
    pub nodes: Store<Node>,
    pub edge_nodes: Store<EdgeNode>,
    pub owned_services: Store<Service>,
    pub owned_slices: Store<EndpointSlice>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Whether the EdgeNode cache is behind (its watch failed and has not
    /// delivered since): heartbeats in it may look stale when they are not.
    pub edge_view: Arc<ViewHealth>,
    /// Consecutive failures per EdgeService, for the retry backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<EdgeService>, u32>>,
}

/// Retry delay after `failures` consecutive failures: 1 s doubling to 5 min.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Desired(#[from] desired::DesiredError),
    #[error("the caches did not fill in time")]
    CachesNotReady,
}

/// How fresh a node's agent is, from its EdgeNode's heartbeat.
pub fn freshness(
    edge_node: Option<&EdgeNode>,
    now: Timestamp,
    settings: &Settings,
) -> (Freshness, Option<Duration>) {
    let Some(beat) = edge_node.and_then(|e| e.status.as_ref()?.last_heartbeat.as_ref()) else {
        return (Freshness::Gone, None);
    };
    let age = now.duration_since(beat.0);
    let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
    if age <= settings.heartbeat_timeout {
        (Freshness::Fresh, Some(settings.heartbeat_timeout - age))
    } else if age <= settings.eviction_timeout {
        (Freshness::Stale, Some(settings.eviction_timeout - age))
    } else {
        (Freshness::Gone, None)
    }
}

/// Only the Node's own addresses (see `address`); the EdgeNode's claim
/// chooses among them.
fn node_address(node: &Node, edge_node: Option<&EdgeNode>) -> Option<String> {
    crate::address::decide(node, edge_node.map(|e| e.spec.address.as_str())).address
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 50]
            .iter()
            .map(|n| backoff(*n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 256, 300, 300]);
    }
}

fn key(es: &EdgeService) -> String {
    format!("{}/{}", es.namespace().unwrap_or_default(), es.name_any())
}

/// Whether `a` was there first: older creation time, then name.
fn older(a: &EdgeService, b: &EdgeService) -> bool {
    let time = |e: &EdgeService| e.metadata.creation_timestamp.clone().map(|t| t.0);
    (time(a), key(a)) < (time(b), key(b))
}

async fn reconcile(es: Arc<EdgeService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&es, &ctx).await;
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&ObjectRef::from_obj(es.as_ref()));
    }
    ctx.metrics
        .reconciled("edgeservice", started.elapsed(), result.is_err());
    result
}

async fn reconcile_inner(es: &EdgeService, ctx: &Context) -> Result<Action, Error> {
    if es.metadata.deletion_timestamp.is_some() {
        // Owned objects go with it through garbage collection.
        return Ok(Action::await_change());
    }
    // Deciding before every cache has its first listing would see no nodes
    // and unplace everything (an operator restart must write nothing).
    let caches = async {
        let _ = ctx.nodes.wait_until_ready().await;
        let _ = ctx.edge_nodes.wait_until_ready().await;
        let _ = ctx.owned_services.wait_until_ready().await;
        let _ = ctx.owned_slices.wait_until_ready().await;
    };
    if tokio::time::timeout(Duration::from_secs(30), caches)
        .await
        .is_err()
    {
        return Err(Error::CachesNotReady);
    }
    // Right after an API server outage the cached heartbeats are old; judged
    // now, every node would look stale and leave the endpoints. Wait for the
    // watch to catch up instead.
    if ctx.edge_view.behind(ctx.settings.heartbeat_timeout) {
        tracing::debug!(edgeservice = %key(es), "EdgeNode cache behind; deciding later");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let now = Timestamp::now();
    let placed_now: std::collections::BTreeSet<&str> = es
        .status
        .iter()
        .flat_map(|s| s.placement.iter().map(|p| p.node.as_str()))
        .collect();

    let mut next_check: Option<Duration> = None;
    let mut candidates = Vec::new();
    let mut reports = BTreeMap::new();
    let es_key = key(es);
    let es_name = es.name_any();
    for node in ctx.nodes.state() {
        let name = node.name_any();
        // Only nodes the service selects, or is still placed on, can be
        // part of its decision; with thousands of nodes, skipping the rest
        // is most of a reconcile's cost.
        let placed = placed_now.contains(name.as_str());
        if !placed && !placement::matches_selector(&es.spec.node_selector, node.labels()) {
            continue;
        }
        let edge_node = ctx.edge_nodes.get(&ObjectRef::new(&name));
        let edge_node = edge_node.as_deref();
        let (fresh, changes_in) = freshness(edge_node, now, &ctx.settings);
        let address = node_address(&node, edge_node);
        candidates.push(Candidate {
            name: name.clone(),
            labels: node.labels().clone(),
            address: address.clone(),
            freshness: fresh,
        });
        let service = edge_node
            .and_then(|e| e.status.as_ref())
            .and_then(|s| {
                s.services.iter().find(|s| {
                    Some(&s.namespace) == es.metadata.namespace.as_ref() && s.name == es_name
                })
            })
            .map(|s| (s.listening, s.error.clone(), s.connections));
        if edge_node.is_some() {
            reports.insert(
                name.clone(),
                NodeReport {
                    address,
                    fresh: fresh == Freshness::Fresh,
                    service,
                },
            );
        }
        if placed && let Some(d) = changes_in {
            next_check = Some(next_check.map_or(d, |c| c.min(d)));
        }
    }

    let claims: Vec<PortClaim> = ctx
        .services
        .state()
        .iter()
        .filter(|other| other.spec.port == es.spec.port && key(other) != es_key && older(other, es))
        .flat_map(|other| {
            let owner = key(other);
            other
                .status
                .iter()
                .flat_map(|s| s.placement.iter())
                .map(move |p| PortClaim {
                    owner: owner.clone(),
                    node: p.node.clone(),
                    port: other.spec.port,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let previous: Vec<String> = es
        .status
        .iter()
        .flat_map(|s| s.placement.iter().map(|p| p.node.clone()))
        .collect();
    // A port outside the allowed range is never placed.
    let refused = (ctx.settings.ports)
        .check(&es.namespace().unwrap_or_default(), es.spec.port)
        .err();
    let decision = match refused {
        Some(_) => Decision::default(),
        None => placement::place(&es.spec, &candidates, &previous, &claims),
    };
    let mut new_status = status::compute(
        &decision,
        &reports,
        es.status.as_ref(),
        es.metadata.generation,
        &Time(now),
    );
    if let Some(refusal) = &refused {
        crate::ports::mark_refused(&mut new_status, refusal, es.status.as_ref(), &Time(now));
    }

    apply_service(es, ctx).await?;
    apply_slices(es, &new_status, ctx).await?;
    if es.status.as_ref() != Some(&new_status) {
        let api: Api<EdgeService> =
            Api::namespaced(ctx.client.clone(), &es.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": EdgeService::api_version(&()),
            "kind": EdgeService::kind(&()),
            "status": new_status,
        });
        api.patch_status(
            &es.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.metrics.write("edgeservice_status");
        publish_events(es, es.status.as_ref(), &new_status, &decision, ctx).await;
    }
    // Come back when a placed node's heartbeat turns stale or its staleness
    // turns into eviction, so endpoints follow within the stated time.
    let wait = next_check
        .map(|d| d + Duration::from_millis(200))
        .unwrap_or(Duration::from_secs(300))
        .min(Duration::from_secs(300));
    Ok(Action::requeue(wait))
}

/// Server-side applies the Service when the cached one differs from desired.
async fn apply_service(es: &EdgeService, ctx: &Context) -> Result<(), Error> {
    let want = desired::service(es)?;
    let ns = es.namespace().unwrap_or_default();
    let current = ctx
        .owned_services
        .get(&ObjectRef::new(&es.name_any()).within(&ns));
    if current
        .as_deref()
        .is_some_and(|have| service_matches(have, &want))
    {
        return Ok(());
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch(
        &es.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&want),
    )
    .await?;
    ctx.metrics.write("service");
    Ok(())
}

fn owned_by(
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

fn service_matches(have: &Service, want: &Service) -> bool {
    let (Some(h), Some(w)) = (&have.spec, &want.spec) else {
        return false;
    };
    let ports_match = match (&h.ports, &w.ports) {
        (Some(hp), Some(wp)) => {
            hp.len() == wp.len()
                && hp.iter().zip(wp).all(|(h, w)| {
                    h.name == w.name
                        && h.port == w.port
                        && h.target_port == w.target_port
                        && h.protocol == w.protocol
                        && (w.node_port.is_none() || h.node_port == w.node_port)
                })
        }
        _ => false,
    };
    owned_by(&have.metadata, &want.metadata)
        && h.type_ == w.type_
        && h.selector.is_none()
        && ports_match
}

fn slice_matches(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    let endpoints = |s: &EndpointSlice| {
        s.endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses.clone(),
                    e.node_name.clone(),
                    e.conditions.as_ref().and_then(|c| c.ready),
                )
            })
            .collect::<Vec<_>>()
    };
    owned_by(&have.metadata, &want.metadata)
        && have.address_type == want.address_type
        && have.ports == want.ports
        && endpoints(have) == endpoints(want)
}

/// Applies the EndpointSlices that differ and deletes the ones no longer wanted.
async fn apply_slices(
    es: &EdgeService,
    status: &EdgeServiceStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let want = desired::endpoint_slices(es, &status.placement)?;
    let ns = es.namespace().unwrap_or_default();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = es.uid();
    for slice in &want {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let current = ctx.owned_slices.get(&ObjectRef::new(&name).within(&ns));
        if current
            .as_deref()
            .is_some_and(|have| slice_matches(have, slice))
        {
            continue;
        }
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(slice),
        )
        .await?;
        ctx.metrics.write("endpointslice");
    }
    let wanted: Vec<&str> = want
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    for stale in ctx.owned_slices.state() {
        let owned_here = stale.namespace().as_deref() == Some(ns.as_str())
            && stale
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref());
        if owned_here && !wanted.contains(&stale.name_any().as_str()) {
            match api
                .delete(&stale.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => ctx.metrics.write("endpointslice"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Events for what a user should see in `kubectl describe es`.
async fn publish_events(
    es: &EdgeService,
    old: Option<&EdgeServiceStatus>,
    new: &EdgeServiceStatus,
    decision: &Decision,
    ctx: &Context,
) {
    let state_of = |s: Option<&EdgeServiceStatus>| -> BTreeMap<String, PlacementState> {
        s.iter()
            .flat_map(|s| s.placement.iter().map(|p| (p.node.clone(), p.state)))
            .collect()
    };
    let before = state_of(old);
    let after = state_of(Some(new));
    let mut events = Vec::new();
    let added: Vec<&str> = after
        .keys()
        .filter(|n| !before.contains_key(*n))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = before
        .keys()
        .filter(|n| !after.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !added.is_empty() {
        events.push((
            EventType::Normal,
            "Placed",
            format!("placed on {}", added.join(", ")),
        ));
    }
    if !removed.is_empty() {
        events.push((
            EventType::Normal,
            "Unplaced",
            format!("removed from {}", removed.join(", ")),
        ));
    }
    for (node, state) in &after {
        let was = before.get(node);
        if was == Some(state) {
            continue;
        }
        match state {
            PlacementState::Stale => events.push((
                EventType::Warning,
                "NodeStale",
                format!("{node}: agent heartbeat is stale; removed from the endpoints"),
            )),
            PlacementState::Failed => events.push((
                EventType::Warning,
                "ListenFailed",
                format!("{node}: the agent could not start the service"),
            )),
            PlacementState::Ready if was.is_some() => events.push((
                EventType::Normal,
                "NodeReady",
                format!("{node}: serving again"),
            )),
            _ => {}
        }
    }
    let old_conflict = old.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "PortConflict")
    });
    if !decision.conflicts.is_empty() && !old_conflict {
        let list: Vec<String> = decision
            .conflicts
            .iter()
            .map(|(n, o)| format!("{n} (held by {o})"))
            .collect();
        events.push((
            EventType::Warning,
            "PortConflict",
            format!("port {} is taken on {}", es.spec.port, list.join(", ")),
        ));
    }
    if let Some(note) = crate::ports::newly_refused(old, new) {
        events.push((EventType::Warning, crate::ports::PORT_NOT_ALLOWED, note));
    }
    let reference = es.object_ref(&());
    for (type_, reason, note) in events {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%err, reason, "could not publish an event");
        }
    }
}

fn error_policy(es: Arc<EdgeService>, err: &Error, ctx: Arc<Context>) -> Action {
    let failures = match ctx.failures.lock() {
        Ok(mut map) => {
            let n = map.entry(ObjectRef::from_obj(es.as_ref())).or_insert(0);
            *n += 1;
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(failures);
    tracing::warn!(edgeservice = %key(&es), error = %err, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// EdgeServices a change to `node` may concern: those whose selector matches
/// its labels, and those placed on it.
fn affected(
    services: &Store<EdgeService>,
    node: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Vec<ObjectRef<EdgeService>> {
    services
        .state()
        .iter()
        .filter(|es| {
            labels.is_none_or(|l| placement::matches_selector(&es.spec.node_selector, l))
                || es
                    .status
                    .as_ref()
                    .is_some_and(|s| s.placement.iter().any(|p| p.node == node))
        })
        .map(|es| ObjectRef::from_obj(es.as_ref()))
        .collect()
}

/// What this operator instance manages.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only EdgeServices of this namespace; all namespaces when None.
    pub namespace: Option<String>,
    /// Only Nodes and EdgeNodes with these labels (a label selector).
    pub node_selector: Option<String>,
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// Runs the EdgeService controller until `stop` fires.
pub async fn run(
    client: Client,
    recorder: Recorder,
    metrics: Metrics,
    settings: Settings,
    scope: Scope,
    stop: CancellationToken,
) {
    let wc = watcher::Config::default();
    let mut node_wc = watcher::Config::default();
    if let Some(selector) = &scope.node_selector {
        node_wc = node_wc.labels(selector);
    }
    let owned_wc = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));

    let (nodes, node_writer) = reflector::store::<Node>();
    let node_stream = watcher(Api::<Node>::all(client.clone()), node_wc.clone())
        .backoff(WatchBackoff::default())
        .reflect(node_writer)
        .touched_objects();
    let (edge_nodes, edge_writer) = reflector::store::<EdgeNode>();
    let edge_view = Arc::new(ViewHealth::default());
    let view = Arc::clone(&edge_view);
    let edge_stream = watcher(Api::<EdgeNode>::all(client.clone()), node_wc)
        .backoff(WatchBackoff::default())
        .reflect(edge_writer)
        .inspect(move |event| view.observe(event))
        .touched_objects();
    let (owned_services, svc_writer) = reflector::store::<Service>();
    let svc_stream = watcher(scope.api::<Service>(&client), owned_wc.clone())
        .backoff(WatchBackoff::default())
        .reflect(svc_writer)
        .touched_objects();
    let (owned_slices, slice_writer) = reflector::store::<EndpointSlice>();
    let slice_stream = watcher(scope.api::<EndpointSlice>(&client), owned_wc)
        .backoff(WatchBackoff::default())
        .reflect(slice_writer)
        .touched_objects();

    let controller = Controller::new(scope.api::<EdgeService>(&client), wc);
    let services = controller.store();
    metrics.watch_services(services.clone());
    let ctx = Arc::new(Context {
        client,
        services: services.clone(),
        nodes: nodes.clone(),
        edge_nodes: edge_nodes.clone(),
        owned_services: owned_services.clone(),
        owned_slices: owned_slices.clone(),
        recorder,
        metrics,
        settings,
        edge_view,
        failures: Default::default(),
    });
    let (for_nodes, nodes_seen, node_changes) =
        (services.clone(), nodes.clone(), Changes::default());
    let (for_edge, nodes_for_edge, edge_seen, edge_changes) = (
        services.clone(),
        nodes.clone(),
        edge_nodes.clone(),
        Changes::default(),
    );
    let edge_settings = ctx.settings.clone();
    let controller = controller
        .owns_stream(svc_stream)
        .owns_stream(slice_stream)
        .watches_stream(node_stream, move |node: Node| {
            let name = node.name_any();
            let exists = nodes_seen.get(&ObjectRef::new(&name)).is_some();
            if !node_changes.changed(&name, triggers::node_digest(&node), exists) {
                return Vec::new();
            }
            tracing::debug!(node = %name, exists, "node change");
            affected(&for_nodes, &name, Some(node.labels()))
        })
        .watches_stream(edge_stream, move |en: EdgeNode| {
            let name = en.name_any();
            let exists = edge_seen.get(&ObjectRef::new(&name)).is_some();
            let fresh =
                freshness(Some(&en), Timestamp::now(), &edge_settings).0 == Freshness::Fresh;
            if !edge_changes.changed(&name, triggers::edge_node_digest(&en, fresh), exists) {
                return Vec::new();
            }
            tracing::debug!(edgenode = %name, exists, fresh, "edgenode change");
            let node = nodes_for_edge.get(&ObjectRef::new(&name));
            affected(&for_edge, &name, node.as_deref().map(|n| n.labels()))
        })
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(stop.cancelled_owned());
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "controller event");
            }
        })
        .await;
}
