//! Edge agents whose hub is a NATS server with JetStream (Debian's
//! `nats-server -js`, on loopback): the same queue as for a relay hub, with
//! JetStream's `Nats-Msg-Id` dropping what an edge sends again. The stream
//! keeps what it got, so the test reads it from the start once the edges
//! have drained.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::prometheus::Killed;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// How long a whole drain may take on two busy cores.
const DRAIN: Duration = Duration::from_secs(120);

fn nats_server() -> String {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server")
        .to_string()
}

/// `nats-server -js` on 127.0.0.1:`port`, storing in `dir`; killed on drop.
async fn start_nats(port: u16, dir: &Path) -> Killed {
    start_nats_with(port, dir, "").await
}

/// As `start_nats`, with `config` (nats-server's config file syntax).
async fn start_nats_with(port: u16, dir: &Path, config: &str) -> Killed {
    let log = std::fs::File::create(dir.join(format!("nats-{port}.log"))).unwrap();
    let mut command = Command::new(nats_server());
    if !config.is_empty() {
        let file = dir.join(format!("nats-{port}.conf"));
        std::fs::write(&file, config).unwrap();
        command.arg("-c").arg(file);
    }
    let child = command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("jetstream"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("nats-server (scripts/test.sh installs it)");
    let server = Killed(child);
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nats-server did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

fn edge_config(port: u16) -> String {
    format!(
        r#"
services:
  - name: edge
    port: 0
    channels:
      - {{name: telemetry, uplink: true, downlink: true}}
      - {{name: commands, downlink: true}}
    hub:
      url: nats://127.0.0.1:{port}
"#
    )
}

fn spawn_edge(node: &str, root: &Path, port: u16) -> AgentProcess {
    let state = root.join(node);
    std::fs::create_dir_all(&state).unwrap();
    AgentProcess::spawn(
        Some(&edge_config(port)),
        &[
            "--node-name",
            node,
            "--state-dir",
            &state.display().to_string(),
        ],
    )
}

async fn metric(agent: &AgentProcess, series: &str) -> f64 {
    metric_value(&agent.metrics().await, series)
}

/// Publishes `{"edge": node, "n": k}` for k in `range`, pipelined; waits
/// for the reply to the last, so all are stored when this returns.
async fn publish_all(agent: &AgentProcess, node: &str, range: std::ops::Range<u64>) {
    let mut ws = connect(agent.service_addr("edge").await, "/relay").await;
    let last = range.end - 1;
    for k in range {
        let mut message =
            json!({"type": "publish", "channel": "telemetry", "data": {"edge": node, "n": k}});
        if k == last {
            message["id"] = json!("last");
        }
        ws.feed(Message::text(message.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    loop {
        let reply = next_json(&mut ws).await;
        if reply["id"] == "last" {
            assert_eq!(reply["type"], "published", "{reply}");
            return;
        }
    }
}

/// Three edges publish while the NATS hub is down (one SIGKILLed and
/// restarted meanwhile, one SIGKILLed and restarted while it drains); the
/// stream then holds every message once, in publish order per edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_loses_and_duplicates_nothing_across_edge_restarts() {
    let n: u64 = std::env::var("EDGEWIRE_UPLINK_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut edges: Vec<(String, AgentProcess)> = (0..3)
        .map(|i| {
            let node = format!("edge-{i}");
            let agent = spawn_edge(&node, root.path(), port);
            (node, agent)
        })
        .collect();
    for (_, agent) in &edges {
        agent.wait_ready().await;
    }
    for (node, agent) in &edges[1..] {
        publish_all(agent, node, 0..n).await;
    }
    publish_all(&edges[0].1, "edge-0", 0..n / 2).await;
    edges[0].1.signal("KILL");
    assert!(edges[0].1.wait_exit(WAIT).is_some());
    edges[0].1 = spawn_edge("edge-0", root.path(), port);
    edges[0].1.wait_ready().await;
    publish_all(&edges[0].1, "edge-0", n / 2..n).await;
    for (node, agent) in &edges {
        assert_eq!(
            metric(agent, r#"edgewire_uplink_queue_messages{service="edge"}"#).await,
            n as f64,
            "{node}"
        );
        agent
            .wait_metric(
                r#"edgewire_uplink_connect_failures_total{reason="unreachable",service="edge"}"#,
                1.0,
            )
            .await;
    }

    let _server = start_nats(port, root.path()).await;
    let started = Instant::now();
    // edge-1 is killed as soon as the hub has some of its messages: what
    // JetStream acknowledged since its last cursor write is sent again.
    loop {
        assert!(started.elapsed() < DRAIN, "edge-1 never started to drain");
        let delivered = metric(
            &edges[1].1,
            r#"edgewire_uplink_delivered_total{service="edge"}"#,
        )
        .await;
        if delivered > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edges[1].1.signal("KILL");
    assert!(edges[1].1.wait_exit(WAIT).is_some());
    edges[1].1 = spawn_edge("edge-1", root.path(), port);
    edges[1].1.wait_ready().await;
    for (node, agent) in &edges {
        loop {
            assert!(started.elapsed() < DRAIN, "{node} did not drain");
            if metric(agent, r#"edgewire_uplink_queue_messages{service="edge"}"#).await == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("drained {} messages in {:?}", 3 * n, started.elapsed());

    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("EDGEWIRE").await.unwrap();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "edgewire.telemetry".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut ids = std::collections::HashSet::new();
    let mut total = 0;
    loop {
        let wait = if total < 3 * n {
            WAIT
        } else {
            Duration::from_secs(1)
        };
        let Ok(Some(message)) = tokio::time::timeout(wait, messages.next()).await else {
            break;
        };
        let message = message.unwrap();
        let data: Value = serde_json::from_slice(&message.payload).unwrap();
        let edge = data["edge"].as_str().unwrap().to_string();
        // Stored with the id JetStream deduplicates by: the origin node and
        // its sequence, one id per message.
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert!(id.starts_with(&format!("{edge}:")), "message id {id:?}");
        assert!(ids.insert(id.clone()), "message id {id:?} stored twice");
        seen.entry(edge)
            .or_default()
            .push(data["n"].as_u64().unwrap());
        total += 1;
    }
    let want: Vec<u64> = (0..n).collect();
    for (node, _) in &edges {
        let got = seen.get(node).cloned().unwrap_or_default();
        assert_eq!(got.len() as u64, n, "{node}: each message once");
        assert!(got == want, "{node}: in publish order");
    }
}

/// A message published on NATS reaches the local subscribers of every
/// edge once; an edge's own uplinked message does not come back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_downlink_reaches_every_edge_once_and_nothing_loops() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = start_nats(port, root.path()).await;
    let edges: Vec<AgentProcess> = (0..2)
        .map(|i| spawn_edge(&format!("edge-{i}"), root.path(), port))
        .collect();
    let mut locals = Vec::new();
    for agent in &edges {
        agent.wait_ready().await;
        agent
            .wait_metric(
                r#"edgewire_uplink_link{service="edge",state="connected"}"#,
                1.0,
            )
            .await;
        let mut ws = connect(agent.service_addr("edge").await, "/relay").await;
        for channel in ["commands", "telemetry"] {
            let reply = request(
                &mut ws,
                json!({"type": "subscribe", "channel": channel, "id": channel}),
            )
            .await;
            assert_eq!(reply["type"], "subscribed", "{reply}");
        }
        locals.push(ws);
    }
    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    client
        .publish("edgewire.commands", r#"{"cmd":"reboot"}"#.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    for ws in &mut locals {
        let got = messages(ws, Duration::from_secs(1)).await;
        assert_eq!(
            got,
            [json!({"type": "message", "channel": "commands", "data": {"cmd": "reboot"}})]
        );
    }
    publish_all(&edges[0], "edge-0", 0..1).await;
    let at_edge0 = messages(&mut locals[0], Duration::from_secs(2)).await;
    assert_eq!(
        at_edge0.len(),
        1,
        "delivered here once, not again from NATS: {at_edge0:?}"
    );
    let at_edge1 = messages(&mut locals[1], Duration::from_secs(1)).await;
    assert_eq!(at_edge1.len(), 1, "{at_edge1:?}");
    assert_eq!(at_edge1[0]["origin"]["node"], "edge-0");
    assert_eq!(at_edge1[0]["data"], json!({"edge": "edge-0", "n": 0}));
}

/// A message over the NATS server's `max_payload` is dropped at the edge
/// and counted, and the messages after it go up: sent, it would fail the
/// connection at every attempt and hold everything behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_nats_max_payload_is_dropped_and_the_rest_go_up() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = start_nats_with(port, root.path(), "max_payload: 4096\n").await;
    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut up = client.subscribe("edgewire.telemetry").await.unwrap();
    client.flush().await.unwrap();
    let edge = spawn_edge("edge-0", root.path(), port);
    edge.wait_ready().await;
    let mut ws = connect(edge.service_addr("edge").await, "/relay").await;
    for k in 0..4u64 {
        let pad = "x".repeat(if k == 1 { 8_000 } else { 10 });
        let reply = request(
            &mut ws,
            json!({"type": "publish", "channel": "telemetry", "id": k,
                   "data": {"edge": "edge-0", "n": k, "pad": pad}}),
        )
        .await;
        assert_eq!(reply["type"], "published", "{reply}");
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let Ok(Some(message)) = tokio::time::timeout(DRAIN, up.next()).await else {
            break;
        };
        let data: Value = serde_json::from_slice(&message.payload).unwrap();
        got.push(data["n"].as_u64().unwrap());
    }
    assert_eq!(got, [0, 2, 3], "all but the oversize one, in order");
    assert_eq!(
        metric(
            &edge,
            r#"edgewire_uplink_dropped_total{reason="too_large",service="edge"}"#
        )
        .await,
        1.0
    );
}

/// The relay messages `ws` gets until `quiet` passes without one (the
/// first may take up to `WAIT`).
async fn messages(ws: &mut Client, quiet: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let wait = if got.is_empty() { WAIT } else { quiet };
        let Ok(Some(Ok(frame))) = tokio::time::timeout(wait, ws.next()).await else {
            return got;
        };
        if let Message::Text(text) = frame {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] == "message" {
                got.push(value);
            }
        }
    }
}

/// `nats-server -js` on 127.0.0.1:`port` serving TLS only (the test
/// certificate) to one NKEY user, `user`'s public key; killed on drop.
async fn start_secured_nats(port: u16, dir: &Path, user: &str) -> Killed {
    let config = format!(
        "tls {{ cert_file: \"{cert}\", key_file: \"{key}\" }}\nauthorization {{ users: [ {{ nkey: \"{user}\" }} ] }}\n",
        cert = tls::fixture("server1.pem").display(),
        key = tls::fixture("server1.key").display(),
    );
    start_nats_with(port, dir, &config).await
}

/// An edge whose NATS hub is reached with `hub_extra` (YAML lines of the
/// `hub` block).
fn spawn_secured_edge(node: &str, root: &Path, port: u16, hub_extra: &str) -> AgentProcess {
    let state = root.join(node);
    std::fs::create_dir_all(&state).unwrap();
    let config = format!(
        "services:\n  - name: edge\n    port: 0\n    channels: [{{name: telemetry, uplink: true}}]\n    hub:\n      url: nats://127.0.0.1:{port}\n{hub_extra}"
    );
    AgentProcess::spawn(
        Some(&config),
        &[
            "--node-name",
            node,
            "--state-dir",
            &state.display().to_string(),
        ],
    )
}

/// A NATS hub that serves TLS only and admits one NKEY user: an edge with
/// the CA and that user's seed delivers into the stream; one without the CA
/// fails TLS, one with another user's seed is refused; each failure is
/// counted by its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_nats_hub_is_reached_with_its_ca_and_an_nkey() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let user = nkeys::KeyPair::new_user();
    let _nats = start_secured_nats(port, root.path(), &user.public_key()).await;
    let write = |name: &str, text: &str| {
        let path = root.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let seed = write("user.nk", &format!("{}\n", user.seed().unwrap()));
    let stranger = write("stranger.nk", &nkeys::KeyPair::new_user().seed().unwrap());
    let ca = tls::fixture("ca.pem").display().to_string();
    let good = spawn_secured_edge(
        "edge-ok",
        root.path(),
        port,
        &format!("      caFile: {ca}\n      credentialsFile: {seed}\n"),
    );
    let no_ca = spawn_secured_edge(
        "edge-no-ca",
        root.path(),
        port,
        &format!("      credentialsFile: {seed}\n"),
    );
    let wrong = spawn_secured_edge(
        "edge-wrong",
        root.path(),
        port,
        &format!("      caFile: {ca}\n      credentialsFile: {stranger}\n"),
    );
    for edge in [&good, &no_ca, &wrong] {
        edge.wait_ready().await;
    }
    publish_all(&good, "edge-ok", 0..3).await;
    good.wait_metric(r#"edgewire_uplink_delivered_total{service="edge"}"#, 3.0)
        .await;
    no_ca
        .wait_metric(
            r#"edgewire_uplink_connect_failures_total{reason="tls",service="edge"}"#,
            1.0,
        )
        .await;
    wrong
        .wait_metric(
            r#"edgewire_uplink_connect_failures_total{reason="unauthorized",service="edge"}"#,
            1.0,
        )
        .await;

    // The stream holds the three, read by a client that is let in the same way.
    let client = async_nats::ConnectOptions::with_nkey(user.seed().unwrap())
        .add_root_certificates(tls::fixture("ca.pem"))
        .require_tls(true)
        .connect(format!("127.0.0.1:{port}"))
        .await
        .expect("a test client with the CA and the seed");
    let mut stream = jetstream::new(client)
        .get_stream("EDGEWIRE")
        .await
        .expect("the edge made the stream");
    assert_eq!(stream.info().await.unwrap().state.messages, 3);
}
