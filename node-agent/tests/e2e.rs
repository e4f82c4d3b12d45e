//! End to end, the way a user meets edgewire: `helm install` of the chart
//! into a real control plane with kwok edge nodes; the operator and the
//! agents run as processes with the chart's service-account credentials (pods
//! are simulated); `kubectl apply -f examples/...` as the README says; the
//! seed's clients and a channel subscriber through the placed nodes; a real
//! Prometheus scraping agents and operator and answering PromQL; `helm
//! upgrade` keeps clients served; `helm uninstall` cleans up.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgewire_testenv::{ControlPlane, NodeSpec, Options};
use serde_json::json;
use support::prometheus::{Killed, Prometheus};
use support::*;

const RELEASE: &str = "edgewire";
const SYSTEM: &str = "edgewire-system";
const DEMO: &str = "demo";
/// edge-0 is on 127.0.0.1 so that the seed's clients, which dial localhost
/// and 0.0.0.0, reach it unchanged.
const NODES: [(&str, &str, &str); 3] = [
    ("edge-0", "127.0.0.1", "zone-a"),
    ("edge-1", "127.0.0.41", "zone-b"),
    ("edge-2", "127.0.0.42", "zone-c"),
];

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn run(mut cmd: Command) -> String {
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
    let mut cmd = plane.kubectl().unwrap();
    cmd.args(args);
    run(cmd)
}

fn helm(plane: &ControlPlane, args: &[&str]) -> String {
    let mut cmd = plane.helm().unwrap();
    cmd.args(args);
    run(cmd)
}

