//! The operator's promises under faults that edge fleets meet every day,
//! with real agent processes and the real control plane: agent clocks that
//! are minutes off (libfaketime), and an API server outage longer than the
//! heartbeat timeout. Each test has a control plane of its own.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeService};
use edgewire_testenv::{ControlPlane, NodeSpec};
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use support::cluster::*;
use support::prometheus::Killed;
use support::*;

/// The operator's heartbeat timeout in these tests.
const TIMEOUT: Duration = Duration::from_secs(5);
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A control plane with kwok nodes, the operator, and one EdgeService `chat`
/// selecting every node. Each agent listens on its own loopback address and
/// advertises the node's address, 192.0.2.x (a documentation range, never
/// contacted): EndpointSlices refuse loopback addresses.
struct Fleet {
    /// First, so it is stopped before the control plane.
    operator: Option<Killed>,
    plane: ControlPlane,
    client: kube::Client,
    namespace: String,
    port: u16,
    /// Name, listen address, advertised address, state directory.
    nodes: Vec<(String, String, String, tempfile::TempDir)>,
    logs: tempfile::TempDir,
}

impl Fleet {
    async fn start(ips: &[&str]) -> Fleet {
        let namespace = "faults".to_string();
        let (plane, client) = start_plane(&[&namespace]).await;
        let mut nodes = Vec::new();
        let mut specs = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let name = format!("edge-{i}");
            let advertised = advertised(ip);
            specs.push(
                NodeSpec::new(&name)
                    .label("edgewire.dev/edge", "true")
                    .label("edgewire.dev/test", &namespace)
                    .internal_ip(&advertised),
            );
            nodes.push((
                name,
                ip.to_string(),
                advertised,
                tempfile::tempdir().expect("state dir"),
            ));
        }
        edgewire_testenv::add_nodes(&client, &specs)
            .await
            .expect("kwok nodes");
        let mut fleet = Fleet {
            plane,
            client,
            namespace,
            port: free_port(),
            nodes,
            operator: None,
            logs: tempfile::tempdir().expect("log dir"),
        };
        fleet.start_operator();
        fleet.apply_chat().await;
        fleet
    }

    fn start_operator(&mut self) {
        let timeout = TIMEOUT.as_secs().to_string();
        self.operator = Some(spawn_operator(
            &self.plane.kubeconfig,
            &self.namespace,
            &self.operator_log(),
            &[
                "--heartbeat-timeout",
                &timeout,
                "--log-level",
                "edgewire_operator=debug,info",
            ],
        ));
    }

    fn operator_log(&self) -> std::path::PathBuf {
        self.logs.path().join("operator.log")
    }

    fn operator_output(&self) -> String {
        std::fs::read_to_string(self.operator_log()).unwrap_or_default()
    }

    /// The agent of node `i` in cluster mode, with extra environment (the
    /// clock shift).
    fn agent(&self, i: usize, env: &[(&str, String)]) -> AgentProcess {
        let (name, ip, advertised, state) = &self.nodes[i];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        spawn_cluster_agent_with_env(
            &self.plane.kubeconfig,
            &self.namespace,
            name,
            (ip, advertised),
            state.path(),
            &[],
            &env,
        )
    }

    async fn apply_chat(&self) {
        let yaml = format!(
            "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata: {{name: chat, namespace: {}}}\nspec:\n  nodeSelector: {{edgewire.dev/edge: \"true\"}}\n  port: {}\n  handlers: [{{name: echo, kind: echo, path: /}}]\n",
            self.namespace, self.port
        );
        let es: EdgeService = serde_yaml_ng::from_str(&yaml).expect("EdgeService YAML");
        apply(
            &Api::<EdgeService>::namespaced(self.client.clone(), &self.namespace),
            "chat",
            &es,
        )
        .await;
    }

    async fn es(&self) -> Option<EdgeService> {
        Api::<EdgeService>::namespaced(self.client.clone(), &self.namespace)
            .get("chat")
            .await
            .ok()
    }

    /// The ready endpoint addresses of `chat`'s EndpointSlices.
    async fn endpoints(&self) -> BTreeSet<String> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=chat"))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        ready_addresses(&list)
    }

    async fn slice_generations(&self) -> Vec<(String, Option<i64>)> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=chat"))
            .await
            .expect("list slices");
        list.items
            .iter()
            .map(|s| (kube::ResourceExt::name_any(s), s.metadata.generation))
            .collect()
    }

    async fn node_ready_transitions(&self) -> Vec<(String, String, String)> {
        let list = Api::<EdgeNode>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .expect("list EdgeNodes");
        list.items
            .iter()
            .flat_map(|en| {
                let name = kube::ResourceExt::name_any(en);
                en.status.iter().flat_map(move |s| {
                    let name = name.clone();
                    s.conditions
                        .iter()
                        .filter(|c| c.type_ == "Ready")
                        .map(move |c| {
                            (
                                name.clone(),
                                c.status.clone(),
                                c.last_transition_time.0.to_string(),
                            )
                        })
                })
            })
            .collect()
    }

    /// Waits until the ready endpoints are exactly `want`.
    async fn wait_endpoints(&self, want: &[&str], within: Duration, what: &str) -> Duration {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let start = Instant::now();
        loop {
            let have = self.endpoints().await;
            if have == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{what}: endpoints {have:?}, want {want:?} within {within:?}\nstatus: {:?}\noperator log:\n{}",
                self.es().await.and_then(|e| e.status),
                self.operator_output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The node address for an agent listening on `127.0.0.x`: `192.0.2.x`.
fn advertised(loopback: &str) -> String {
    let last = loopback.rsplit('.').next().expect("an IPv4 address");
    format!("192.0.2.{last}")
}

fn ready_addresses(slices: &[EndpointSlice]) -> BTreeSet<String> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

fn faketime(offset: &str) -> Vec<(&'static str, String)> {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: install Debian's faketime package (scripts/test.sh does)"
    );
    vec![
        ("LD_PRELOAD", FAKETIME_LIB.to_string()),
        ("FAKETIME", offset.to_string()),
        // tokio's timers run on the monotonic clock: shift only the wall clock.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
    ]
}

/// Records every version of `chat`'s EndpointSlices and of the EdgeNodes'
/// Ready conditions while it runs, so a flip that is undone again is seen.
struct Recorder {
    endpoint_sets: std::sync::Arc<std::sync::Mutex<Vec<BTreeSet<String>>>>,
    ready_flips: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Recorder {
    fn start(fleet: &Fleet) -> Recorder {
        let endpoint_sets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ready_flips = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let slices: Api<EndpointSlice> = Api::namespaced(fleet.client.clone(), &fleet.namespace);
        let sets = std::sync::Arc::clone(&endpoint_sets);
        let slice_task = tokio::spawn(async move {
            let (store, writer) = kube::runtime::reflector::store();
            let stream = watcher(
                slices,
                watcher::Config::default().labels("kubernetes.io/service-name=chat"),
            )
            .default_backoff()
            .reflect(writer);
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                // The store changes on these; during a (re)list it is
                // replaced at InitDone, all at once.
                if let Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) = event
                {
                    let all: Vec<EndpointSlice> =
                        store.state().iter().map(|s| (**s).clone()).collect();
                    sets.lock().expect("lock").push(ready_addresses(&all));
                }
            }
        });
        let flips = std::sync::Arc::clone(&ready_flips);
        let edge_nodes: Api<EdgeNode> = Api::all(fleet.client.clone());
        let node_task = tokio::spawn(async move {
            let stream = watcher(edge_nodes, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let Ok(en) = event else { continue };
                let ready = en.status.as_ref().and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| c.status.clone())
                });
                if ready.as_deref() == Some("False") {
                    flips.lock().expect("lock").push(format!(
                        "{}: {:?}",
                        kube::ResourceExt::name_any(&en),
                        en.status.map(|s| s.conditions)
                    ));
                }
            }
        });
        Recorder {
            endpoint_sets,
            ready_flips,
            tasks: vec![slice_task, node_task],
        }
    }

    fn endpoint_sets(&self) -> Vec<BTreeSet<String>> {
        self.endpoint_sets.lock().expect("lock").clone()
    }

    fn ready_flips(&self) -> Vec<String> {
        self.ready_flips.lock().expect("lock").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[tokio::test]
async fn agents_whose_clocks_are_minutes_off_are_judged_by_when_their_heartbeats_arrive() {
    let ahead_ip = "127.0.0.61";
    let behind_ip = "127.0.0.62";
    let fleet = Fleet::start(&[ahead_ip, behind_ip]).await;
    let mut ahead = Some(fleet.agent(0, &faketime("+600s")));
    let _behind = fleet.agent(1, &faketime("-600s"));

    // Both are placed and serve, whatever their clocks say.
    let (ahead_node, behind_node) = (advertised(ahead_ip), advertised(behind_ip));
    fleet
        .wait_endpoints(
            &[&ahead_node, &behind_node],
            Duration::from_secs(90),
            "agents 10 min ahead and 10 min behind",
        )
        .await;
    let beat = Api::<EdgeNode>::all(fleet.client.clone())
        .get("edge-1")
        .await
        .expect("edge-1")
        .status
        .and_then(|s| s.last_heartbeat)
        .expect("a heartbeat");
    let skew = k8s_openapi::jiff::Timestamp::now().duration_since(beat.0);
    assert!(
        skew.as_secs() > 500,
        "the agent's clock is not shifted (heartbeat {beat:?}): is libfaketime working?"
    );

    // The one behind stays in the endpoints, without a single flap, for
    // several heartbeat timeouts.
    let recorder = Recorder::start(&fleet);
    tokio::time::sleep(4 * TIMEOUT).await;
    let sets = recorder.endpoint_sets();
    assert!(
        sets.iter().all(|s| s.contains(&behind_node)),
        "the agent behind left the endpoints: {sets:?}\noperator log:\n{}",
        fleet.operator_output()
    );
    assert!(
        recorder.ready_flips().is_empty(),
        "EdgeNode Ready flipped: {:?}",
        recorder.ready_flips()
    );

    // The one ahead dies: it leaves the endpoints within the timeout (plus
    // the operator's reaction time on a loaded machine), not 10 minutes later.
    drop(ahead.take());
    let took = fleet
        .wait_endpoints(
            &[&behind_node],
            TIMEOUT + Duration::from_secs(25),
            "the dead agent that was 10 min ahead",
        )
        .await;
    eprintln!("the dead node left the endpoints after {took:?}");
}

#[tokio::test]
async fn an_api_outage_longer_than_the_heartbeat_timeout_removes_no_live_endpoint() {
    let ips = ["127.0.0.71", "127.0.0.72", "127.0.0.73"];
    let mut fleet = Fleet::start(&ips).await;
    let _agents: Vec<AgentProcess> = (0..ips.len()).map(|i| fleet.agent(i, &[])).collect();
    let nodes: Vec<String> = ips.iter().map(|ip| advertised(ip)).collect();
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    fleet
        .wait_endpoints(&node_refs, Duration::from_secs(90), "three live agents")
        .await;
    // The status is written after the slices: the endpoints can be complete
    // a moment before it says Ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ready_since = loop {
        let ready = fleet
            .es()
            .await
            .and_then(|es| es.status)
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"));
        match ready {
            Some(c) if c.status == "True" => break c,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the EdgeService never turned Ready with three live agents: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every write to a slice bumps its generation; every Ready transition
    // of an EdgeNode its transition time. Neither may move.
    let slice_generations = fleet.slice_generations().await;
    let node_transitions = fleet.node_ready_transitions().await;
    let recorder = Recorder::start(&fleet);

    // The API server is away for twice the heartbeat timeout; the agents
    // live on and heartbeat again once it is back.
    fleet
        .plane
        .stop_component("kube-apiserver")
        .expect("stop the API server");
    tokio::time::sleep(2 * TIMEOUT).await;
    fleet
        .plane
        .start_component("kube-apiserver")
        .await
        .expect("restart the API server");
    fleet.client = fleet.plane.client().await.expect("client");
    tokio::time::sleep(3 * TIMEOUT).await;

    let sets = recorder.endpoint_sets();
    let all: BTreeSet<String> = nodes.iter().cloned().collect();
    assert!(!sets.is_empty(), "the recorder saw no EndpointSlice");
    assert!(
        sets.iter().all(|s| *s == all),
        "a live node left the endpoints after the outage: {sets:?}\noperator log:\n{}",
        fleet.operator_output()
    );
    assert!(
        recorder.ready_flips().is_empty(),
        "an EdgeNode's Ready flipped after the outage: {:?}",
        recorder.ready_flips()
    );
    let ready_now = fleet
        .es()
        .await
        .and_then(|es| es.status)
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .expect("a Ready condition");
    assert_eq!(
        (ready_now.status.as_str(), &ready_now.last_transition_time),
        ("True", &ready_since.last_transition_time),
        "the EdgeService's Ready condition flipped during or after the outage"
    );
    assert_eq!(
        fleet.slice_generations().await,
        slice_generations,
        "the EndpointSlices were rewritten after the outage\noperator log:\n{}",
        fleet.operator_output()
    );
    assert_eq!(
        fleet.node_ready_transitions().await,
        node_transitions,
        "an EdgeNode's Ready condition changed during or after the outage"
    );
}
