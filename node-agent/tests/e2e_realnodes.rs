//! End to end on real nodes: three kubelets with containerd and kube-proxy,
//! each in its own network namespace (`edgewire_testenv::realnode`), the
//! chart's images built from this workspace's binaries and imported into
//! every node, and the README's quick start done as a user does it: `helm
//! install --wait` with defaults, `kubectl apply` of the examples, the seed's
//! clients at each node, a real Prometheus that finds the chart's pods
//! through the API server and scrapes them by their annotations. Then node
//! faults, for real: a cut cable, an API server out of reach while the
//! agent's container is killed, a rolling `helm upgrade` with publishers and
//! subscribers on a channel at every node (nothing lost between clients of
//! the nodes not restarting), and `helm uninstall`.
//!
//! Needs root and what `scripts/test.sh` installs (containerd, runc, CNI
//! plugins, iptables) and builds (kubelet, kube-proxy, the pause program,
//! Prometheus).

mod channel_traffic;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use channel_traffic::Traffic;
use channel_traffic::judge::{self, Observation, Rules};
use edgewire_testenv::ControlPlane;
use edgewire_testenv::realnode::{RealCluster, RealClusterOptions, images};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::prometheus::{Prometheus, sample};
use support::*;

const RELEASE: &str = "edgewire";
const SYSTEM: &str = "edgewire-system";
const DEMO: &str = "demo";
/// The tag `helm upgrade` moves the images to.
const NEXT_TAG: &str = "0.1.1-next";
/// Bound on each wait; generous for two busy cores.
const WAIT: Duration = Duration::from_secs(180);
/// During the rollout: how long a subscriber's interest and a restarted
/// node's mesh links may take to settle before every message is owed, and
/// how long a delivery may take.
const SETTLE: Duration = Duration::from_secs(2);
const DELIVERY_MARGIN: Duration = Duration::from_secs(1);

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn run(mut cmd: std::process::Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> String {
    let mut cmd = plane.kubectl().expect("kubectl");
    cmd.args(args);
    run(cmd)
}

fn helm(plane: &ControlPlane, args: &[&str]) -> String {
    let mut cmd = plane.helm().expect("helm");
    cmd.args(args);
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}\nthe cluster then:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        diagnose(plane)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a failing step shows: every pod, and the recent events.
fn diagnose(plane: &ControlPlane) -> String {
    let mut report = String::new();
    for args in [
        &["get", "pods", "-A", "-o", "wide"][..],
        &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        &[
            "logs",
            "-n",
            SYSTEM,
            "-l",
            "app.kubernetes.io/component=operator",
            "--tail=20",
        ][..],
        &[
            "logs",
            "-n",
            SYSTEM,
            "-l",
            "app.kubernetes.io/component=agent",
            "--tail=10",
        ][..],
    ] {
        if let Ok(mut cmd) = plane.kubectl()
            && let Ok(out) = cmd.args(args).output()
        {
            report.push_str(&String::from_utf8_lossy(&out.stdout));
            report.push_str(&String::from_utf8_lossy(&out.stderr));
        }
    }
    report
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The chart's appVersion: the tag its default image references carry.
fn app_version() -> String {
    let chart =
        std::fs::read_to_string(repo().join("charts/edgewire/Chart.yaml")).expect("Chart.yaml");
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("appVersion in Chart.yaml")
}

/// The operator and agent images, as the Dockerfiles build them, under the
/// chart's default names with `tag`.
fn build_images(dir: &Path, tag: &str) -> Vec<PathBuf> {
    let agent = images::without_debug_info(Path::new(env!("CARGO_BIN_EXE_edgewire-agent")), dir)
        .expect("the agent binary");
    let operator = images::without_debug_info(&workspace_binary("edgewire-operator"), dir)
        .expect("the operator binary");
    [
        ("node-agent/Dockerfile", agent, "edgewire/edgewire-agent"),
        (
            "operator/Dockerfile",
            operator,
            "edgewire/edgewire-operator",
        ),
    ]
    .into_iter()
    .map(|(dockerfile, binary, name)| {
        let spec =
            images::from_dockerfile(&repo().join(dockerfile), &binary, &format!("{name}:{tag}"))
                .expect("image spec from the Dockerfile");
        let out = dir.join(format!("{}-{tag}.tar", name.replace('/', "_")));
        images::write_archive(&spec, &out).expect("image archive");
        out
    })
    .collect()
}

/// A seed client, unchanged, run on node `index` (in its network
/// namespace): its `localhost` is that node.
fn seed_client_on(cluster: &RealCluster, index: usize, file: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/seed")
        .join(file);
    let mut cmd = cluster.command_in(index, &python());
    cmd.arg(&script);
    run(cmd)
}

/// GET `url` from inside node `index`, with the standard library's client:
/// how a pod or a process on that node reaches a ClusterIP.
fn get_from_node(cluster: &RealCluster, index: usize, url: &str) -> Option<String> {
    let mut cmd = cluster.command_in(index, &python());
    cmd.args([
        "-c",
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
        url,
    ]);
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The addresses in the EndpointSlices of Service `name`, ready ones only.
fn ready_endpoints(plane: &ControlPlane, name: &str) -> Vec<String> {
    let slices: Value = serde_json::from_str(&kubectl(
        plane,
        &[
            "get",
            "endpointslices",
            "-n",
            DEMO,
            "-l",
            &format!("kubernetes.io/service-name={name}"),
            "-o",
            "json",
        ],
    ))
    .expect("endpointslices json");
    let mut addresses: Vec<String> = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] != json!(false))
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    addresses.sort();
    addresses
}

fn agent_pods(plane: &ControlPlane) -> Value {
    serde_json::from_str(&kubectl(
        plane,
        &[
            "get",
            "pods",
            "-n",
            SYSTEM,
            "-l",
            "app.kubernetes.io/component=agent",
            "-o",
            "json",
        ],
    ))
    .expect("pods json")
}

/// The agent process of node `index`: the container's entrypoint, in that
/// node's network namespace.
fn agent_pid(cluster: &RealCluster, index: usize) -> Option<i32> {
    let netns = std::fs::metadata(format!(
        "/var/run/netns/{}",
        cluster.nodes[index].setup.net.netns
    ))
    .ok()?;
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let exe = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let first = exe.split(|b| *b == 0).next().unwrap_or_default();
            first == b"/usr/local/bin/edgewire-agent"
                && std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|m| m.ino() == netns.ino())
        })
}

