//! The benchmark's steps against the control plane (bounded waits with a
//! progress line), the operator process, and the report.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgewire_api::crd::{EdgeNode, EdgeService};
use edgewire_testenv::{ControlPlane, NodeSpec};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::fleet::{self, SITE_LABEL};
use crate::progress;
use crate::promtext::Scrape;
use crate::report::Waited;

const CONCURRENCY: usize = 16;

/// How often a wait looks at its cache: the figures' resolution.
const POLL: Duration = Duration::from_millis(250);

/// Every object of a kind in a namespace, kept current by a watch. The
/// waits read this cache: listing hundreds of objects every poll would load
/// the API server whose work is being timed.
struct Watched<K: kube::Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    store: Store<K>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Watched<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    async fn start(api: Api<K>) -> anyhow::Result<Watched<K>> {
        let (store, writer) = reflector::store();
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        // The watcher retries its own errors; draining the stream is all.
        let task = tokio::spawn(events.for_each(|_| async {}));
        store
            .wait_until_ready()
            .await
            .context("the watch never listed")?;
        Ok(Watched { store, task })
    }
}

impl<K: kube::Resource + 'static> Drop for Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every step needs: the client, the bound on each wait, the end of
/// the run's whole time budget if it has one, and the run's start for
/// progress lines.
pub struct Bench {
    pub client: Client,
    pub limit: Duration,
    pub deadline: Option<Instant>,
    pub started: Instant,
}

impl Bench {
    fn progress(&self, text: impl std::fmt::Display) {
        progress(self.started, text);
    }

    pub async fn create_nodes(&self, specs: &[NodeSpec]) -> anyhow::Result<()> {
        let mut done = 0;
        let mut results = futures_util::stream::iter(specs.chunks(50))
            .map(|chunk| edgewire_testenv::add_nodes(&self.client, chunk))
            .buffer_unordered(CONCURRENCY / 4);
        while let Some(result) = results.next().await {
            result.context("creating kwok nodes")?;
            done += 50;
            if done % 250 == 0 {
                self.progress(format!(
                    "  {} of {} nodes created",
                    done.min(specs.len()),
                    specs.len()
                ));
            }
        }
        Ok(())
    }

