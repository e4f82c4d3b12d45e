//! Real nodes (kubelet, containerd, kube-proxy in network namespaces) join
//! the control plane, run pods, take faults, and leave nothing behind: no
//! namespace, bridge, mount, cgroup, process or directory, the machine's
//! sysctls and iptables rules as they were, also after a run that was
//! killed midway.
//!
//! Needs root and the Debian packages `scripts/test.sh` installs.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use edgewire_testenv::realnode::{BASE, BRIDGE, HOST, RealCluster, RealClusterOptions};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
use kube::api::{Api, ObjectMeta, PostParams};

const WAIT: Duration = Duration::from_secs(120);
/// One test at a time: each checks that the machine is clean afterwards.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Set in the child process of the interrupted-run test.
const CHILD_ENV: &str = "EDGEWIRE_REALNODE_CHILD";

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The global settings a kubelet or kube-proxy would change if let.
fn host_settings() -> BTreeMap<String, String> {
    [
        "vm/overcommit_memory",
        "kernel/panic",
        "kernel/panic_on_oops",
        "net/ipv4/ip_forward",
        "net/netfilter/nf_conntrack_max",
        "net/netfilter/nf_conntrack_tcp_timeout_established",
        "net/bridge/bridge-nf-call-iptables",
    ]
    .into_iter()
    .map(|key| {
        let value = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        (key.to_string(), value.trim().to_string())
    })
    .collect()
}

/// The host's own iptables rules, without counters.
fn host_iptables() -> String {
    output("iptables-save", &[])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a run may leave on the machine, described; empty when nothing is.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for ns in output("ip", &["netns", "list"]).lines() {
        if ns.starts_with("ewrn-") {
            found.push(format!("netns {ns}"));
        }
    }
    if Command::new("ip")
        .args(["link", "show", BRIDGE])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        found.push(format!("bridge {BRIDGE}"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines().filter(|l| l.contains(BASE)) {
        found.push(format!("mount {line}"));
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for cgroup in std::fs::read_dir(hierarchy.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if cgroup.file_name().to_string_lossy().starts_with("ewrn-") {
                found.push(format!("cgroup {}", cgroup.path().display()));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(BASE) {
            found.push(format!(
                "process {}: {text}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    if std::path::Path::new(BASE).exists() {
        found.push(format!("directory {BASE}"));
    }
    found
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pause_pod(name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "pause".into(),
                image: Some(edgewire_testenv::realnode::PAUSE_IMAGE.into()),
                image_pull_policy: Some("Never".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Whether node `index` can open a TCP connection to the API server.
fn reaches_apiserver(cluster: &RealCluster, index: usize) -> bool {
    let port = cluster.plane.ports.apiserver;
    let mut cmd = cluster.command_in(index, "python3");
    cmd.args([
        "-c",
        &format!("import socket; socket.create_connection(('{HOST}', {port}), timeout=3)"),
    ]);
    cmd.output().is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn real_nodes_run_pods_take_faults_and_leave_nothing_behind() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let settings = host_settings();
    let rules = host_iptables();
    let started = Instant::now();
    let mut cluster = RealCluster::start(RealClusterOptions {
        nodes: 2,
        labels: BTreeMap::from([("edgewire.dev/edge".to_string(), "true".to_string())]),
        ..RealClusterOptions::default()
    })
    .await
    .expect("two real nodes");
    eprintln!("two real nodes Ready in {:?}", started.elapsed());
    let client = cluster.plane.client().await.expect("client");
    let nodes: Api<Node> = Api::all(client.clone());
    for name in cluster.node_names() {
        let node = nodes.get(&name).await.expect("the Node");
        let labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("edgewire.dev/edge").map(String::as_str),
            Some("true")
        );
    }

    // A pod on each node runs in that node's pod range.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (index, name) in cluster.node_names().iter().enumerate() {
        // Accepted once the controller manager made the default service account.
        let pod = pause_pod(&format!("p{index}"), name);
        eventually("the pod accepted", async || {
            pods.create(&PostParams::default(), &pod).await.is_ok()
        })
        .await;
    }
    for index in 0..2 {
        let pod_name = format!("p{index}");
        eventually("the pod Running with an IP", async || {
            pods.get(&pod_name)
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
        })
        .await;
        let ip = pods
            .get(&pod_name)
            .await
            .expect("pod")
            .status
            .and_then(|s| s.pod_ip);
        assert!(
            ip.as_deref()
                .is_some_and(|ip| ip.starts_with(&format!("10.244.{}.", index + 1))),
            "pod {pod_name} on node {index} has {ip:?}"
        );
    }

    // The API server out of reach from one node only, and back.
    assert!(reaches_apiserver(&cluster, 0) && reaches_apiserver(&cluster, 1));
    cluster.isolate_from_apiserver(0).expect("isolate");
    assert!(
        !reaches_apiserver(&cluster, 0),
        "node 0 still reaches the API server"
    );
    assert!(
        reaches_apiserver(&cluster, 1),
        "node 1 lost the API server too"
    );
    cluster.reconnect_to_apiserver(0).expect("reconnect");
    assert!(reaches_apiserver(&cluster, 0));

    // containerd killed: the node goes NotReady; started again, Ready.
    cluster.kill_containerd(1);
    let second = cluster.node_names()[1].clone();
    eventually("the node without containerd NotReady", async || {
        nodes
            .get(&second)
            .await
            .is_ok_and(|n| !edgewire_testenv::nodes::is_ready(&n))
    })
    .await;
    cluster.start_containerd(1).await.expect("containerd again");
    cluster.wait_ready().await.expect("Ready again");

    // The kubelet stopped and started again: the node stays registered and
    // its pod keeps running.
    cluster.stop_kubelet(0);
    cluster.start_kubelet(0).expect("kubelet again");
    cluster
        .wait_ready()
        .await
        .expect("Ready after a kubelet restart");

    drop(cluster);
    assert_eq!(
        leftovers(),
        Vec::<String>::new(),
        "the real nodes left things behind"
    );
    assert_eq!(host_settings(), settings, "the machine's sysctls changed");
    assert_eq!(
        host_iptables(),
        rules,
        "the machine's iptables rules changed"
    );
}

/// A run killed midway (SIGKILL: no destructor, no exit handler) leaves
/// its nodes behind; the next cluster removes them before it starts.
#[tokio::test]
async fn what_a_killed_run_left_is_removed_by_the_next() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // The child: start a cluster, say so, and wait to be killed.
        let cluster = RealCluster::start(RealClusterOptions {
            nodes: 1,
            ..RealClusterOptions::default()
        })
        .await
        .expect("a real node in the child");
        println!("READY");
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(cluster);
        return;
    }
    let _serial = SERIAL.lock().await;
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "what_a_killed_run_left_is_removed_by_the_next",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the child test");
    let stdout = child.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("READY"))
    });
    let ready = tokio::time::timeout(Duration::from_secs(300), ready).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(ready, Ok(Ok(true))),
        "the child never brought its node up"
    );
    // PR_SET_PDEATHSIG takes the kubelet and the rest down with the child,
    // but the namespaces, bridge, cgroups and directory stay.
    assert!(
        !leftovers().is_empty(),
        "a killed run leaves something to remove"
    );

    let cluster = RealCluster::start(RealClusterOptions {
        nodes: 1,
        ..RealClusterOptions::default()
    })
    .await
    .expect("a cluster after a killed one");
    drop(cluster);
    assert_eq!(leftovers(), Vec::<String>::new());
}
