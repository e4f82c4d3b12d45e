//! The EdgeService reconcile loop: gather the cluster's view from the caches,
//! decide (pure functions in `placement`, `desired`, `status`), then write
//! only what differs, with server-side apply under one field manager.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeService, NodePlacement, PlacementSlice};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{Event, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::caches::{self, touched};
use crate::desired::{self, MANAGED_BY_LABEL, MANAGER};
use crate::events;
use crate::freshness::{HeartbeatClock, Source, Timeouts};
use crate::index::{self, Index};
use crate::metrics::Metrics;
use crate::placement::{self, Candidate, Decision, Freshness, PortClaim};
use crate::placement_book::{self, PlacementBook};
use crate::placement_slices;
use crate::queue::CoalescingQueue;
use crate::service_events::{self, ServiceEvent};
use crate::status::{self, NodeReport};
use crate::triggers::{self, Changes, Concern, EdgeNodeChanges};
use crate::watch::WatchBackoff;

#[derive(Clone, Debug)]
pub struct Settings {
    /// A node whose agent has not reported for this long is stale: out of the
    /// endpoints, marked in status.
    pub heartbeat_timeout: Duration,
    /// A node stale for this long is replaced in the placement.
    pub eviction_timeout: Duration,
    /// A change in connection counts alone reaches EdgeService status at
    /// most this often.
    pub status_interval: Duration,
    /// EdgeServices reconciled at the same time, at most.
    pub concurrency: u16,
    /// How long a change waits for more before its EdgeService is
    /// reconciled, counted from the first change (see `queue`).
    pub batch_period: Duration,
    /// The host ports EdgeServices may use.
    pub ports: crate::ports::PortPolicy,
    /// The agents' ServiceAccount: in each namespace it may read the Secrets
    /// the EdgeServices there name. None: the operator grants no such access.
    pub agent_account: Option<crate::secret_access::AgentAccount>,
    /// Nodes per PlacementSlice at most.
    pub placement_slice_size: usize,
}

impl Settings {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            heartbeat: self.heartbeat_timeout,
            eviction: self.eviction_timeout,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub services: Store<EdgeService>,
    pub nodes: Store<Node>,
    pub edge_nodes: Store<EdgeNode>,
    pub owned_services: Store<Service>,
    pub owned_slices: Store<EndpointSlice>,
    /// Every EdgeService's placement, as written in its PlacementSlices.
    pub placements: PlacementBook,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub settings: Settings,
    /// When each node's heartbeat was seen to change.
    pub clock: Arc<HeartbeatClock>,
    /// Node names by `label=value`.
    pub nodes_by_label: Arc<Index>,
    /// EdgeService `namespace/name` by port.
    pub services_by_port: Arc<Index>,
    /// Owned EndpointSlice `namespace/name` by owner uid.
    pub slices_by_owner: Arc<Index>,
    /// Consecutive failures per EdgeService, for the retry backoff.
    pub failures: Mutex<HashMap<ObjectRef<EdgeService>, u32>>,
    /// When each EdgeService's connection count was last written.
    pub connections_written: Mutex<HashMap<ObjectRef<EdgeService>, Instant>>,
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

