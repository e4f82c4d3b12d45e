//! Cluster mode: the agent follows the operator's placement (read-only
//! watches of EdgeServices and their PlacementSlices), keeps its node's EdgeNode up to date, and keeps
//! serving from its stored config while the API server is out of reach.

pub mod lease;
pub mod leave;
pub mod modules;
pub mod render;
pub mod report;
pub mod secrets;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewire_api::crd::{
    EdgeNode, EdgeNodeSpec, EdgeService, NodeModule, NodeService, PlacementSlice,
};
use futures_util::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;

const FIELD_MANAGER: &str = "edgewire-agent";
/// Placement changes usually come in bursts (one per EdgeService status
/// write); apply once they settle.
const SETTLE: Duration = Duration::from_millis(200);
/// A status change is reported at once, but no more often than this.
const MIN_REPORT_GAP: Duration = Duration::from_secs(1);
/// How often ConfigMap-sourced Wasm modules and named Secrets are fetched
/// again (and image modules' pull Secrets read and references resolved)
/// when nothing else prompts a new rendering, so a new module or a rotated
/// certificate or key rolls out on its own (the agent may `get` those
/// Secrets, not watch them).
const MODULE_RECHECK: Duration = Duration::from_secs(15);
/// The longest a leaving agent waits for its final heartbeat to be written.
const FINAL_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the operator has taken the node out of the EndpointSlices, the
/// proxies that route by them need a moment to follow.
const ENDPOINTS_SETTLE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Options {
    pub node: String,
    /// Where clients and peers reach this agent; written to the EdgeNode.
    pub advertise_address: String,
    pub mesh_port: Option<u16>,
    /// This agent's mesh public key, published in its EdgeNode so the
    /// operator can hand it to the peers.
    pub mesh_public_key: Option<String>,
    pub state_dir: PathBuf,
    pub heartbeat_interval: Duration,
    /// Where this node's Lease is renewed as its heartbeat; without one,
    /// every heartbeat is a status report.
    pub lease_namespace: Option<String>,
    /// With a Lease: how often connection counts alone are reported, at most.
    pub connections_interval: Duration,
    pub edge_node_labels: BTreeMap<String, String>,
    /// On leaving: the longest wait for the operator to take this node out
    /// of the endpoints.
    pub leave_timeout: Duration,
}

/// How `run` is told that the agent is about to exit, and how it says it
/// has done what must come first.
pub struct Leave {
    /// Cancelled once the agent reports its services as not listening.
    pub now: CancellationToken,
    /// Sent when the node is out of the endpoints (or the wait ran out).
    pub done: oneshot::Sender<()>,
}

/// What the placement follower and the heartbeat share.
struct Shared {
    agent: Arc<Agent>,
    client: Client,
    options: Options,
    /// EdgeServices this node could not run, with the reason, for the EdgeNode.
    rejected: Mutex<Vec<(String, String)>>,
    /// Asks for a heartbeat now (the services changed).
    report_now: Notify,
    /// The EdgeServices as last seen.
    services: reflector::Store<EdgeService>,
    /// The PlacementSlices as last seen: which nodes run each service.
    slices: reflector::Store<PlacementSlice>,
}

pub async fn run(
    agent: Arc<Agent>,
    client: Client,
    options: Options,
    stop: CancellationToken,
    leave: Leave,
) {
    if let Some(config) = state::load(&options.state_dir) {
        tracing::info!(
            services = config.services.len(),
            path = %state::path(&options.state_dir).display(),
            "serving the stored config until the API server answers"
        );
        agent.apply(&config).await;
    }
    let (reader, writer) = reflector::store::<EdgeService>();
    let (slice_reader, slice_writer) = reflector::store::<PlacementSlice>();
    let shared = Arc::new(Shared {
        agent,
        client,
        options,
        rejected: Mutex::default(),
        report_now: Notify::new(),
        services: reader,
        slices: slice_reader,
    });
    let heartbeat = tokio::spawn(heartbeat_loop(Arc::clone(&shared), stop.clone(), leave));
    follow_placement(&shared, (writer, slice_writer), stop).await;
    let _ = heartbeat.await;
}