/// A kubeconfig for a service account of the chart, with a fresh token, as a
/// pod of that service account would have; bound to that pod when named (as
/// the kubelet's projected token is: the API server then knows its node).
fn service_account_kubeconfig(
    plane: &ControlPlane,
    account: &str,
    pod: Option<&str>,
    dir: &Path,
) -> PathBuf {
    let mut args = vec!["create", "token", account, "-n", SYSTEM, "--duration=2h"];
    if let Some(pod) = pod {
        args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
    }
    let token = kubectl(plane, &args);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": plane.server, "certificate-authority": plane.pki.ca.cert}}],
        "users": [{"name": account, "user": {"token": token.trim()}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": account}}],
        "current-context": "c",
    });
    let path = dir.join(format!("{account}-{}.kubeconfig", pod.unwrap_or("unbound")));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn helm_install_apply_serve_scrape_upgrade_uninstall() {
    let plane = ControlPlane::start(Options {
        kwok: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let client = plane.client().await.unwrap();
    let specs: Vec<NodeSpec> = NODES
        .iter()
        .map(|(name, ip, zone)| {
            NodeSpec::new(*name)
                .label("edgewire.dev/edge", "true")
                .label("topology.kubernetes.io/zone", zone)
                .internal_ip(*ip)
        })
        .collect();
    edgewire_testenv::add_nodes(&client, &specs).await.unwrap();

    // helm install, as the README says.
    let chart = repo().join("charts/edgewire");
    helm(
        &plane,
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "-n",
            SYSTEM,
            "--create-namespace",
        ],
    );
    // kwok runs the chart's pods as simulated pods on the nodes.
    wait_for(
        "the agent DaemonSet scheduled on the three edge nodes",
        || {
            kubectl(
                &plane,
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
        },
    )
    .await;

    // The processes that stand in for the pods, with the pods' credentials.
    let operator_kc = service_account_kubeconfig(&plane, "edgewire-operator", None, work.path());

    let operator_metrics = free_port();
    let operator = Killed(
        Command::new(workspace_binary("edgewire-operator"))
            .args([
                "run",
                "--metrics-address",
                &format!("127.0.0.1:{operator_metrics}"),
            ])
            .args([
                "--lease-namespace",
                SYSTEM,
                "--lease-name",
                "edgewire-operator",
                "--heartbeat-timeout",
                "5",
            ])
            .env("KUBECONFIG", &operator_kc)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("operator.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mesh_port = 7946;
    let mut agents = Vec::new();
    for (name, ip, _) in NODES {
        // The token of the DaemonSet's pod on this node: the chart's
        // admission policy lets it write this node's EdgeNode only.
        let pod = kubectl(
            &plane,
            &[
                "get",
                "pods",
                "-n",
                SYSTEM,
                "-l",
                "app.kubernetes.io/component=agent",
                "--field-selector",
                &format!("spec.nodeName={name}"),
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ],
        );
        let agent_kc =
            service_account_kubeconfig(&plane, "edgewire-agent", Some(pod.trim()), work.path());
        let state = work.path().join(format!("state-{name}"));
        agents.push(AgentProcess::spawn_with_env(
            ip,
            None,
            &[
                "--cluster",
                "--node-name",
                name,
                "--advertise-address",
                ip,
                "--mesh-address",
                &format!("{ip}:{mesh_port}"),
                "--state-dir",
                state.to_str().unwrap(),
                "--heartbeat-interval",
                "1",
                "--lease-namespace",
                SYSTEM,
            ],
            &[("KUBECONFIG", agent_kc.to_str().unwrap())],
        ));
    }
    for agent in &agents {
        agent.wait_ready().await;
    }

    // kubectl apply -f examples/..., exactly as the README does.
    kubectl(&plane, &["create", "namespace", DEMO]);
    for example in ["examples/edgeservice.yaml", "examples/compute.yaml"] {
        kubectl(
            &plane,
            &[
                "apply",
                "-n",
                DEMO,
                "-f",
                repo().join(example).to_str().unwrap(),
            ],
        );
    }
    wait_for(
        "kubectl get es shows chat and compute ready on 3/3 nodes",
        || {
            let table = kubectl(&plane, &["get", "es", "-n", DEMO]);
            table
                .lines()
                .filter(|l| l.contains("3/3") && l.contains("True"))
                .count()
                == 2
        },
    )
    .await;
    let table = kubectl(&plane, &["get", "es", "-n", DEMO]);
    assert!(
        table.starts_with("NAME") && table.contains("NODES") && table.contains("CONNECTIONS"),
        "{table}"
    );
    let edgenodes = kubectl(&plane, &["get", "edgenodes"]);
    assert_eq!(
        edgenodes.lines().filter(|l| l.contains("True")).count(),
        3,
        "{edgenodes}"
    );
    // Each agent heartbeats by its node Lease, under the chart's Role and
    // admission policy, held by its own node.
    let holders = kubectl(
        &plane,
        &[
            "get",
            "leases",
            "-n",
            SYSTEM,
            "-l",
            "edgewire.dev/node-lease",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.holderIdentity} {end}",
        ],
    );
    assert_eq!(
        holders.trim(),
        "edgewire-node-edge-0=edge-0 edgewire-node-edge-1=edge-1 edgewire-node-edge-2=edge-2",
        "node Leases"
    );
    for agent in &agents {
        assert!(
            !agent.log().contains("could not renew the node Lease"),
            "{}",
            agent.log()
        );
    }

    // The seed's clients, unchanged, through the placed node on localhost.
    assert_eq!(
        run_seed_client("ws_client.py"),
        "Received data: Echo: Hello, WebSocket!\n"
    );
    assert_eq!(run_seed_client("http_client.py"), "Result: 3\n");

    // A channel subscriber on one node hears a publish made at another.
    let node =
        |i: usize| -> std::net::SocketAddr { format!("{}:8765", NODES[i].1).parse().unwrap() };
    let (mut subscriber, mut publisher, got) = first_across_mesh(node(0), node(1), "chat").await;
    let got = got.expect("a publish at edge-0 reached the subscriber at edge-1");
    assert_eq!(got["channel"], "chat");
    // That link was authenticated with keys each agent made on its node and
    // published in its own EdgeNode.
    let keys_before = mesh_keys(&plane);
    assert_eq!(
        keys_before
            .lines()
            .filter(|l| l.split_once('=').is_some_and(|(_, k)| k.len() == 64))
            .count(),
        NODES.len(),
        "{keys_before}"
    );

    // A real Prometheus scrapes the agents and the operator.
    let targets: Vec<String> = agents.iter().map(|a| format!("'{}'", a.admin)).collect();
    let prom_config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: edgewire-agents\n    static_configs: [{{targets: [{}]}}]\n  - job_name: edgewire-operator\n    static_configs: [{{targets: ['127.0.0.1:{operator_metrics}']}}]\n",
        targets.join(", ")
    );
    let prom = Prometheus::start(&prom_config, &work.path().join("prometheus")).await;
    prom.wait_value(r#"count(up{job="edgewire-agents"} == 1)"#, |v| v == 3.0)
        .await;
    prom.wait_value(r#"up{job="edgewire-operator"}"#, |v| v == 1.0)
        .await;
    // Two relay connections are open on chat (subscriber at edge-1, publisher at edge-0).
    prom.wait_value(r#"sum(edgewire_connections{service="demo/chat"})"#, |v| {
        v >= 2.0
    })
    .await;
    prom.wait_value(
        r#"sum(edgewire_message_latency_seconds_count{service="demo/chat",path="mesh"})"#,
        |v| v >= 1.0,
    )
    .await;
    prom.wait_value(
        r#"sum(edgewire_handshake_duration_seconds_count{service="demo/chat"})"#,
        |v| v >= 2.0,
    )
    .await;
    let p99 = prom.wait_value(r#"histogram_quantile(0.99, sum by (le) (edgewire_handshake_duration_seconds_bucket{service="demo/chat"}))"#,
        |v| v > 0.0,
    )
    .await;
    assert!(p99.is_finite());
    prom.wait_value(r#"edgewire_operator_edgeservices{ready="true"}"#, |v| {
        v == 2.0
    })
    .await;

    // helm upgrade to a new chart version (and new values): EdgeServices
    // stay, clients stay served.
    let next = work.path().join("chart-next");
    copy_dir(&chart, &next);
    let chart_yaml = std::fs::read_to_string(next.join("Chart.yaml")).unwrap();
    std::fs::write(
        next.join("Chart.yaml"),
        chart_yaml.replace("version: 0.1.0", "version: 0.1.1"),
    )
    .unwrap();
    helm(
        &plane,
        &[
            "upgrade",
            RELEASE,
            next.to_str().unwrap(),
            "-n",
            SYSTEM,
            "--set",
            "operator.replicas=1",
            "--set",
            "metrics.annotations=false",
        ],
    );
    let listed = helm(&plane, &["list", "-n", SYSTEM]);
    assert!(listed.contains("edgewire-0.1.1"), "{listed}");
    let after = kubectl(&plane, &["get", "es", "-n", DEMO, "-o", "name"]);
    assert_eq!(after.lines().count(), 2, "{after}");
    let keys_after = mesh_keys(&plane);
    assert_eq!(
        keys_after, keys_before,
        "the nodes' mesh keys survive upgrades"
    );
    send_text(
        &mut publisher,
        json!({"type": "publish", "channel": "chat", "data": "after upgrade"}).to_string(),
    )
    .await;
    let mut heard = false;
    for _ in 0..50 {
        let msg = next_json(&mut subscriber).await;
        if msg["data"] == "after upgrade" {
            heard = true;
            break;
        }
    }
    assert!(heard, "the subscriber kept its service across the upgrade");

    // helm uninstall removes what the chart made; the CRDs and EdgeServices
    // stay, as the README says (Helm never deletes CRDs).
    drop(operator);
    helm(&plane, &["uninstall", RELEASE, "-n", SYSTEM, "--wait"]);
    for (kind, name) in [
        ("deployment", "edgewire-operator"),
        ("daemonset", "edgewire-agent"),
        ("serviceaccount", "edgewire-agent"),
    ] {
        let left = kubectl(
            &plane,
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
        &plane,
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
    let crds = kubectl(&plane, &["get", "crd", "-o", "name"]);
    assert!(crds.contains("edgeservices.edgewire.dev"), "{crds}");
    // Deleting the EdgeServices then removes their Services and EndpointSlices.
    kubectl(
        &plane,
        &["delete", "es", "--all", "-n", DEMO, "--wait=true"],
    );
    wait_for("operator-made Services garbage-collected", || {
        kubectl(&plane, &["get", "services", "-n", DEMO, "-o", "name"])
            .trim()
            .is_empty()
    })
    .await;
    drop(agents);
}

/// Each node's mesh public key as its EdgeNode publishes it.
fn mesh_keys(plane: &ControlPlane) -> String {
    kubectl(
        plane,
        &[
            "get",
            "edgenodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.meshPublicKey}{\"\\n\"}{end}",
        ],
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