    #[test]
    fn an_endpoint_slice_is_created_with_its_first_endpoint_and_emptied_when_it_exists() {
        let es: EdgeService = serde_json::from_value(json!({
            "apiVersion": "edgewire.dev/v1alpha1",
            "kind": "EdgeService",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u1"},
            "spec": {"port": 8000},
        }))
        .expect("an EdgeService");
        let placed = |state| NodePlacement {
            node: "n1".into(),
            address: Some("192.0.2.1".into()),
            state,
            message: None,
            mesh_public_key: None,
        };
        let slice = |state| {
            desired::endpoint_slices(&es, &[placed(state)])
                .expect("slices")
                .remove(0)
        };
        let (empty, ready) = (
            slice(edgewire_api::crd::PlacementState::Pending),
            slice(edgewire_api::crd::PlacementState::Ready),
        );
        assert!(empty.endpoints.is_empty());
        assert!(
            !slice_needs_write(None, &empty),
            "no empty slice is created"
        );
        assert!(slice_needs_write(None, &ready));
        assert!(
            slice_needs_write(Some(&ready), &empty),
            "an existing one is emptied"
        );
        assert!(!slice_needs_write(Some(&ready), &ready));
        assert!(!slice_needs_write(Some(&empty), &empty));
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
        let _ = ctx.placements.store.wait_until_ready().await;
    };
    if tokio::time::timeout(Duration::from_secs(30), caches)
        .await
        .is_err()
    {
        return Err(Error::CachesNotReady);
    }
    // While the EdgeNode watch is failing, the cache cannot show heartbeats:
    // judge nothing until it delivers again (then every node gets a full
    // timeout of grace, see `freshness`).
    if ctx.clock.behind() {
        tracing::debug!(edgeservice = %key(es), "EdgeNode view behind; deciding later");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let now = Timestamp::now();
    let es_ref = ObjectRef::from_obj(es);
    let placed_before = placed_before(es, ctx);
    let previous: Vec<String> = placed_before.iter().map(|p| p.node.clone()).collect();
    let placed_now: std::collections::HashSet<&str> = previous.iter().map(String::as_str).collect();

    let mut next_check: Option<Duration> = None;
    let mut candidates = Vec::new();
    let mut reports = BTreeMap::new();
    let es_name = es.name_any();
    // Only nodes the service selects, or is still placed on, can be part of
    // its decision; with thousands of nodes, looking at no others is most of
    // a reconcile's cost.
    let selected = ctx
        .nodes_by_label
        .narrowest(&index::label_keys(&es.spec.node_selector))
        .unwrap_or_else(|| ctx.nodes.state().iter().map(|n| n.name_any()).collect());
    let mut names: Vec<String> = selected
        .into_iter()
        .chain(previous.iter().cloned())
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let Some(node) = ctx.nodes.get(&ObjectRef::new(&name)) else {
            continue;
        };
        let placed = placed_now.contains(name.as_str());
        if !placed && !placement::matches_selector(&es.spec.node_selector, node.labels()) {
            continue;
        }
        let edge_node = ctx.edge_nodes.get(&ObjectRef::new(&name));
        let edge_node = edge_node.as_deref();
        let (fresh, changes_in) =
            edge_node.map_or((Freshness::Gone, None), |en| ctx.clock.freshness(en));
        let address = node_address(&node, edge_node);
        candidates.push(Candidate {
            name: name.clone(),
            labels: node.labels().clone(),
            address: address.clone(),
            freshness: fresh,
            load: ctx
                .placements
                .load(&name)
                .saturating_sub(usize::from(placed)),
        });
        let service = edge_node.and_then(|e| e.status.as_ref()).and_then(|s| {
            s.services
                .iter()
                .find(|s| Some(&s.namespace) == es.metadata.namespace.as_ref() && s.name == es_name)
        });
        if edge_node.is_some() {
            reports.insert(
                name.clone(),
                NodeReport {
                    address,
                    mesh_public_key: edge_node.and_then(|e| e.spec.mesh_public_key.clone()),
                    fresh: fresh == Freshness::Fresh,
                    service: service.map(|s| (s.listening, s.error.clone(), s.connections)),
                    modules: service.map(|s| s.modules.clone()).unwrap_or_default(),
                },
            );
        }
        if placed && let Some(d) = changes_in {
            next_check = Some(next_check.map_or(d, |c| c.min(d)));
        }
    }