/// The README's annotation-based scrape job: its fenced YAML block that
/// discovers pods.
fn readme_scrape_config() -> Value {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(indent) = line.find("```yaml") else {
            continue;
        };
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(|l| l.get(indent..).unwrap_or_default())
            .collect();
        let block = block.join("\n");
        if block.contains("kubernetes_sd_configs") {
            return serde_yaml_ng::from_str(&block).expect("the README's scrape job is YAML");
        }
    }
    panic!("README.md has no scrape job with kubernetes_sd_configs");
}

/// A real Prometheus as a user runs one: its own service account, allowed
/// to list and watch pods, and the README's scrape job, told only how to
/// reach the API server from outside the cluster.
async fn prometheus_as_the_readme_says(plane: &ControlPlane, dir: &Path) -> Prometheus {
    kubectl(plane, &["create", "namespace", "monitoring"]);
    kubectl(
        plane,
        &["create", "serviceaccount", "prometheus", "-n", "monitoring"],
    );
    kubectl(
        plane,
        &[
            "create",
            "clusterrole",
            "prometheus-pods",
            "--verb=get,list,watch",
            "--resource=pods",
        ],
    );
    kubectl(
        plane,
        &[
            "create",
            "clusterrolebinding",
            "prometheus-pods",
            "--clusterrole=prometheus-pods",
            "--serviceaccount=monitoring:prometheus",
        ],
    );
    let token = kubectl(
        plane,
        &[
            "create",
            "token",
            "prometheus",
            "-n",
            "monitoring",
            "--duration=2h",
        ],
    );
    std::fs::create_dir_all(dir).expect("prometheus dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, token.trim()).expect("token file");
    let mut config = readme_scrape_config();
    let discovery = &mut config["scrape_configs"][0]["kubernetes_sd_configs"][0];
    discovery["api_server"] = json!(plane.server);
    discovery["tls_config"] = json!({"ca_file": plane.pki.ca.cert});
    discovery["authorization"] = json!({"credentials_file": token_file});
    config["global"] = json!({"scrape_interval": "1s", "evaluation_interval": "1s"});
    // JSON is YAML.
    Prometheus::start(&config.to_string(), dir).await
}

/// `(pod, node)` of every agent pod, sorted.
fn agent_pods_by_node(plane: &ControlPlane) -> Vec<(String, String)> {
    let mut pods: Vec<(String, String)> = agent_pods(plane)["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["spec"]["nodeName"].as_str()?.to_string(),
            ))
        })
        .collect();
    pods.sort();
    pods
}