/// What one watch event means to the placement follower.
enum Seen {
    /// The cache changed (or finished its first listing, when `listed`).
    Change {
        listed: bool,
    },
    Nothing,
    Error(String),
    End,
}

fn seen<K>(event: Option<Result<watcher::Event<K>, watcher::Error>>) -> Seen {
    match event {
        Some(Ok(
            event @ (watcher::Event::Apply(_)
            | watcher::Event::Delete(_)
            | watcher::Event::InitDone),
        )) => Seen::Change {
            listed: matches!(event, watcher::Event::InitDone),
        },
        Some(Ok(_)) => Seen::Nothing,
        Some(Err(err)) => Seen::Error(err.to_string()),
        None => Seen::End,
    }
}

/// Watches EdgeServices and their PlacementSlices and applies what is
/// placed on this node.
async fn follow_placement(
    shared: &Shared,
    (writer, slice_writer): (
        reflector::store::Writer<EdgeService>,
        reflector::store::Writer<PlacementSlice>,
    ),
    stop: CancellationToken,
) {
    let Shared {
        agent,
        client,
        options,
        rejected,
        report_now,
        services: reader,
        slices: slice_reader,
    } = shared;
    let mut events = watcher(
        Api::<EdgeService>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .boxed();
    let mut slice_events = watcher(
        Api::<PlacementSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(slice_writer)
    .boxed();
    let mut dirty = false;
    // Both caches have had a complete listing.
    let (mut services_listed, mut slices_listed) = (false, false);
    let mut api_down = false;
    let mut last_applied = None;
    loop {
        let listed = services_listed && slices_listed;
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => match seen(event) {
                Seen::Change { listed } => {
                    services_listed |= listed;
                    Seen::Change { listed }
                }
                other => other,
            },
            event = slice_events.next() => match seen(event) {
                Seen::Change { listed } => {
                    slices_listed |= listed;
                    Seen::Change { listed }
                }
                other => other,
            },
            _ = tokio::time::sleep(MODULE_RECHECK), if listed && !dirty && fetches_objects(&last_applied, reader) => {
                dirty = true;
                Seen::Nothing
            }
            // Only render from a complete listing: an empty cache must never
            // read as "nothing is placed here".
            _ = tokio::time::sleep(SETTLE), if dirty && listed => {
                dirty = false;
                let services: Vec<EdgeService> = reader.state().iter().map(|es| es.as_ref().clone()).collect();
                let slices: Vec<PlacementSlice> = slice_reader.state().iter().map(|s| s.as_ref().clone()).collect();
                let mut rendered = render::render(&options.node, &services, &slices, options.mesh_port, &options.state_dir);
                for (name, why) in &rendered.rejected {
                    tracing::error!(service = %name, %why, "cannot run this EdgeService here");
                }
                *rejected.lock().unwrap_or_else(|e| e.into_inner()) = rendered.rejected.clone();
                for (service, handler, why) in
                    modules::resolve(client, &options.state_dir, &mut rendered.config, last_applied.as_ref()).await
                {
                    tracing::warn!(%service, %handler, %why, "cannot fetch the wasm module");
                }
                // Image modules: the Secrets they pull with, read now, and
                // their references resolved again (a new tag rolls out).
                agent.wasm().set_pull_secrets(modules::pull_secrets(client, &rendered.config).await);
                agent.wasm().recheck_images();
                let placed: Vec<&EdgeService> = services
                    .iter()
                    .filter(|es| rendered.config.service(&render::key(es)).is_some())
                    .collect();
                let (secrets_changed, failures) =
                    secrets::sync(client, &options.state_dir, &placed).await;
                for (service, why) in failures {
                    tracing::warn!(%service, %why, "cannot fetch a Secret; keeping what was stored");
                }
                // The files changed under the same config: running services
                // read them again themselves; applying again starts those
                // that could not start without them.
                if last_applied.as_ref() != Some(&rendered.config) || secrets_changed {
                    tracing::info!(services = rendered.config.services.len(), "placement changed; applying");
                    agent.apply(&rendered.config).await;
                    if let Err(err) = state::save(&options.state_dir, &rendered.config) {
                        tracing::warn!(%err, "cannot store the config for offline restarts");
                    }
                    last_applied = Some(rendered.config);
                    report_now.notify_one();
                }
                Seen::Nothing
            }
        };
        match event {
            Seen::Change { .. } => {
                if api_down {
                    tracing::info!("API server reachable again; catching up");
                    api_down = false;
                }
                dirty = true;
            }
            Seen::Error(err) => {
                if !api_down {
                    tracing::warn!(%err, "lost the API server; serving the last config and retrying");
                    api_down = true;
                }
            }
            Seen::End => return,
            Seen::Nothing => {}
        }
    }
}

/// Whether some EdgeService placed here takes a module from a ConfigMap or
/// names a Secret, or an image (the rendered config names files only, so
/// the specs are asked).
fn fetches_objects(
    last_applied: &Option<edgewire_api::AgentConfig>,
    services: &reflector::Store<EdgeService>,
) -> bool {
    let Some(config) = last_applied else {
        return false;
    };
    services.state().iter().any(|es| {
        config.service(&render::key(es)).is_some()
            && (es.spec.handlers.iter().any(|h| {
                h.module
                    .as_ref()
                    .is_some_and(|m| m.config_map.is_some() || m.image.is_some())
            }) || !edgewire_api::crd::referenced_secrets(&es.spec).is_empty())
    })
}

/// The EdgeNode's status from what the agent runs, but for `lastHeartbeat`
/// (stamped when written).
async fn node_status(agent: &Agent, rejected: &Mutex<Vec<(String, String)>>) -> serde_json::Value {
    let mut services: Vec<NodeService> = agent
        .status()
        .await
        .into_iter()
        .filter_map(|s| {
            let (namespace, name) = s.name.split_once('/')?;
            Some(NodeService {
                namespace: namespace.into(),
                name: name.into(),
                listening: s.listening,
                error: s.error,
                connections: i64::from(s.connections),
                modules: s
                    .modules
                    .into_iter()
                    .map(|m| NodeModule {
                        handler: m.handler,
                        digest: m.digest,
                        reason: m.reason,
                        message: m.error,
                    })
                    .collect(),
            })
        })
        .collect();
    for (key, why) in rejected.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if let Some((namespace, name)) = key.split_once('/') {
            services.push(NodeService {
                namespace: namespace.into(),
                name: name.into(),
                listening: false,
                error: Some(why.clone()),
                connections: 0,
                modules: Vec::new(),
            });
        }
    }
    let connections: i64 = services.iter().map(|s| s.connections).sum();
    json!({
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "serviceCount": services.len(),
        "connections": connections,
        "services": services,
    })
}