    let Some(claims) = port_claims(es, ctx) else {
        // An older service on this port has not decided yet: decide after
        // it (its placement change queues this one), never beside it.
        tracing::debug!(edgeservice = %key(es), "an older service on the port is deciding");
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    // A port outside the allowed range is never placed.
    let refused = (ctx.settings.ports)
        .check(&es.namespace().unwrap_or_default(), es.spec.port)
        .err();
    let decision = match refused {
        Some(_) => Decision::default(),
        None => placement::place(&key(es), &es.spec, &candidates, &previous, &claims),
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
    } else if let Some((reason, message)) =
        crate::secret_check::check(&ctx.client, &es.namespace().unwrap_or_default(), &es.spec).await
    {
        // Placed all the same: the agents serve once the Secret is right,
        // and until then refuse rather than serve without it.
        status::mark_degraded(
            &mut new_status,
            es.status.as_ref(),
            reason,
            &message,
            es.metadata.generation,
            &Time(now),
        );
    }
    let placed_now = std::mem::take(&mut new_status.placement);
    new_status.placement =
        placement_slices::status_summary(&placed_now, placement_slices::STATUS_NODES);

    let foreign = foreign_service(es, ctx).await?;
    match &foreign {
        // The name is taken by a Service this EdgeService does not own:
        // never take it over, nor attach endpoints to it (slices of ours
        // from before it appeared go), and say so.
        Some(message) => {
            prune_slices(es, &[], ctx).await?;
            status::service_conflict(
                &mut new_status,
                es.status.as_ref(),
                message,
                es.metadata.generation,
                &Time(now),
            );
        }
        None => {
            apply_service(es, ctx).await?;
            apply_slices(es, &placed_now, ctx).await?;
        }
    }
    // The whole placement goes into the PlacementSlices after the
    // EndpointSlices (a leaving agent reads a node no longer Ready there as
    // out of the endpoints) and before the status says the spec is decided
    // (a younger service on the port waits for that).
    apply_placement(es, &placed_now, ctx).await?;
    // Connection counts change all the time; alone, they are written at
    // most every `status_interval`.
    let mut connections_due: Option<Duration> = None;
    if let Some(old) = es.status.as_ref()
        && status::only_connections_differ(old, &new_status)
    {
        let last = ctx
            .connections_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&es_ref)
            .copied();
        let since = last.map_or(Duration::MAX, |t| t.elapsed());
        if since < ctx.settings.status_interval {
            new_status.connections = old.connections;
            connections_due = Some(ctx.settings.status_interval - since);
        }
    }
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
        ctx.connections_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(es_ref, Instant::now());
        let events = service_events::service_events(
            es.spec.port,
            (es.status.as_ref(), &placed_before),
            (&new_status, &placed_now),
            &decision,
            foreign.as_deref(),
        );
        publish_events(es, events, ctx).await;
    }
    // Come back when a placed node's heartbeat turns stale or its staleness
    // turns into eviction, so endpoints follow within the stated time; and
    // at least every `status_interval`, for the connection counts.
    let wait = [
        next_check.map(|d| d + Duration::from_millis(200)),
        connections_due,
    ]
    .into_iter()
    .flatten()
    .fold(ctx.settings.status_interval, Duration::min);
    Ok(Action::requeue(wait))
}

/// `namespace/name` as an ObjectRef.
fn object_ref<K>(key: &str) -> Option<ObjectRef<K>>
where
    K: Resource,
    K::DynamicType: Default,
{
    let (ns, name) = key.split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}

/// The ports older EdgeServices hold on nodes, where this one's port is the
/// same; None while one of them has not yet placed its current spec (a
/// decision made beside it could pick the same node).
fn port_claims(es: &EdgeService, ctx: &Context) -> Option<Vec<PortClaim>> {
    let es_key = key(es);
    let older_ones: Vec<Arc<EdgeService>> = ctx
        .services_by_port
        .get(&es.spec.port.to_string())
        .iter()
        .filter_map(|k| ctx.services.get(&object_ref(k)?))
        .filter(|other| {
            other.spec.port == es.spec.port && key(other) != es_key && older(other.as_ref(), es)
        })
        .collect();
    let undecided = |other: &EdgeService| {
        other.metadata.deletion_timestamp.is_none()
            && other.status.as_ref().and_then(|s| s.observed_generation)
                != other.metadata.generation
    };
    if older_ones.iter().any(|o| undecided(o)) {
        return None;
    }
    let claims = older_ones
        .iter()
        .flat_map(|other| {
            let owner = key(other);
            ctx.placements
                .placement(other)
                .into_iter()
                .map(move |p| PortClaim {
                    owner: owner.clone(),
                    node: p.node,
                    port: other.spec.port,
                })
        })
        .collect();
    Some(claims)
}

/// A message naming the Service in the EdgeService's name that it does not
/// own, if there is one. The cache holds only the Services this operator
/// labelled; anything else is looked up.
async fn foreign_service(es: &EdgeService, ctx: &Context) -> Result<Option<String>, Error> {
    let ns = es.namespace().unwrap_or_default();
    let name = es.name_any();
    let owned = |svc: &Service| {
        svc.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == es.metadata.uid.as_ref())
    };
    if let Some(cached) = ctx.owned_services.get(&ObjectRef::new(&name).within(&ns))
        && owned(&cached)
    {
        return Ok(None);
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    match api.get_opt(&name).await? {
        Some(svc) if !owned(&svc) => Ok(Some(format!(
            "Service {ns}/{name} exists and is not owned by this EdgeService; it is left alone"
        ))),
        _ => Ok(None),
    }
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
    apply_owned(&api, &es.name_any(), &want, "service", ctx).await
}

/// Server-side applies `object` as this operator and counts the write.
async fn apply_owned<K>(
    api: &Api<K>,
    name: &str,
    object: &K,
    kind: &str,
    ctx: &Context,
) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    ctx.metrics.write(kind);
    Ok(())
}

