//! Simulated agents, one per node, writing what a real agent writes, when it
//! writes it (`node-agent/src/cluster/report.rs`): its EdgeNode; its node
//! Lease renewed every heartbeat interval; its status soon after its
//! placement changes, the services placed on it reported as listening, each
//! with a connection count, and again when only those counts changed at most
//! every connections interval. One watch of EdgeServices stands in for the
//! agents' watches. They also keep, on the benchmark's clock, when each node's
//! latest heartbeat was written: the ground truth against which the
//! operator's readiness judgements are checked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeNodeSpec, NodeService, PlacementSlice};
use edgewire_api::node_lease;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::fleet::EDGE_LABEL;

const FIELD_MANAGER: &str = "edgewire-agent";
/// Status writes in flight at once, for all simulated agents together.
const CONCURRENT_WRITES: usize = 64;

type ServiceKey = (String, String);

#[derive(Default)]
struct Placed {
    by_node: HashMap<String, BTreeSet<ServiceKey>>,
    by_service: HashMap<ServiceKey, BTreeSet<String>>,
}

/// When each node's latest heartbeat (Lease renewal) completed, on the benchmark's
/// clock. A node is live as long as that was less than the operator's
/// heartbeat timeout ago.
#[derive(Clone, Default)]
pub struct Heartbeats(Arc<Mutex<HashMap<String, Instant>>>);

impl Heartbeats {
    fn record(&self, node: &str, at: Instant) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), at);
    }

    /// Whether `node`'s heartbeats were on time at `at`: its latest write
    /// completed less than `timeout` before.
    pub fn on_time(&self, node: &str, at: Instant, timeout: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_some_and(|last| at.saturating_duration_since(*last) < timeout)
    }
}

/// The connection count a simulated agent reports for one service at its
/// `beat`th churning heartbeat: never zero, and different from one beat to
/// the next (the agents stop counting beats while churn is off, which
/// freezes every count).
pub fn connections(service: &str, node: &str, beat: u64) -> i64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (service, node).hash(&mut h);
    let base = h.finish() % 100;
    // 1..=100, moving by a step coprime to 100, so every beat changes it.
    1 + ((base + beat * 37) % 100) as i64
}

/// How simulated agents heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HeartbeatMode {
    /// Renew the node Lease; write the status when it changes.
    Lease,
    /// Write the status at every heartbeat (an agent without a Lease).
    Status,
}

pub struct Agents {
    stop: CancellationToken,
    /// Whether connection counts change at every heartbeat (on) or stay
    /// where they are (off).
    pub churn: Arc<AtomicBool>,
    pub heartbeats: Heartbeats,
    /// Lease renewals and status writes.
    pub writes: Arc<AtomicU64>,
    /// Status writes alone.
    pub status_writes: Arc<AtomicU64>,
    pub failures: Arc<AtomicU64>,
    /// How late the latest heartbeat was written, at worst, in ms: if this
    /// nears the operator's heartbeat timeout, the harness (not the
    /// operator) made nodes stale.
    pub latest_ms: Arc<AtomicU64>,
}

