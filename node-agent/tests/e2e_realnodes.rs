//! End to end on real nodes: three kubelets with containerd and kube-proxy,
//! each in its own network namespace (`edgewire_testenv::realnode`), the
//! chart's images built from this workspace's binaries and imported into
//! every node, and the README's quick start done as a user does it: `helm
//! install --wait` with defaults, `kubectl apply` of the examples, the seed's
//! clients at each node. Then node faults, for real: a cut cable, an API
//! server out of reach while the agent's container is killed, a rolling
//! `helm upgrade`, and `helm uninstall`.
//!
//! Needs root and what `scripts/test.sh` installs (containerd, runc, CNI
//! plugins, iptables) and builds (kubelet, kube-proxy, the pause program).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgewire_testenv::ControlPlane;
use edgewire_testenv::realnode::{RealCluster, RealClusterOptions, images};
use serde_json::{Value, json};
use support::*;

const RELEASE: &str = "edgewire";
const SYSTEM: &str = "edgewire-system";
const DEMO: &str = "demo";
/// The tag `helm upgrade` moves the images to.
const NEXT_TAG: &str = "0.1.1-next";
/// Bound on each wait; generous for two busy cores.
const WAIT: Duration = Duration::from_secs(180);

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
    let relay = |index: usize| -> std::net::SocketAddr {
        std::net::SocketAddr::from((cluster.address(index), 8765))
    };
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
    let mut fewest_ready = 3;
    loop {
        let pods = agent_pods(plane);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let ready = items
            .iter()
            .filter(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .count();
        if ready < fewest_ready {
            fewest_ready = ready;
            let states: Vec<String> = items
                .iter()
                .map(|p| {
                    format!(
                        "{} {} deleting={} ready={}",
                        p["spec"]["nodeName"],
                        p["spec"]["containers"][0]["image"],
                        p["metadata"]["deletionTimestamp"].is_string(),
                        p["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    )
                })
                .collect();
            eprintln!("fewest agents ready so far: {ready}: {states:?}");
        }
        let all_next = items.len() == 3
            && ready == 3
            && items.iter().all(|p| {
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .is_some_and(|i| i.ends_with(NEXT_TAG))
            });
        if all_next {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agents never all ran {NEXT_TAG}: {pods}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        fewest_ready >= 2,
        "the rollout took more than one node down at once ({fewest_ready} ready)"
    );
    for index in 0..names.len() {
        assert_eq!(
            seed_client_on(&cluster, index, "http_client.py"),
            "Result: 3\n"
        );
    }
    step("helm upgrade rolled the agents one node at a time");

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