/// Deletes an object this operator wrote (already gone is fine) and counts
/// the write.
async fn delete_owned<K>(api: &Api<K>, name: &str, kind: &str, ctx: &Context) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => ctx.metrics.write(kind),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
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
    desired::owned_by(&have.metadata, &want.metadata)
        && h.type_ == w.type_
        && h.selector.is_none()
        && ports_match
}

/// Whether `want` must be written, `have` being the cached slice of its name.
fn slice_needs_write(have: Option<&EndpointSlice>, want: &EndpointSlice) -> bool {
    match have {
        Some(have) => !slice_matches(have, want),
        // No slice is created before it has an endpoint: a Service without
        // slices has no endpoints, as with an empty one, and a new service
        // is spared a write that its agents' first report would redo. (A
        // slice written but not yet in the cache echoes back, and is then
        // emptied if it must be.)
        None => !want.endpoints.is_empty(),
    }
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
    desired::owned_by(&have.metadata, &want.metadata)
        && have.address_type == want.address_type
        && have.ports == want.ports
        && endpoints(have) == endpoints(want)
}

/// Where `es` was placed: its PlacementSlices, or, for a service placed
/// before there were slices, the list in its status.
fn placed_before(es: &EdgeService, ctx: &Context) -> Vec<NodePlacement> {
    let placed = ctx.placements.placement(es);
    if !placed.is_empty() {
        return placed;
    }
    es.status
        .as_ref()
        .map(|s| s.placement.clone())
        .unwrap_or_default()
}

/// Writes `es`'s placement into its PlacementSlices: the slices that differ
/// are applied, the ones left empty deleted.
async fn apply_placement(
    es: &EdgeService,
    placement: &[NodePlacement],
    ctx: &Context,
) -> Result<(), Error> {
    let layout = ctx.placements.layout(es);
    let want =
        placement_slices::desired(es, placement, &layout, ctx.settings.placement_slice_size)?;
    let ns = es.namespace().unwrap_or_default();
    let api: Api<PlacementSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let have: BTreeMap<String, Arc<PlacementSlice>> = ctx
        .placements
        .slices(es)
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    for slice in &want {
        let name = slice.name_any();
        if have
            .get(&name)
            .is_some_and(|h| placement_slices::matches(h, slice))
        {
            continue;
        }
        apply_owned(&api, &name, slice, "placementslice", ctx).await?;
    }
    for name in have.keys() {
        if !want.iter().any(|w| &w.name_any() == name) {
            delete_owned(&api, name, "placementslice", ctx).await?;
        }
    }
    Ok(())
}

/// Applies the EndpointSlices that differ and deletes the ones no longer wanted.
async fn apply_slices(
    es: &EdgeService,
    placement: &[NodePlacement],
    ctx: &Context,
) -> Result<(), Error> {
    let want = desired::endpoint_slices(es, placement)?;
    let ns = es.namespace().unwrap_or_default();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    for slice in &want {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let current = ctx.owned_slices.get(&ObjectRef::new(&name).within(&ns));
        if slice_needs_write(current.as_deref(), slice) {
            apply_owned(&api, &name, slice, "endpointslice", ctx).await?;
        }
    }
    let wanted: Vec<&str> = want
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    prune_slices(es, &wanted, ctx).await
}

/// Deletes the EndpointSlices `es` owns other than `keep`.
async fn prune_slices(es: &EdgeService, keep: &[&str], ctx: &Context) -> Result<(), Error> {
    let ns = es.namespace().unwrap_or_default();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = es.uid();
    let owned = uid
        .as_deref()
        .map(|uid| ctx.slices_by_owner.get(uid))
        .unwrap_or_default();
    for stale in owned
        .iter()
        .filter_map(|k| ctx.owned_slices.get(&object_ref(k)?))
    {
        let owned_here = stale.namespace().as_deref() == Some(ns.as_str())
            && stale
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref());
        if owned_here && !keep.contains(&stale.name_any().as_str()) {
            delete_owned(&api, &stale.name_any(), "endpointslice", ctx).await?;
        }
    }
    Ok(())
}