impl Agents {
    /// Creates each node's EdgeNode with a first report, then keeps them
    /// beating every `interval` (their Leases in `namespace`) until dropped.
    pub async fn start(
        client: Client,
        namespace: &str,
        nodes: Vec<(String, String)>,
        interval: Duration,
        connections_interval: Duration,
        mode: HeartbeatMode,
    ) -> anyhow::Result<Agents> {
        let api: Api<EdgeNode> = Api::all(client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let created = futures_util::stream::iter(nodes.iter().cloned())
            .map(|(name, address)| {
                let (api, params) = (api.clone(), params.clone());
                async move {
                    let mut node = EdgeNode::new(
                        &name,
                        EdgeNodeSpec {
                            address,
                            mesh_port: None,
                            mesh_public_key: None,
                        },
                    );
                    // The operator's node selector applies to EdgeNodes too;
                    // agents label theirs with --edge-node-label.
                    node.metadata.labels = Some(BTreeMap::from([(
                        EDGE_LABEL.to_string(),
                        "true".to_string(),
                    )]));
                    api.patch(&name, &params, &Patch::Apply(&node)).await?;
                    api.patch_status(&name, &params, &Patch::Apply(status(&[])))
                        .await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect::<Vec<_>>()
            .await;
        created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;

        let stop = CancellationToken::new();
        let placed = Arc::new(Mutex::new(Placed::default()));
        let notify: Arc<HashMap<String, Arc<Notify>>> = Arc::new(
            nodes
                .iter()
                .map(|(n, _)| (n.clone(), Arc::new(Notify::new())))
                .collect(),
        );
        let writes = Arc::new(AtomicU64::new(0));
        let status_writes = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let latest_ms = Arc::new(AtomicU64::new(0));
        let churn = Arc::new(AtomicBool::new(true));
        let heartbeats = Heartbeats::default();
        let created_at = Instant::now();
        for (node, _) in &nodes {
            heartbeats.record(node, created_at);
        }
        let permits = Arc::new(Semaphore::new(CONCURRENT_WRITES));

        let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
        tokio::spawn(follow_placement(
            Api::namespaced(client, namespace),
            Arc::clone(&placed),
            Arc::clone(&notify),
            stop.clone(),
        ));
        let count = nodes.len().max(1) as u32;
        for (i, (node, _)) in nodes.into_iter().enumerate() {
            let beat = Beat {
                api: api.clone(),
                leases: leases.clone(),
                node: node.clone(),
                placed: Arc::clone(&placed),
                wake: Arc::clone(&notify[&node]),
                permits: Arc::clone(&permits),
                writes: Arc::clone(&writes),
                status_writes: Arc::clone(&status_writes),
                failures: Arc::clone(&failures),
                latest_ms: Arc::clone(&latest_ms),
                churn: Arc::clone(&churn),
                heartbeats: heartbeats.clone(),
                interval,
                connections_interval,
                mode,
                // Spread the heartbeats evenly over the interval, as
                // independently started agents would be.
                offset: interval.mul_f64(f64::from(i as u32) / f64::from(count)),
            };
            tokio::spawn(beat.run(stop.clone()));
        }
        Ok(Agents {
            stop,
            churn,
            heartbeats,
            writes,
            status_writes,
            failures,
            latest_ms,
        })
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn status(services: &[NodeService]) -> serde_json::Value {
    let connections: i64 = services.iter().map(|s| s.connections).sum();
    json!({
        "apiVersion": "edgewire.dev/v1alpha1",
        "kind": "EdgeNode",
        "status": {
            "lastHeartbeat": Timestamp::now().to_string(),
            "agentVersion": "bench",
            "serviceCount": services.len(),
            "connections": connections,
            "services": services,
        },
    })
}

/// Keeps `placed` in step with the EdgeServices' PlacementSlices (as the
/// agent does), and wakes the agents whose services changed.
async fn follow_placement(
    api: Api<PlacementSlice>,
    placed: Arc<Mutex<Placed>>,
    notify: Arc<HashMap<String, Arc<Notify>>>,
    stop: CancellationToken,
) {
    let mut events = watcher(api, watcher::Config::default()).boxed();
    // Each slice's service and nodes; a service's placement is the union
    // of its slices'.
    let mut slices: HashMap<ServiceKey, (ServiceKey, BTreeSet<String>)> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        let (slice, deleted) = match event {
            Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => (s, false),
            Some(Ok(watcher::Event::Delete(s))) => (s, true),
            Some(Ok(_)) => continue,
            Some(Err(_)) => {
                // The watcher retries by itself; pace it.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            None => return,
        };
        let namespace = slice.namespace().unwrap_or_default();
        let key = (namespace.clone(), slice.spec.service.clone());
        let slice_key = (namespace, slice.name_any());
        if deleted {
            slices.remove(&slice_key);
        } else {
            let nodes = slice.spec.nodes.iter().map(|p| p.node.clone()).collect();
            slices.insert(slice_key, (key.clone(), nodes));
        }
        let now: BTreeSet<String> = slices
            .values()
            .filter(|(service, _)| service == &key)
            .flat_map(|(_, nodes)| nodes.iter().cloned())
            .collect();
        let changed: Vec<String> = {
            let mut placed = placed.lock().unwrap_or_else(|e| e.into_inner());
            let before = placed
                .by_service
                .insert(key.clone(), now.clone())
                .unwrap_or_default();
            let changed: Vec<String> = before.symmetric_difference(&now).cloned().collect();
            for node in before.difference(&now) {
                if let Some(set) = placed.by_node.get_mut(node) {
                    set.remove(&key);
                }
            }
            for node in now.difference(&before) {
                placed
                    .by_node
                    .entry(node.clone())
                    .or_default()
                    .insert(key.clone());
            }
            changed
        };
        for node in changed {
            if let Some(n) = notify.get(&node) {
                n.notify_one();
            }
        }
    }
}

struct Beat {
    api: Api<EdgeNode>,
    leases: Api<Lease>,
    node: String,
    placed: Arc<Mutex<Placed>>,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    writes: Arc<AtomicU64>,
    status_writes: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    latest_ms: Arc<AtomicU64>,
    churn: Arc<AtomicBool>,
    heartbeats: Heartbeats,
    interval: Duration,
    connections_interval: Duration,
    mode: HeartbeatMode,
    offset: Duration,
}

/// The status last written: what it said and when.
struct Reported {
    services: Vec<NodeService>,
    at: Instant,
}

/// Whether `services` is to be reported at `now`, after `last`: as the
/// agent decides with a working Lease (`node-agent/src/cluster/report.rs`).
fn report_due(
    last: Option<&Reported>,
    services: &[NodeService],
    connections_interval: Duration,
    now: Instant,
) -> bool {
    let Some(last) = last else { return true };
    let shape = |s: &[NodeService]| -> Vec<(String, String, bool)> {
        s.iter()
            .map(|s| (s.namespace.clone(), s.name.clone(), s.listening))
            .collect()
    };
    let counts = |s: &[NodeService]| -> Vec<i64> { s.iter().map(|s| s.connections).collect() };
    shape(&last.services) != shape(services)
        || (counts(&last.services) != counts(services)
            && now.saturating_duration_since(last.at) >= connections_interval)
}

impl Beat {
    async fn run(self, stop: CancellationToken) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut next = tokio::time::Instant::now() + self.offset;
        let mut beat: u64 = 0;
        let mut lease: Option<Lease> = None;
        let mut reported: Option<Reported> = None;
        loop {
            let renewal = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => true,
                _ = self.wake.notified() => false,
            };
            if self.churn.load(Ordering::Relaxed) {
                beat += 1;
            }
            let services: Vec<NodeService> = {
                let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
                placed
                    .by_node
                    .get(&self.node)
                    .into_iter()
                    .flatten()
                    .map(|(namespace, name)| NodeService {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        listening: true,
                        error: None,
                        connections: connections(name, &self.node, beat),
                        modules: Vec::new(),
                    })
                    .collect()
            };
            let Ok(_permit) = self.permits.acquire().await else {
                return;
            };
            let by_status = self.mode == HeartbeatMode::Status;
            if renewal && !by_status {
                match self.renew(lease.take()).await {
                    Ok(renewed) => {
                        lease = Some(renewed);
                        self.heartbeats.record(&self.node, Instant::now());
                        self.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let now = Instant::now();
            if (renewal && by_status)
                || report_due(reported.as_ref(), &services, self.connections_interval, now)
            {
                match self
                    .api
                    .patch_status(&self.node, &params, &Patch::Apply(status(&services)))
                    .await
                {
                    Ok(_) => {
                        // A status report is a heartbeat to the operator too.
                        self.heartbeats.record(&self.node, Instant::now());
                        self.writes.fetch_add(1, Ordering::Relaxed);
                        self.status_writes.fetch_add(1, Ordering::Relaxed);
                        reported = Some(Reported { services, at: now });
                    }
                    Err(_) => {
                        self.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if renewal {
                let now = tokio::time::Instant::now();
                let late = now.saturating_duration_since(next).as_millis() as u64;
                self.latest_ms.fetch_max(late, Ordering::Relaxed);
                next = now + self.interval;
            }
        }
    }

    /// Renews the node's Lease (`current`, as last written), creating it the
    /// first time.
    async fn renew(&self, current: Option<Lease>) -> kube::Result<Lease> {
        let name = node_lease::name(&self.node);
        let duration = Some(node_lease::duration_seconds(self.interval));
        let previous = match current {
            Some(lease) => lease,
            None => match self.leases.get_opt(&name).await? {
                Some(lease) => lease,
                None => {
                    let fresh = node_lease::renewed(&self.node, Timestamp::now(), duration, None);
                    return self.leases.create(&PostParams::default(), &fresh).await;
                }
            },
        };
        let renewed = node_lease::renewed(&self.node, Timestamp::now(), duration, Some(previous));
        self.leases
            .replace(&name, &PostParams::default(), &renewed)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_counts_are_never_zero_and_change_every_beat() {
        for beat in 0..200 {
            let now = connections("svc-0001", "edge-00001", beat);
            let next = connections("svc-0001", "edge-00001", beat + 1);
            assert!((1..=100).contains(&now));
            assert_ne!(now, next, "beat {beat}");
            assert_eq!(now, connections("svc-0001", "edge-00001", beat));
        }
    }

    #[test]
    fn on_time_while_the_latest_heartbeat_is_younger_than_the_timeout() {
        let beats = Heartbeats::default();
        let t0 = Instant::now();
        beats.record("a", t0);
        let timeout = Duration::from_secs(60);
        assert!(beats.on_time("a", t0 + Duration::from_secs(59), timeout));
        assert!(!beats.on_time("a", t0 + Duration::from_secs(60), timeout));
        assert!(!beats.on_time("unknown", t0, timeout));
    }

    #[test]
    fn a_report_is_due_for_new_services_at_once_and_for_counts_alone_after_the_interval() {
        let t0 = Instant::now();
        let service = |listening, connections| NodeService {
            namespace: "ns".into(),
            name: "svc".into(),
            listening,
            error: None,
            connections,
            modules: Vec::new(),
        };
        let interval = Duration::from_secs(60);
        assert!(report_due(None, &[], interval, t0));
        let last = Reported {
            services: vec![service(true, 3)],
            at: t0,
        };
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!report_due(
            Some(&last),
            &[service(true, 3)],
            interval,
            at(600)
        ));
        assert!(report_due(Some(&last), &[], interval, at(1)));
        assert!(report_due(
            Some(&last),
            &[service(false, 3)],
            interval,
            at(1)
        ));
        assert!(!report_due(
            Some(&last),
            &[service(true, 4)],
            interval,
            at(59)
        ));
        assert!(report_due(
            Some(&last),
            &[service(true, 4)],
            interval,
            at(60)
        ));
    }
}