/// Waits until Prometheus has the agent pods `expected` up, each labelled
/// with its node.
async fn wait_agents_scraped(prom: &Prometheus, expected: &[(String, String)]) {
    let query = r#"up{job="kubernetes-pods",component="agent"} == 1"#;
    let found = prom
        .wait_series(query, |series| {
            let mut up: Vec<(String, String)> = series
                .iter()
                .filter_map(|s| {
                    Some((
                        s["metric"]["pod"].as_str()?.to_string(),
                        s["metric"]["node"].as_str()?.to_string(),
                    ))
                })
                .collect();
            up.sort();
            (up == expected).then_some(())
        })
        .await;
    assert!(
        found.is_some(),
        "Prometheus never scraped exactly the agent pods {expected:?}; `up` is {:?}; targets:\n{}",
        prom.series("up").await,
        prom.targets().await.join("\n")
    );
}

/// `label -> value` of an instant query's series.
fn by_label(series: &[Value], label: &str) -> BTreeMap<String, f64> {
    series
        .iter()
        .filter_map(|s| Some((s["metric"][label].as_str()?.to_string(), sample(s)?)))
        .collect()
}

/// One look at the agent pods: per node (in `names`' order) the agent
/// running there steadily, as `(pod uid, restarts)`, or None. The moment is
/// taken before asking, so what the answer shows happened after it.
async fn observe(
    pods: &Api<Pod>,
    names: &[String],
    observations: &mut Vec<Observation>,
) -> Vec<Pod> {
    let at = Instant::now();
    let Ok(list) = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
    else {
        return Vec::new();
    };
    let nodes = names
        .iter()
        .map(|name| {
            let here: Vec<&Pod> = list
                .items
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
                .collect();
            let [pod] = here.as_slice() else {
                return None;
            };
            let steady = pod.metadata.deletion_timestamp.is_none() && pod_ready(pod);
            let restarts = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .map_or(0, |c| i64::from(c.restart_count));
            steady.then(|| (pod.metadata.uid.clone().unwrap_or_default(), restarts))
        })
        .collect();
    observations.push(Observation { at, nodes });
    list.items
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_image(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.as_deref())
        .unwrap_or_default()
}