    /// Whether the run's time budget is spent.
    pub fn over_budget(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Polls until `check` says done (returning how long it took from
    /// `t0`), or the limit or the run's budget passes (how far it got). A
    /// progress line every 5 s.
    async fn wait_for<F, Fut>(
        &self,
        what: &str,
        t0: Instant,
        mut check: F,
    ) -> anyhow::Result<Waited>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<(bool, String)>>,
    {
        let mut last_line = Instant::now();
        loop {
            let (done, state) = check().await?;
            if done {
                return Ok(Ok(t0.elapsed()));
            }
            let why = if t0.elapsed() > self.limit {
                Some(format!("not reached in {} s", self.limit.as_secs()))
            } else if self.over_budget() {
                Some(format!(
                    "not reached in {:.0} s, when the run's time budget ran out",
                    t0.elapsed().as_secs_f64()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.progress(format!("  {what}: {why} ({state})"));
                return Ok(Err(format!("{why}: {state}")));
            }
            if last_line.elapsed() >= Duration::from_secs(5) {
                self.progress(format!("  {what}: {state}"));
                last_line = Instant::now();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn wait_nodes_ready(&self, count: usize) -> anyhow::Result<Waited> {
        self.wait_all_ready("nodes Ready", count, edgewire_testenv::nodes::is_ready)
            .await
    }

    /// Every EdgeNode `Ready=True`: the operator has judged each agent's
    /// heartbeat once. A rollout is measured on a fleet the operator already
    /// knows, not beside its first pass over every node.
    pub async fn wait_edgenodes_ready(&self, count: usize) -> anyhow::Result<Waited> {
        self.wait_all_ready("EdgeNodes Ready", count, |n: &EdgeNode| {
            n.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await
    }

    /// Until `count` objects of the cluster-wide kind `K` are `ready`, read
    /// from a watch.
    async fn wait_all_ready<K>(
        &self,
        what: &str,
        count: usize,
        ready: impl Fn(&K) -> bool,
    ) -> anyhow::Result<Waited>
    where
        K: kube::Resource<Scope = kube::core::ClusterResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let watched = Watched::<K>::start(Api::all(self.client.clone())).await?;
        self.wait_for(what, Instant::now(), || {
            let n = watched.store.state().iter().filter(|o| ready(o)).count();
            async move { Ok((n >= count, format!("{n}/{count} Ready"))) }
        })
        .await
    }

    /// Server-side applies every object, CONCURRENCY at a time, with a
    /// progress line every 100.
    pub async fn apply_all<K>(
        &self,
        namespace: &str,
        objects: &[K],
        what: &str,
    ) -> anyhow::Result<()>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams::apply("edgewire-bench").force();
        let mut applied = futures_util::stream::iter(objects.iter())
            .map(|object| {
                let (api, params) = (api.clone(), params.clone());
                async move {
                    api.patch(&object.name_any(), &params, &Patch::Apply(object))
                        .await
                }
            })
            .buffer_unordered(CONCURRENCY);
        let mut done = 0;
        while let Some(result) = applied.next().await {
            result.with_context(|| format!("applying one of the {what}"))?;
            done += 1;
            if done % 100 == 0 {
                self.progress(format!("  {done} of {} {what} applied", objects.len()));
            }
        }
        Ok(())
    }

    /// Every EdgeService Ready for its current generation, and placed only
    /// on nodes whose site (per `site_of`) is the one it selects.
    pub async fn wait_services_settled(
        &self,
        namespace: &str,
        site_of: &BTreeMap<String, String>,
        count: usize,
        t0: Instant,
    ) -> anyhow::Result<Waited> {
        let watched =
            Watched::<EdgeService>::start(Api::namespaced(self.client.clone(), namespace)).await?;
        self.wait_for("EdgeServices settled", t0, || async {
            let (mut ready, mut misplaced) = (0, 0);
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            for es in watched.store.state() {
                let Some(status) = &es.status else { continue };
                let is_ready = status.observed_generation == es.metadata.generation
                    && status
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                let wanted = es.spec.node_selector.get(SITE_LABEL);
                let placed_well = status
                    .placement
                    .iter()
                    .all(|p| site_of.get(&p.node) == wanted);
                ready += usize::from(is_ready && placed_well);
                misplaced += usize::from(!placed_well);
                if !is_ready {
                    let reason = status.conditions.iter().find(|c| c.type_ == "Ready");
                    *reasons
                        .entry(reason.map_or("none".into(), |c| c.reason.clone()))
                        .or_default() += 1;
                }
            }
            Ok((
                ready >= count,
                format!(
                    "{ready}/{count} Ready and placed right, {misplaced} on moved nodes; not Ready: {reasons:?}"
                ),
            ))
        })
        .await
    }

    pub async fn relabel(&self, moves: &[(usize, String)]) -> anyhow::Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        let mut patched = futures_util::stream::iter(moves.iter())
            .map(|(i, site)| {
                let api = api.clone();
                async move {
                    let patch = json!({"metadata": {"labels": {SITE_LABEL: site}}});
                    api.patch(
                        &fleet::node_name(*i),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(result) = patched.next().await {
            result.context("relabelling a node")?;
        }
        self.progress(format!("  {} nodes relabelled", moves.len()));
        Ok(())
    }

    pub async fn wait_deployments_available(
        &self,
        namespace: &str,
        count: usize,
        replicas: usize,
        t0: Instant,
    ) -> anyhow::Result<(Waited, String)> {
        let watched =
            Watched::<Deployment>::start(Api::namespaced(self.client.clone(), namespace)).await?;
        // What the Deployments stand on, for the progress lines: their pods
        // and the nodes' Ready condition (set by the node lifecycle
        // controller from kwok's node leases).
        let pods = Watched::<Pod>::start(Api::namespaced(self.client.clone(), namespace)).await?;
        let nodes = Watched::<Node>::start(Api::all(self.client.clone())).await?;
        let mut last = String::new();
        let waited = self
            .wait_for("Deployments available", t0, || {
                let state = format!(
                    "{}/{count} fully available; {}",
                    watched
                        .store
                        .state()
                        .iter()
                        .filter(|d| {
                            d.status
                                .as_ref()
                                .and_then(|s| s.available_replicas)
                                .unwrap_or(0) as usize
                                >= replicas
                        })
                        .count(),
                    peer_state(&pods.store.state(), &nodes.store.state())
                );
                let done = state.starts_with(&format!("{count}/{count} "));
                last = state.clone();
                async move { Ok((done, state)) }
            })
            .await?;
        Ok((waited, last))
    }
}

/// The operator under test, as a process with the admin kubeconfig.
pub struct Operator {
    child: Child,
    metrics_port: u16,
    /// Kept after the run, for a look at what the operator did.
    pub log: std::path::PathBuf,
}

impl Operator {
    pub async fn start(
        binary: &Path,
        plane: &ControlPlane,
        namespace: &str,
        heartbeat_timeout: u64,
        log_level: &str,
        extra_args: &[String],
    ) -> anyhow::Result<Operator> {
        let log = std::env::temp_dir().join(format!(
            "edgewire-opbench-operator-{}.log",
            std::process::id()
        ));
        let metrics_port = edgewire_testenv::free_port()?;
        let mut command = Command::new(binary);
        // An interrupted benchmark must not leave the operator running.
        // SAFETY: the closure only makes an async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .arg("run")
            .args(["--metrics-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--lease-namespace", namespace])
            .args(["--watch-namespace", namespace])
            .args(["--node-selector", &format!("{}=true", fleet::EDGE_LABEL)])
            .args(["--identity", "bench"])
            .args(["--heartbeat-timeout", &heartbeat_timeout.to_string()])
            .args(["--log-level", log_level])
            .args(extra_args)
            .env("KUBECONFIG", &plane.kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .with_context(|| format!("creating {}", log.display()))?,
            )
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let operator = Operator {
            child,
            metrics_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while operator.scrape().await.sum("edgewire_operator_leader", "") < 1.0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the operator did not lead within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(operator)
    }

    pub async fn scrape(&self) -> Scrape {
        Scrape::parse(&edgewire_testenv::http_get(self.metrics_port, "/metrics").await)
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    pub fn max_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line on the peer's pods and nodes: how many pods exist, are bound,
/// Running and Ready, and how many nodes are not Ready or carry a taint.
pub fn peer_state(pods: &[std::sync::Arc<Pod>], nodes: &[std::sync::Arc<Node>]) -> String {
    let bound = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        .count();
    let running = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    let ready = pods
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    let not_ready = nodes
        .iter()
        .filter(|n| !edgewire_testenv::nodes::is_ready(n))
        .count();
    let tainted = nodes
        .iter()
        .filter(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    format!(
        "pods: {} created, {bound} bound, {running} Running, {ready} Ready; nodes: {not_ready} not Ready, {tainted} tainted",
        pods.len(),
    )
}
/// CPU time (user and system) process `pid` has used so far, in seconds,
/// from `/proc/<pid>/stat`: how much work the API server did in a phase,
/// a steadier figure than how long the phase took on a shared machine.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}