/// Publishes the Events `service_events` decides on.
async fn publish_events(es: &EdgeService, events: Vec<ServiceEvent>, ctx: &Context) {
    let reference = es.object_ref(&());
    for ServiceEvent {
        type_,
        reason,
        note,
    } in events
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        events::publish(&ctx.recorder, &ctx.metrics, &event, &reference).await;
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
    placements: &PlacementBook,
    node: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Vec<ObjectRef<EdgeService>> {
    let mut refs: Vec<ObjectRef<EdgeService>> = services
        .state()
        .iter()
        .filter(|es| labels.is_none_or(|l| placement::matches_selector(&es.spec.node_selector, l)))
        .map(|es| ObjectRef::from_obj(es.as_ref()))
        .collect();
    refs.extend(
        placements
            .services_on(node)
            .into_iter()
            .map(|(namespace, name)| ObjectRef::new(&name).within(&namespace)),
    );
    refs
}

/// The other EdgeServices on `es`'s port: when its placement changes, the
/// younger ones must look again (two created in the same second may both
/// have chosen a node before either had written its placement).
fn same_port(services: &Store<EdgeService>, es: &EdgeService) -> Vec<ObjectRef<EdgeService>> {
    let me = key(es);
    services
        .state()
        .iter()
        .filter(|other| other.spec.port == es.spec.port && key(other) != me)
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .collect()
}

/// What this operator instance manages.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only EdgeServices of this namespace; all namespaces when None.
    pub namespace: Option<String>,
    /// Only Nodes and EdgeNodes with these labels (a label selector).
    pub node_selector: Option<String>,
    /// Where the agents' node Leases are.
    pub lease_namespace: String,
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

/// Queues the EdgeService that owns each object an event touches.
fn owners_of<K>(
    queue: Arc<CoalescingQueue<ObjectRef<EdgeService>>>,
) -> impl FnMut(&Store<K>, &caches::WatchEvent<K>) + Send + 'static
where
    K: Resource + Clone + Send + 'static,
    K::DynamicType: Eq + std::hash::Hash,
{
    move |_, event| {
        for (object, _) in touched(event) {
            if let Some((ns, name)) = caches::owner(&object) {
                queue.push(ObjectRef::new(&name).within(&ns));
            }
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
    clock: Arc<HeartbeatClock>,
    stop: CancellationToken,
) {
    let mut node_wc = watcher::Config::default();
    if let Some(selector) = &scope.node_selector {
        node_wc = node_wc.labels(selector);
    }
    let owned_wc = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let queue = CoalescingQueue::<ObjectRef<EdgeService>>::new(settings.batch_period);
    let nodes_by_label = Arc::new(Index::default());
    let services_by_port = Arc::new(Index::default());
    let slices_by_owner = Arc::new(Index::default());
    // The caches' tasks end with the controller, not only with `stop`.
    let tasks_stop = stop.child_token();

    // The namespaces whose EdgeServices changed, for the agents' Secret access.
    let secret_namespaces = CoalescingQueue::<String>::new(Duration::ZERO);
    // EdgeServices: each change reconciles the service itself; a change of
    // its port or its decision also its neighbours on the same port.
    let claims = Changes::default();
    let (services, es_task) = {
        let (queue, by_port) = (Arc::clone(&queue), Arc::clone(&services_by_port));
        let secret_namespaces = Arc::clone(&secret_namespaces);
        caches::spawn(
            scope.api::<EdgeService>(&client),
            watcher::Config::default(),
            caches::trim_meta,
            move |services, event| {
                by_port.apply(event, key, |es| vec![es.spec.port.to_string()]);
                for (es, exists) in touched(event) {
                    queue.push(ObjectRef::from_obj(&es));
                    secret_namespaces.push(es.namespace().unwrap_or_default());
                    if claims.changed(&key(&es), triggers::claim_digest(&es), exists) {
                        queue.extend(same_port(services, &es));
                    }
                }
            },
            tasks_stop.clone(),
        )
    };
    metrics.watch_services(services.clone());
    let access_task = settings.agent_account.clone().map(|agent| {
        tokio::spawn(crate::secret_access::run(
            client.clone(),
            services.clone(),
            Arc::clone(&secret_namespaces),
            scope.namespace.clone(),
            agent,
            tasks_stop.clone(),
        ))
    });

    // PlacementSlices: a change reconciles the owner (a user's edit is
    // undone) and its neighbours on the same port (they see the port held
    // on other nodes now).
    let (placements, placement_task) = {
        let (queue, services) = (Arc::clone(&queue), services.clone());
        let indexes = placement_book::Indexes::default();
        let feed = indexes.clone();
        let (store, task) = caches::spawn(
            scope.api::<PlacementSlice>(&client),
            owned_wc.clone(),
            caches::trim_meta,
            move |_, event| {
                feed.apply(event);
                for (slice, _) in touched(event) {
                    let Some((ns, name)) = caches::owner(&slice) else {
                        continue;
                    };
                    let owner = ObjectRef::<EdgeService>::new(&name).within(&ns);
                    if let Some(es) = services.get(&owner) {
                        queue.extend(same_port(&services, &es));
                    }
                    queue.push(owner);
                }
            },
            tasks_stop.clone(),
        );
        (indexes.book(store), task)
    };

    let (nodes, node_task) = {
        let (queue, services) = (Arc::clone(&queue), services.clone());
        let placements = placements.clone();
        let by_label = Arc::clone(&nodes_by_label);
        let changes = Changes::default();
        caches::spawn(
            Api::<Node>::all(client.clone()),
            node_wc.clone(),
            caches::trim_node,
            move |_, event| {
                by_label.apply(event, |n| n.name_any(), |n| index::label_keys(n.labels()));
                for (node, exists) in touched(event) {
                    let name = node.name_any();
                    if changes.changed(&name, triggers::node_digest(&node), exists) {
                        tracing::debug!(node = %name, exists, "node change");
                        queue.extend(affected(
                            &services,
                            &placements,
                            &name,
                            exists.then(|| node.labels()),
                        ));
                    }
                }
            },
            tasks_stop.clone(),
        )
    };
    let (edge_nodes, edge_task) = {
        let (queue, services, nodes) = (Arc::clone(&queue), services.clone(), nodes.clone());
        let placements = placements.clone();
        let clock = Arc::clone(&clock);
        let changes = EdgeNodeChanges::default();
        caches::spawn(
            Api::<EdgeNode>::all(client.clone()),
            node_wc,
            caches::trim_meta,
            move |_, event| {
                clock.watch_event(Source::Status, event);
                for (en, exists) in touched(event) {
                    let name = en.name_any();
                    let fresh = if exists {
                        clock.observe(&en);
                        clock.freshness(&en).0 == Freshness::Fresh
                    } else {
                        clock.forget(&name);
                        false
                    };
                    match changes.changed(&en, fresh, exists) {
                        Concern::All => {
                            tracing::debug!(edgenode = %name, exists, fresh, "edgenode change");
                            let node = nodes.get(&ObjectRef::new(&name));
                            queue.extend(affected(
                                &services,
                                &placements,
                                &name,
                                node.as_deref().map(|n| n.labels()),
                            ));
                        }
                        Concern::Services(keys) => {
                            queue.extend(keys.iter().filter_map(|k| object_ref(k)));
                        }
                    }
                }
            },
            tasks_stop.clone(),
        )
    };
    // Owned objects: a change (a user's edit, a deletion) reconciles the owner.
    let (owned_services, svc_task) = caches::spawn(
        scope.api::<Service>(&client),
        owned_wc.clone(),
        caches::trim_meta,
        owners_of(Arc::clone(&queue)),
        tasks_stop.clone(),
    );
    let (owned_slices, slice_task) = {
        let mut owners = owners_of(Arc::clone(&queue));
        let by_owner = Arc::clone(&slices_by_owner);
        caches::spawn(
            scope.api::<EndpointSlice>(&client),
            owned_wc,
            caches::trim_meta,
            move |store, event| {
                by_owner.apply(
                    event,
                    |s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                    |s| s.owner_references().iter().map(|o| o.uid.clone()).collect(),
                );
                owners(store, event);
            },
            tasks_stop.clone(),
        )
    };

    let ctx = Arc::new(Context {
        client,
        services: services.clone(),
        nodes,
        edge_nodes,
        owned_services,
        owned_slices,
        placements,
        recorder,
        metrics,
        settings: settings.clone(),
        clock,
        nodes_by_label,
        services_by_port,
        slices_by_owner,
        failures: Mutex::default(),
        connections_written: Mutex::default(),
    });
    // Every trigger arrives through the queue; the controller's own trigger
    // stream stays empty.
    Controller::for_stream(futures_util::stream::pending(), services)
        .with_config(
            // No debounce here: the queue batches, and kube-runtime's
            // debounce restarts with every change.
            kube_controller::Config::default().concurrency(settings.concurrency),
        )
        .reconcile_on(Arc::clone(&queue).stream())
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "controller event");
            }
        })
        .await;
    tasks_stop.cancel();
    for task in [
        es_task,
        placement_task,
        node_task,
        edge_task,
        svc_task,
        slice_task,
    ]
    .into_iter()
    .chain(access_task)
    {
        let _ = task.await;
    }
}
