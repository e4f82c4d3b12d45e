//! The benchmark's steps against the control plane (bounded waits with a
//! progress line), the operator process, and the report.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use edgewire_api::crd::EdgeService;
use edgewire_testenv::{ControlPlane, NodeSpec};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::fleet::{self, SITE_LABEL, Shape};
use crate::progress;
use crate::promtext::{Scrape, quantile};

const CONCURRENCY: usize = 16;

/// How long a wait took, or how far it got before its limit.
pub type Waited = Result<Duration, String>;
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
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    async fn start(client: &Client, namespace: &str) -> anyhow::Result<Watched<K>> {
        let (store, writer) = reflector::store();
        let events = watcher(
            Api::<K>::namespaced(client.clone(), namespace),
            watcher::Config::default(),
        )
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

/// What every step needs: the client, the bound on each wait, and the
/// run's start for progress lines.
pub struct Bench {
    pub client: Client,
    pub limit: Duration,
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

    /// Polls until `check` says done (returning how long it took from
    /// `t0`), or the limit passes (None). A progress line every 5 s.
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
            if t0.elapsed() > self.limit {
                self.progress(format!(
                    "  {what}: not reached in {:?} ({state})",
                    self.limit
                ));
                return Ok(Err(format!(
                    "not reached in {} s: {state}",
                    self.limit.as_secs()
                )));
            }
            if last_line.elapsed() >= Duration::from_secs(5) {
                self.progress(format!("  {what}: {state}"));
                last_line = Instant::now();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn wait_nodes_ready(&self, count: usize) -> anyhow::Result<Waited> {
        let api: Api<Node> = Api::all(self.client.clone());
        let selector = ListParams::default().labels(&format!("{}=true", fleet::EDGE_LABEL));
        self.wait_for("nodes Ready", Instant::now(), || async {
            let list = api.list(&selector).await?;
            let ready = list
                .items
                .iter()
                .filter(|n| edgewire_testenv::nodes::is_ready(n))
                .count();
            Ok((ready >= count, format!("{ready}/{count} Ready")))
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
        let watched = Watched::<EdgeService>::start(&self.client, namespace).await?;
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
    ) -> anyhow::Result<Waited> {
        let watched = Watched::<Deployment>::start(&self.client, namespace).await?;
        self.wait_for("Deployments available", t0, || async {
            let available = watched
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
                .count();
            Ok((
                available >= count,
                format!("{available}/{count} fully available"),
            ))
        })
        .await
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

/// What the operator did between two scrapes.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub service_reconciles: f64,
    pub node_reconciles: f64,
    pub errors: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub api_requests: f64,
    pub writes: f64,
}

impl Figures {
    pub fn between(before: &Scrape, after: &Scrape) -> Figures {
        let delta =
            |metric: &str, filter: &str| after.sum(metric, filter) - before.sum(metric, filter);
        let duration = "edgewire_operator_reconcile_duration_seconds";
        let es = "controller=\"edgeservice\"";
        Figures {
            service_reconciles: delta(&format!("{duration}_count"), es),
            node_reconciles: delta(&format!("{duration}_count"), "controller=\"edgenode\""),
            errors: delta("edgewire_operator_reconcile_errors_total", ""),
            p50: quantile(before, after, duration, es, 0.5),
            p99: quantile(before, after, duration, es, 0.99),
            api_requests: delta("edgewire_operator_api_requests_total", ""),
            writes: delta("edgewire_operator_writes_total", ""),
        }
    }

    fn per_reconcile(&self, n: f64) -> String {
        let reconciles = self.service_reconciles + self.node_reconciles;
        if reconciles > 0.0 {
            format!("{:.2}", n / reconciles)
        } else {
            "n/a".into()
        }
    }
}

pub struct Report {
    shape: Shape,
    version: String,
    heartbeat_interval: u64,
    heartbeat_timeout: u64,
    pub applied_in: Duration,
    pub all_ready: Waited,
    pub apply: Figures,
    pub steady: Figures,
    pub steady_seconds: f64,
    pub relabelled: usize,
    pub relabel_settled: Waited,
    pub relabel: Figures,
    pub idle_rss_kib: u64,
    pub apply_rss_kib: u64,
    pub relabel_rss_kib: u64,
    pub max_rss_kib: u64,
    pub agent_writes: u64,
    pub agent_failures: u64,
    pub heartbeat_late_ms: u64,
    pub peer_all_available: Waited,
}

fn secs(d: &Waited) -> String {
    match d {
        Ok(d) => format!("{:.1} s", d.as_secs_f64()),
        Err(state) => state.clone(),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{:.1} ms", v * 1000.0))
}

impl Report {
    pub fn new(
        shape: Shape,
        version: String,
        heartbeat_interval: u64,
        heartbeat_timeout: u64,
    ) -> Report {
        Report {
            shape,
            version,
            heartbeat_interval,
            heartbeat_timeout,
            applied_in: Duration::ZERO,
            all_ready: Err("not run".into()),
            apply: Figures::default(),
            steady: Figures::default(),
            steady_seconds: 0.0,
            relabelled: 0,
            relabel_settled: Err("not run".into()),
            relabel: Figures::default(),
            idle_rss_kib: 0,
            apply_rss_kib: 0,
            relabel_rss_kib: 0,
            max_rss_kib: 0,
            agent_writes: 0,
            agent_failures: 0,
            heartbeat_late_ms: 0,
            peer_all_available: Err("not run".into()),
        }
    }

    pub fn render(&self) -> String {
        let s = &self.shape;
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        let row = |label: &str, f: &Figures| {
            format!(
                "| {label} | {:.0} | {:.0} | {} | {} | {:.0} | {} | {:.0} | {} | {:.0} |",
                f.service_reconciles,
                f.node_reconciles,
                ms(f.p50),
                ms(f.p99),
                f.api_requests,
                f.per_reconcile(f.api_requests),
                f.writes,
                f.per_reconcile(f.writes),
                f.errors,
            )
        };
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let ratio = match (&self.all_ready, &self.peer_all_available) {
            (Ok(a), Ok(b)) if b.as_secs_f64() > 0.0 => {
                let r = a.as_secs_f64() / b.as_secs_f64();
                format!("{r:.2} ({})", if r < 1.0 { "better" } else { "worse" })
            }
            _ => "n/a".into(),
        };
        [
            format!(
                "Kubernetes {} (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) on {cores} cores; \
                 {} kwok nodes in {} sites × {} zones; {} EdgeServices, each on at most {} nodes of one site, spread by zone; \
                 simulated agents heartbeat every {} s, operator heartbeat timeout {} s.",
                self.version, s.nodes, s.sites, s.zones, s.services, s.max_nodes, self.heartbeat_interval, self.heartbeat_timeout
            ),
            String::new(),
            "| from apply to settled | edgewire-operator | Deployments (kube-scheduler, controller manager, kwok) | edgewire/Deployments |".into(),
            "| --- | --- | --- | --- |".into(),
            format!(
                "| {} services on {} nodes each: apply to all Ready / Available | {} | {} | {ratio} |",
                s.services,
                s.max_nodes,
                secs(&self.all_ready),
                secs(&self.peer_all_available)
            ),
            format!(
                "| burst of {} node relabels: to every service Ready on its site's nodes | {} | not comparable: a Deployment's pods stay where they were scheduled | |",
                self.relabelled,
                secs(&self.relabel_settled)
            ),
            String::new(),
            "| phase | EdgeService reconciles | EdgeNode reconciles | reconcile p50 | reconcile p99 | API requests | per reconcile | writes | per reconcile | errors |".into(),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into(),
            row(&format!("apply {} EdgeServices (applied in {:.1} s)", s.services, self.applied_in.as_secs_f64()), &self.apply),
            row(&format!("steady state, {:.0} s of heartbeats", self.steady_seconds), &self.steady),
            row(&format!("{} node relabels", self.relabelled), &self.relabel),
            String::new(),
            format!(
                "Operator memory (RSS): {} at start, {} with every service Ready, {} after the relabels, {} at peak. \
                 Simulated agents wrote {} EdgeNode statuses ({} failed); their latest heartbeat was {:.1} s \
                 late (nodes go stale after {} s).",
                mib(self.idle_rss_kib),
                mib(self.apply_rss_kib),
                mib(self.relabel_rss_kib),
                mib(self.max_rss_kib),
                self.agent_writes,
                self.agent_failures,
                self.heartbeat_late_ms as f64 / 1000.0,
                self.heartbeat_timeout
            ),
        ]
        .join("\n")
    }
}
