//! Operator test support: the operator binary as a process against the shared
//! real control plane, scoped to one test's namespace and nodes; kwok nodes;
//! and EdgeNode heartbeats written the way an agent writes them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewire_api::crd::{EdgeNode, EdgeNodeSpec, EdgeService, NodeService};
use edgewire_api::node_lease;
use edgewire_testenv::{ControlPlane, NodeSpec, TestNamespace};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

pub const WAIT: Duration = Duration::from_secs(60);
pub const TEST_LABEL: &str = "edgewire.dev/test";
pub const EDGE_LABEL: &str = "edgewire.dev/edge";
/// Agents' heartbeat timeout in these tests: short, so staleness is quick.
pub const HEARTBEAT_TIMEOUT_SECS: u64 = 3;

pub fn committed_crds() -> Vec<CustomResourceDefinition> {
    edgewire_testenv::read_crds(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds"
    )))
    .expect("the committed CRDs")
}

/// Everything one test needs: the control plane, a namespace, a client.
pub struct Env {
    pub plane: &'static ControlPlane,
    pub ns: TestNamespace,
    pub client: Client,
}

impl Env {
    pub async fn new(prefix: &str) -> Env {
        let plane = edgewire_testenv::shared().await.expect("control plane");
        let client = plane.client().await.unwrap();
        edgewire_testenv::install_crds(&client, &committed_crds())
            .await
            .unwrap();
        let ns = TestNamespace::create(plane, prefix).await.unwrap();
        Env { plane, ns, client }
    }

    pub fn name(&self) -> &str {
        &self.ns.name
    }

    /// `n` kwok nodes named `<ns>-<i>`, labelled for this test (and `extra`),
    /// each with the InternalIP 192.0.2.x (a documentation range: never
    /// contacted, but valid in EndpointSlices) and an EdgeNode claiming it.
    pub async fn nodes(&self, names: &[&str], extra: &[(&str, &str)]) -> Vec<String> {
        let mut specs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let node_name = format!("{}-{name}", self.name());
            let ip = format!("192.0.2.{}", address_octet(&node_name, i));
            let mut spec = NodeSpec::new(node_name)
                .label(TEST_LABEL, self.name())
                .internal_ip(ip);
            for (k, v) in extra {
                spec = spec.label(k, v);
            }
            specs.push(spec);
        }
        edgewire_testenv::add_nodes(&self.client, &specs)
            .await
            .unwrap();
        let edge_nodes: Api<EdgeNode> = Api::all(self.client.clone());
        for (i, spec) in specs.iter().enumerate() {
            let mut en = EdgeNode::new(
                &spec.name,
                EdgeNodeSpec {
                    address: format!("192.0.2.{}", address_octet(&spec.name, i)),
                    mesh_port: None,
                    mesh_public_key: None,
                },
            );
            en.metadata.labels = Some(BTreeMap::from([(
                TEST_LABEL.to_string(),
                self.name().to_string(),
            )]));
            edge_nodes
                .create(&PostParams::default(), &en)
                .await
                .unwrap();
        }
        specs.into_iter().map(|s| s.name).collect()
    }

    pub async fn set_node_label(&self, node: &str, key: &str, value: Option<&str>) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let patch = json!({"metadata": {"labels": {key: value}}});
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    pub fn es_api(&self) -> Api<EdgeService> {
        Api::namespaced(self.client.clone(), self.name())
    }

    /// Applies an EdgeService from YAML (its `metadata.name` inside).
    pub async fn apply_es(&self, yaml: &str) -> EdgeService {
        let es: EdgeService = serde_yaml_ng::from_str(yaml).unwrap();
        self.es_api()
            .patch(
                &es.name_any(),
                &PatchParams::apply("test").force(),
                &Patch::Apply(&es),
            )
            .await
            .unwrap()
    }

    /// Polls the EdgeService until `check` holds; returns it.
    pub async fn wait_es(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&EdgeService) -> bool,
    ) -> EdgeService {
        let api = self.es_api();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let es = api.get(name).await.unwrap();
            if check(&es) {
                return es;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {name}: {what}; status: {}",
                serde_json::to_string_pretty(&es.status).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn cleanup_nodes(&self, names: &[String]) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let edge_nodes: Api<EdgeNode> = Api::all(self.client.clone());
        for name in names {
            let _ = nodes.delete(name, &DeleteParams::default()).await;
            let _ = edge_nodes.delete(name, &DeleteParams::default()).await;
        }
    }
}