fn restart_count(plane: &ControlPlane, node: &str) -> i64 {
    agent_pods(plane)["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["spec"]["nodeName"] == node)
        .and_then(|p| p["status"]["containerStatuses"][0]["restartCount"].as_i64())
        .unwrap_or(-1)
}

#[tokio::test]
async fn real_nodes_install_serve_survive_faults_upgrade_and_uninstall() {
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
    let work = tempfile::tempdir().expect("tempdir");
    let version = app_version();
    let mut archives = build_images(work.path(), &version);
    archives.extend(build_images(work.path(), NEXT_TAG));
    step("images built");

    let zones = ["zone-a", "zone-b", "zone-c"];
    let cluster = RealCluster::start(RealClusterOptions {
        nodes: 3,
        labels: BTreeMap::from([("edgewire.dev/edge".to_string(), "true".to_string())]),
        node_labels: zones
            .iter()
            .map(|z| BTreeMap::from([("topology.kubernetes.io/zone".to_string(), z.to_string())]))
            .collect(),
        images: archives,
        ..RealClusterOptions::default()
    })
    .await
    .expect("three real nodes");
    step("three real nodes Ready");
    let plane = &cluster.plane;
    let names = cluster.node_names();

    // helm install with defaults, --wait: the operator and the agents Ready.
    let chart = repo().join("charts/edgewire");
    helm(
        plane,
        &[
            "install",
            RELEASE,
            chart.to_str().expect("utf-8 path"),
            "-n",
            SYSTEM,
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    // helm's --wait lets a DaemonSet be maxUnavailable short; a user waits
    // for all of them.
    wait_for("an agent Ready on each node", || {
        kubectl(
            plane,
            &[
                "get",
                "daemonset",
                "edgewire-agent",
                "-n",
                SYSTEM,
                "-o",
                "jsonpath={.status.numberReady}",
            ],
        ) == "3"
    })
    .await;
    let deploy = kubectl(
        plane,
        &[
            "get",
            "deployment",
            "edgewire-operator",
            "-n",
            SYSTEM,
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
    );
    assert_eq!(deploy, "2", "the chart's two operator replicas Ready");
    step("helm install --wait done");

    // The examples, as the README applies them.
    kubectl(plane, &["create", "namespace", DEMO]);
    for example in ["examples/edgeservice.yaml", "examples/compute.yaml"] {
        kubectl(
            plane,
            &[
                "apply",
                "-n",
                DEMO,
                "-f",
                repo().join(example).to_str().expect("utf-8 path"),
            ],
        );
    }
    wait_for("chat and compute Ready on 3/3 nodes", || {
        kubectl(plane, &["get", "es", "-n", DEMO])
            .lines()
            .filter(|l| l.contains("3/3") && l.contains("True"))
            .count()
            == 2
    })
    .await;
    step("EdgeServices Ready");

    // The seed's clients, unchanged, on every node.
    for (index, name) in names.iter().enumerate() {
        assert_eq!(
            seed_client_on(&cluster, index, "ws_client.py"),
            "Received data: Echo: Hello, WebSocket!\n",
            "echo on {name}"
        );
        assert_eq!(
            seed_client_on(&cluster, index, "http_client.py"),
            "Result: 3\n",
            "add on {name}"
        );
    }
    step("seed clients answered on every node");

    // The in-cluster Service, through kube-proxy, from each node.
    let cluster_ip = kubectl(
        plane,
        &[
            "get",
            "service",
            "compute",
            "-n",
            DEMO,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    let url = format!("http://{cluster_ip}:5000/add?a=2&b=3");
    for (index, name) in names.iter().enumerate() {
        let answer = get_from_node(&cluster, index, &url);
        assert!(
            answer.as_deref().is_some_and(|a| a.contains('5')),
            "compute's ClusterIP from {name}: {answer:?}"
        );
    }
    let all: Vec<String> = {
        let mut a: Vec<String> = (0..3).map(|i| cluster.address(i).to_string()).collect();
        a.sort();
        a
    };
    assert_eq!(ready_endpoints(plane, "compute"), all);
    step("ClusterIP answered through kube-proxy on every node");

    // A real Prometheus, set up as the README says, finds the chart's pods
    // through the API server, scrapes them on the real nodes by their
    // annotations, and answers the README's PromQL.
    let prom = prometheus_as_the_readme_says(plane, &work.path().join("prometheus")).await;
    wait_agents_scraped(&prom, &agent_pods_by_node(plane)).await;
    prom.wait_value(
        r#"count(up{job="kubernetes-pods",component="operator",namespace="edgewire-system"} == 1)"#,
        |v| v == 2.0,
    )
    .await;
    let relay = |index: usize| -> SocketAddr { SocketAddr::from((cluster.address(index), 8765)) };
    // Two relay clients on the first node, one on the second, none on the third.
    let mut clients = Vec::new();
    for index in [0, 0, 1] {
        let mut client = connect(relay(index), "/relay").await;
        let reply = request(
            &mut client,
            json!({"type": "subscribe", "channel": "chat", "id": 1}),
        )
        .await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        clients.push(client);
    }
    let connections = BTreeMap::from([
        ("demo/chat".to_string(), 3.0),
        ("demo/compute".to_string(), 0.0),
    ]);
    let per_node = BTreeMap::from([
        (names[0].clone(), 2.0),
        (names[1].clone(), 1.0),
        (names[2].clone(), 0.0),
    ]);
    for (query, label, expected) in [
        (
            "sum by (service) (edgewire_connections)",
            "service",
            &connections,
        ),
        (
            r#"sum by (node) (edgewire_connections{service="demo/chat"})"#,
            "node",
            &per_node,
        ),
    ] {
        let found = prom
            .wait_series(query, |series| {
                (by_label(series, label) == *expected).then_some(())
            })
            .await;
        assert!(
            found.is_some(),
            "PromQL {query}: wanted {expected:?}, Prometheus answers {:?}",
            by_label(&prom.series(query).await, label)
        );
    }
    // Messages published at the first node reach the subscribers there and,
    // across the mesh, at the second: the README's latency quantile.
    let quantile =
        "histogram_quantile(0.99, sum by (le) (rate(edgewire_message_latency_seconds_bucket[5m])))";
    let mesh_heard = r#"sum by (node) (edgewire_message_latency_seconds_count{service="demo/chat",path="mesh"})"#;
    let deadline = Instant::now() + WAIT;
    let mut round = 0;
    let p99 = loop {
        round += 1;
        send_text(
            &mut clients[0],
            json!({"type": "publish", "channel": "chat", "data": {"round": round}}).to_string(),
        )
        .await;
        let p99 = prom.series(quantile).await.first().and_then(sample);
        let across = by_label(&prom.series(mesh_heard).await, "node");
        if let Some(p99) = p99.filter(|v| v.is_finite() && *v > 0.0)
            && across.get(&names[1]).is_some_and(|v| *v > 0.0)
        {
            break p99;
        }
        assert!(
            Instant::now() < deadline,
            "PromQL {quantile} answered {p99:?}, mesh deliveries by node {across:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    drop(clients);
    step(&format!(
        "Prometheus scraped the chart's pods by their annotations; p99 message latency {p99:.4}s"
    ));

    // A cut cable: the node leaves the EndpointSlices, the Service keeps
    // answering from the others; the cable back: it returns.
    let cut = 2;
    cluster.cut_link(cut).expect("cut the link");
    let gone = cluster.address(cut).to_string();
    wait_for("the cut node out of compute's EndpointSlices", || {
        !ready_endpoints(plane, "compute").contains(&gone)
    })
    .await;
    step("cut node out of the EndpointSlices");
    // Once kube-proxy on the node has the new slices, every request answers.
    let deadline = Instant::now() + WAIT;
    let mut in_a_row = 0;
    while in_a_row < 5 {
        let answer = get_from_node(&cluster, 0, &url);
        if answer.as_deref().is_some_and(|a| a.contains('5')) {
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
        assert!(
            Instant::now() < deadline,
            "compute's ClusterIP with a node cut off: {answer:?}"
        );
    }
    // The mesh routes around it: a publish at one remaining node reaches a
    // subscriber at the other.
    let (subscriber, publisher, heard) = first_across_mesh(relay(0), relay(1), "chat").await;
    let heard =
        heard.expect("a publish on one node reached a subscriber on another, one node cut off");
    assert_eq!(heard["channel"], "chat");
    drop((subscriber, publisher));
    step("the mesh carried a channel message around the cut node");
    cluster.restore_link(cut).expect("restore the link");
    wait_for("the node back in compute's EndpointSlices", || {
        ready_endpoints(plane, "compute").contains(&gone)
    })
    .await;
    step("restored node back in the EndpointSlices");

    // Edge autonomy: the API server out of reach from one node, and its
    // agent's container killed. The kubelet restarts it; it serves from its
    // stored config, with no API server, and local clients never notice.
    let lonely = 0;
    let restarts = restart_count(plane, &names[lonely]);
    cluster.isolate_from_apiserver(lonely).expect("isolate");
    let pid = agent_pid(&cluster, lonely).expect("the agent's process on the node");
    run({
        let mut kill = std::process::Command::new("kill");
        kill.args(["-KILL", &pid.to_string()]);
        kill
    });
    wait_for("the kubelet restarts the agent container", || {
        agent_pid(&cluster, lonely).is_some_and(|p| p != pid)
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let ok = {
            let mut cmd = cluster.command_in(lonely, &python());
            cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed/http_client.py"));
            cmd.output()
                .is_ok_and(|o| o.status.success() && o.stdout == b"Result: 3\n")
        };
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent never served from its stored config"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        seed_client_on(&cluster, lonely, "ws_client.py"),
        "Received data: Echo: Hello, WebSocket!\n"
    );
    step("restarted agent serves from stored config without the API server");
    cluster.reconnect_to_apiserver(lonely).expect("reconnect");
    wait_for("the restart reported once the API server is back", || {
        restart_count(plane, &names[lonely]) > restarts
    })
    .await;

    wait_for("every agent Ready again before the upgrade", || {
        kubectl(
            plane,
            &[
                "get",
                "daemonset",
                "edgewire-agent",
                "-n",
                SYSTEM,
                "-o",
                "jsonpath={.status.numberReady}",
            ],
        ) == "3"
    })
    .await;

    // Traffic on chat through the rollout: a publisher and a subscriber at
    // every node, reconnecting when their node's agent restarts. First every
    // subscriber hears every publisher, across the mesh too.
    let relays: Vec<SocketAddr> = (0..names.len()).map(relay).collect();
    let mut traffic = Traffic::start(&relays, "chat");
    assert!(
        traffic.wait_all_heard(WAIT).await,
        "before the upgrade, not every subscriber heard every publisher: (subscriber, publisher) {:?}",
        traffic.heard()
    );
    let pods_api: Api<Pod> = Api::namespaced(plane.client().await.expect("client"), SYSTEM);
    let mut observations = Vec::new();
    // Looks before the upgrade: a restart is told apart by a steady stretch
    // before it, and the first one is judged with nodes settled that long.
    let looked = Instant::now() + SETTLE + Duration::from_secs(2);
    while Instant::now() < looked {
        observe(&pods_api, &names, &mut observations).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // helm upgrade to a new image tag: the DaemonSet rolls one node at a
    // time, and at every moment at least two agents are ready.
    helm(
        plane,
        &[
            "upgrade",
            RELEASE,
            chart.to_str().expect("utf-8 path"),
            "-n",
            SYSTEM,
            "--reuse-values",
            "--set",
            &format!("image.agent.tag={NEXT_TAG},image.operator.tag={NEXT_TAG}"),
        ],
    );
    let deadline = Instant::now() + WAIT;
    let mut fewest_ready = names.len();
    loop {
        let items = observe(&pods_api, &names, &mut observations).await;
        let ready = items.iter().filter(|p| pod_ready(p)).count();
        if !items.is_empty() && ready < fewest_ready {
            fewest_ready = ready;
            let states: Vec<String> = items
                .iter()
                .map(|p| {
                    format!(
                        "{} {} deleting={} ready={}",
                        p.spec
                            .as_ref()
                            .and_then(|s| s.node_name.as_deref())
                            .unwrap_or_default(),
                        pod_image(p),
                        p.metadata.deletion_timestamp.is_some(),
                        pod_ready(p)
                    )
                })
                .collect();
            eprintln!("fewest agents ready so far: {ready}: {states:?}");
        }
        let all_next = items.len() == names.len()
            && ready == names.len()
            && items.iter().all(|p| pod_image(p).ends_with(NEXT_TAG));
        if all_next {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agents never all ran {NEXT_TAG}: {:?}",
            items
                .iter()
                .map(|p| (pod_image(p), pod_ready(p)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        fewest_ready >= names.len() - 1,
        "the rollout took more than one node down at once ({fewest_ready} ready)"
    );
    step("helm upgrade rolled the agents one node at a time");

    // The last node's clients reconnect and its links settle; then the
    // publishers stop and what they sent has time to arrive.
    let quiet_until = Instant::now() + SETTLE + Duration::from_secs(10);
    while Instant::now() < quiet_until {
        observe(&pods_api, &names, &mut observations).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    traffic.stop_publishing();
    let drained = Instant::now() + DELIVERY_MARGIN + Duration::from_secs(1);
    while Instant::now() < drained {
        observe(&pods_api, &names, &mut observations).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (publishers, subscribers) = traffic.finish().await;
    observe(&pods_api, &names, &mut observations).await;
    let steady = judge::steady_intervals(&observations, names.len());
    let verdict = judge::judge(
        &publishers,
        &subscribers,
        &steady,
        Rules {
            settle: SETTLE,
            margin: DELIVERY_MARGIN,
        },
    );
    let legend: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("node {i} = {n}"))
        .collect();
    let sessions: Vec<String> = publishers
        .iter()
        .map(|p| {
            format!(
                "publisher at node {}: {} sessions, {} sent",
                p.node,
                p.sessions.len(),
                p.sent.len()
            )
        })
        .chain(subscribers.iter().map(|s| {
            format!(
                "subscriber at node {}: {} sessions, {} heard",
                s.node,
                s.sessions.len(),
                s.heard.len()
            )
        }))
        .collect();
    let origin = observations.first().map_or_else(Instant::now, |o| o.at);
    let stretches: Vec<String> = steady
        .iter()
        .enumerate()
        .map(|(node, intervals)| {
            let spans: Vec<String> = intervals
                .iter()
                .map(|(a, b)| {
                    format!(
                        "{:.1}-{:.1}s",
                        (*a - origin).as_secs_f64(),
                        (*b - origin).as_secs_f64()
                    )
                })
                .collect();
            format!("node {node} steady {}", spans.join(", "))
        })
        .collect();
    eprintln!(
        "rollout traffic ({}): {}; {}; {} deliveries owed; owed while a node restarted, (restarting, publisher's, subscriber's node) -> count: {:?}",
        legend.join(", "),
        stretches.join("; "),
        sessions.join("; "),
        verdict.owed,
        verdict.checked_during_restart
    );
    assert!(
        verdict.problems.is_empty(),
        "messages lost during the rolling upgrade between clients of nodes that were not restarting ({}):\n{}",
        legend.join(", "),
        verdict.problems.join("\n")
    );
    // The check had something to check. Each node restarted once; while the
    // first one restarted, messages crossed the mesh both ways between the
    // other two (later restarts follow the previous one within seconds, too
    // soon for a just-restarted node's links to count as settled).
    let restarts = judge::restarts(&steady);
    for (restarting, windows) in restarts.iter().enumerate() {
        assert_eq!(
            windows.len(),
            1,
            "node {restarting} restarted once in the rollout: {windows:?}"
        );
    }
    let first = (0..names.len())
        .min_by_key(|n| restarts[*n][0].0)
        .expect("a node");
    let others: Vec<usize> = (0..names.len()).filter(|n| *n != first).collect();
    for (publisher, subscriber) in [(others[0], others[1]), (others[1], others[0])] {
        assert!(
            verdict
                .checked_during_restart
                .iter()
                .any(|(key, count)| *key == (first, publisher, subscriber) && *count > 0),
            "no message from node {publisher} to node {subscriber} was owed while node {first} restarted: {:?}",
            verdict.checked_during_restart
        );
    }
    // What settling excuses, for the record: the same judgment with none.
    let unsettled = judge::judge(
        &publishers,
        &subscribers,
        &steady,
        Rules {
            settle: Duration::ZERO,
            margin: DELIVERY_MARGIN,
        },
    );
    eprintln!(
        "with no settling time: {} deliveries owed, {} problems{}",
        unsettled.owed,
        unsettled.problems.len(),
        unsettled
            .problems
            .iter()
            .map(|p| format!("\n  {p}"))
            .collect::<String>()
    );
    wait_agents_scraped(&prom, &agent_pods_by_node(plane)).await;
    for index in 0..names.len() {
        assert_eq!(
            seed_client_on(&cluster, index, "http_client.py"),
            "Result: 3\n"
        );
    }
    step(
        "no message lost between clients of the nodes not restarting; Prometheus scrapes the new pods",
    );

    // helm uninstall: the operator, agents, RBAC and mesh secret go; the CRDs
    // and EdgeServices stay, and so does each node's state directory.
    helm(
        plane,
        &[
            "uninstall",
            RELEASE,
            "-n",
            SYSTEM,
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    for (kind, name) in [
        ("deployment", "edgewire-operator"),
        ("daemonset", "edgewire-agent"),
        ("secret", "edgewire-mesh"),
        ("serviceaccount", "edgewire-agent"),
    ] {
        let left = kubectl(
            plane,
            &[
                "get",
                kind,
                name,
                "-n",
                SYSTEM,
                "--ignore-not-found",
                "-o",
                "name",
            ],
        );
        assert!(
            left.trim().is_empty(),
            "{kind}/{name} survived helm uninstall"
        );
    }
    let roles = kubectl(
        plane,
        &[
            "get",
            "clusterrole",
            "edgewire-operator",
            "edgewire-agent",
            "--ignore-not-found",
            "-o",
            "name",
        ],
    );
    assert!(roles.trim().is_empty(), "{roles}");
    let crds = kubectl(plane, &["get", "crd", "-o", "name"]);
    assert!(crds.contains("edgeservices.edgewire.dev"), "{crds}");
    let es = kubectl(plane, &["get", "es", "-n", DEMO, "-o", "name"]);
    assert_eq!(es.lines().count(), 2, "{es}");
    for node in &cluster.nodes {
        let state = node.setup.dir.join("rootfs/var/lib/edgewire");
        let kept = std::fs::read_dir(&state).map(|d| d.count()).unwrap_or(0);
        assert!(kept > 0, "{} kept its state directory", node.setup.name);
    }
    wait_for("no agent process left on any node", || {
        (0..3).all(|i| agent_pid(&cluster, i).is_none())
    })
    .await;
    step("helm uninstall removed what the README says and kept the rest");
    drop(cluster);
    step("real nodes removed");
}