/// The EdgeNode status patch for `report`, stamped now.
fn status_patch(report: &serde_json::Value) -> serde_json::Value {
    let mut status = report.clone();
    if let Some(fields) = status.as_object_mut() {
        fields.insert("lastHeartbeat".into(), Timestamp::now().to_string().into());
    }
    json!({
        "apiVersion": EdgeNode::api_version(&()),
        "kind": EdgeNode::kind(&()),
        "status": status,
    })
}

/// Renews this node's Lease every heartbeat interval and reports its status
/// when that changes (`report`), soon after a change of its services.
async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken, leave: Leave) {
    let Shared {
        agent,
        client,
        options,
        rejected,
        report_now,
        services: _,
        slices: _,
    } = shared.as_ref();
    let api: Api<EdgeNode> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let policy = report::Policy {
        connections_interval: options.connections_interval,
    };
    let mut lease = options.lease_namespace.as_deref().map(|ns| {
        lease::NodeLease::new(
            client.clone(),
            ns,
            &options.node,
            options.heartbeat_interval,
        )
    });
    let mut renewed_at: Option<tokio::time::Instant> = None;
    let mut lease_failing = false;
    let mut written: Option<report::Written> = None;
    let mut spec_written = false;
    let mut failing = false;
    loop {
        if !spec_written {
            let mut node = EdgeNode::new(
                &options.node,
                EdgeNodeSpec {
                    address: options.advertise_address.clone(),
                    mesh_port: options.mesh_port.map(i32::from),
                    mesh_public_key: options.mesh_public_key.clone(),
                },
            );
            node.metadata = ObjectMeta {
                name: Some(options.node.clone()),
                labels: Some(options.edge_node_labels.clone()),
                ..ObjectMeta::default()
            };
            spec_written = api
                .patch(&options.node, &params, &Patch::Apply(&node))
                .await
                .is_ok();
        }
        // Renewed once per interval, however often a change wakes the loop;
        // every renewal bounded by the interval, so a hung one is retried.
        if let Some(lease) = lease.as_mut()
            && renewed_at.is_none_or(|at| at.elapsed() >= options.heartbeat_interval / 2)
        {
            match tokio::time::timeout(options.heartbeat_interval, lease.renew()).await {
                Ok(Ok(())) => {
                    if lease_failing {
                        tracing::info!("the node Lease is renewed again");
                    }
                    renewed_at = Some(tokio::time::Instant::now());
                    lease_failing = false;
                }
                outcome => {
                    if !lease_failing {
                        let err = match outcome {
                            Ok(Err(err)) => err.to_string(),
                            _ => "timed out".to_string(),
                        };
                        tracing::warn!(%err, "could not renew the node Lease; heartbeating in the EdgeNode status");
                    }
                    renewed_at = None;
                    lease_failing = true;
                }
            }
        }
        let report = node_status(agent, rejected).await;
        let now = std::time::Instant::now();
        // With nothing new to report and a renewed Lease, nothing is written.
        if !spec_written || policy.due(written.as_ref(), &report, renewed_at.is_some(), now) {
            match api
                .patch_status(
                    &options.node,
                    &params,
                    &Patch::Apply(&status_patch(&report)),
                )
                .await
            {
                Ok(_) => {
                    if failing {
                        tracing::info!("status reports reach the API server again");
                    }
                    failing = false;
                    written = Some(report::Written::new(report, now));
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(%err, "status report failed; still serving, will retry");
                    }
                    failing = true;
                    // The EdgeNode may have been deleted: write it again next time.
                    spec_written = false;
                    written = None;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = leave.now.cancelled() => break,
            _ = tokio::time::sleep(options.heartbeat_interval) => {}
            _ = report_now.notified() => {
                tokio::time::sleep(MIN_REPORT_GAP).await;
            }
        }
    }
    let left = tokio::select! {
        _ = stop.cancelled() => return,
        left = leave_endpoints(&shared, &api, &params) => left,
    };
    if left {
        tracing::info!("out of the endpoints; closing the ports");
    }
    let _ = leave.done.send(());
}

/// The last heartbeat: every service reported as not listening, so the
/// operator takes the node out of the endpoints; then waits (bounded) until
/// the EdgeServices show that it has. False when the wait ran out or the API
/// server could not be told.
async fn leave_endpoints(shared: &Shared, api: &Api<EdgeNode>, params: &PatchParams) -> bool {
    let status = status_patch(&node_status(&shared.agent, &shared.rejected).await);
    let written = tokio::time::timeout(
        FINAL_REPORT_TIMEOUT,
        api.patch_status(&shared.options.node, params, &Patch::Apply(&status)),
    )
    .await;
    if !matches!(written, Ok(Ok(_))) {
        tracing::warn!("could not report the services as leaving; closing the ports anyway");
        return false;
    }
    let running: Vec<String> = shared
        .agent
        .status()
        .await
        .into_iter()
        .map(|s| s.name)
        .collect();
    let out = async {
        loop {
            let services: Vec<EdgeService> = shared
                .services
                .state()
                .iter()
                .map(|es| es.as_ref().clone())
                .collect();
            let slices: Vec<PlacementSlice> = shared
                .slices
                .state()
                .iter()
                .map(|s| s.as_ref().clone())
                .collect();
            if leave::out_of_endpoints(&shared.options.node, &services, &slices, &running) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(shared.options.leave_timeout, out)
        .await
        .is_err()
    {
        tracing::warn!(
            seconds = shared.options.leave_timeout.as_secs_f64(),
            "the operator did not take this node out of the endpoints in time; closing the ports anyway"
        );
        return false;
    }
    tokio::time::sleep(ENDPOINTS_SETTLE).await;
    true
}