fn address_octet(name: &str, i: usize) -> usize {
    // Distinct per node within a test; the test namespace keeps names unique.
    let _ = name;
    i + 1
}

/// Placed node names, sorted.
pub fn placed(es: &EdgeService) -> Vec<String> {
    let mut nodes: Vec<String> = es
        .status
        .iter()
        .flat_map(|s| s.placement.iter().map(|p| p.node.clone()))
        .collect();
    nodes.sort();
    nodes
}

pub fn condition<'a>(es: &'a EdgeService, type_: &str) -> Option<(&'a str, &'a str)> {
    es.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// How simulated agents heartbeat.
#[derive(Clone, Copy)]
enum Beat {
    /// A status report, with the same connection count each time or a
    /// different one (`churn`).
    Status { churn: bool },
    /// A renewal of the node's Lease in the test namespace (the operator's
    /// --lease-namespace), with no status report.
    Lease,
}

/// Writes heartbeats for a set of nodes every 500 ms, as their agents would:
/// each beating node reports every EdgeService of the test namespace as
/// listening (or, from `leases`, renews its node Lease). A node can be
/// silenced and resumed.
pub struct Heartbeats {
    beating: Arc<Mutex<BTreeMap<String, bool>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeats {
    pub fn start(client: Client, namespace: &str, nodes: &[String]) -> Heartbeats {
        Heartbeats::spawn(client, namespace, nodes, Beat::Status { churn: false })
    }

    /// Like `start`, but every heartbeat reports a different connection
    /// count, as busy agents do.
    pub fn churning(client: Client, namespace: &str, nodes: &[String]) -> Heartbeats {
        Heartbeats::spawn(client, namespace, nodes, Beat::Status { churn: true })
    }

    /// Heartbeats by node Lease renewals alone, as agents with a Lease send
    /// them while they have nothing new to report.
    pub fn leases(client: Client, namespace: &str, nodes: &[String]) -> Heartbeats {
        Heartbeats::spawn(client, namespace, nodes, Beat::Lease)
    }

    fn spawn(client: Client, namespace: &str, nodes: &[String], beat: Beat) -> Heartbeats {
        let beating = Arc::new(Mutex::new(
            nodes
                .iter()
                .map(|n| (n.clone(), true))
                .collect::<BTreeMap<_, _>>(),
        ));
        let shared = Arc::clone(&beating);
        let namespace = namespace.to_string();
        let task = tokio::spawn(async move {
            let edge_nodes: Api<EdgeNode> = Api::all(client.clone());
            let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
            let services: Api<EdgeService> = Api::namespaced(client, &namespace);
            let params = PatchParams::apply("test-agent").force();
            let mut round: i64 = 0;
            loop {
                round += 1;
                let connections = match beat {
                    Beat::Status { churn: true } => 10 + round % 7,
                    _ => 2,
                };
                let names: Vec<String> = services
                    .list(&Default::default())
                    .await
                    .map(|l| l.items.iter().map(ResourceExt::name_any).collect())
                    .unwrap_or_default();
                let now = Timestamp::now();
                let current: Vec<(String, bool)> = shared
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                for (node, on) in current {
                    if !on {
                        continue;
                    }
                    if let Beat::Lease = beat {
                        let name = node_lease::name(&node);
                        // Applied whole every beat: without acquireTime,
                        // which a renewal keeps.
                        let mut lease = node_lease::renewed(&node, now, None, None);
                        if let Some(spec) = lease.spec.as_mut() {
                            spec.acquire_time = None;
                        }
                        let _ = leases.patch(&name, &params, &Patch::Apply(&lease)).await;
                        continue;
                    }
                    let reported: Vec<NodeService> = names
                        .iter()
                        .map(|name| NodeService {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            listening: true,
                            error: None,
                            connections,
                            modules: Vec::new(),
                        })
                        .collect();
                    let patch = json!({
                        "apiVersion": "edgewire.dev/v1alpha1",
                        "kind": "EdgeNode",
                        "status": {
                            "lastHeartbeat": now.to_string(),
                            "services": reported,
                            "serviceCount": reported.len(),
                            "connections": connections * reported.len() as i64,
                        },
                    });
                    let _ = edge_nodes
                        .patch_status(&node, &params, &Patch::Apply(&patch))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Heartbeats { beating, task }
    }

    pub fn set(&self, node: &str, on: bool) {
        self.beating.lock().unwrap().insert(node.to_string(), on);
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The operator binary, scoped to one test's namespace and nodes.
pub struct Operator {
    child: Child,
    pub metrics_port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    pub fn start(env: &Env, identity: &str) -> Operator {
        Operator::start_with_kubeconfig(env, identity, &env.plane.kubeconfig)
    }

    /// As `start`, with the credentials of another kubeconfig.
    pub fn start_with_kubeconfig(
        env: &Env,
        identity: &str,
        kubeconfig: &std::path::Path,
    ) -> Operator {
        Operator::spawn(env, identity, kubeconfig, &[])
    }

    /// As `start`, with more command-line arguments.
    pub fn start_with_args(env: &Env, identity: &str, args: &[&str]) -> Operator {
        Operator::spawn(env, identity, &env.plane.kubeconfig, args)
    }

    fn spawn(env: &Env, identity: &str, kubeconfig: &std::path::Path, args: &[&str]) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let metrics_port = edgewire_testenv::free_port().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgewire-operator"))
            .arg("run")
            .args(["--metrics-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--lease-namespace", env.name()])
            .args(["--watch-namespace", env.name()])
            .args(["--node-selector", &format!("{TEST_LABEL}={}", env.name())])
            .args(["--identity", identity])
            .args(["--lease-duration", "6"])
            .args(["--renew-deadline", "4"])
            .args(["--retry-period", "1"])
            .args(["--heartbeat-timeout", &HEARTBEAT_TIMEOUT_SECS.to_string()])
            .args(["--eviction-timeout", "120"])
            .args(["--log-level", "edgewire_operator=debug,info"])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start edgewire-operator");
        Operator {
            child,
            metrics_port,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn metrics(&self) -> String {
        edgewire_testenv::http_get(self.metrics_port, "/metrics").await
    }

    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// SIGTERM, and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "operator did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `helm template` of the chart as release `release` in the test namespace,
/// with `--set` values; the rendered objects.
pub fn render_chart(env: &Env, release: &str, sets: &[&str]) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/edgewire");
    let mut helm = env.plane.helm().unwrap();
    helm.args(["template", release, chart, "--namespace", env.name()]);
    for set in sets {
        helm.args(["--set", set]);
    }
    let out = helm.output().unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// Objects applied with kubectl, deleted again when dropped (also when the
/// test fails).
pub struct Applied {
    file: tempfile::NamedTempFile,
    plane: &'static ControlPlane,
}

impl Applied {
    pub fn new(plane: &'static ControlPlane, objects: &[serde_json::Value]) -> Applied {
        let file = tempfile::NamedTempFile::new().unwrap();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        std::fs::write(file.path(), list.to_string()).unwrap();
        let out = plane
            .kubectl()
            .unwrap()
            .args(["apply", "-f"])
            .arg(file.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Applied { file, plane }
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        if let Ok(mut kubectl) = self.plane.kubectl() {
            let _ = kubectl
                .args(["delete", "--ignore-not-found", "--wait=false", "-f"])
                .arg(self.file.path())
                .output();
        }
    }
}
