//! Edge agents linked to a hub agent, all real processes on loopback: the
//! store-and-forward queue across a hub outage and an edge SIGKILL, its byte
//! bound, downlink delivery without loops, and the faults a link meets (an
//! unreachable or TLS-failing hub, a wrong credential, a full disk).
//!
//! The hub requires a token from the edges (`auth`, HS256) and lets test
//! clients subscribe anonymously. An edge reads its token file at each
//! connect, so a test holds the edges off (with no token yet) until its
//! subscriber at the hub is in place, then writes the tokens.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "0123456789abcdef0123456789abcdef-hub-secret";
/// How long a whole drain may take on two busy cores.
const DRAIN: Duration = Duration::from_secs(120);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for the edges: it may publish and subscribe on every channel, and
/// forward the messages of the nodes named `edge-*`.
fn edge_token(secret: &str) -> String {
    token(
        secret,
        json!({"publish": ["*"], "subscribe": ["*"], "origins": ["edge-*"]}),
    )
}

/// A token signed with `secret` granting `grants`, valid for an hour.
fn token(secret: &str, grants: Value) -> String {
    let mut claims = grants;
    claims["exp"] = json!(now() + 3600);
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The hub: one service on `port`, edges need a token, test clients may
/// subscribe to anything and publish commands anonymously. Its subscribers'
/// queues are large: the drain after an outage comes in a rush.
fn hub_config(dir: &Path, port: u16) -> String {
    let key = dir.join("hub-secret");
    std::fs::write(&key, SECRET).unwrap();
    format!(
        r#"
services:
  - name: hub
    port: {port}
    channels: [{{name: telemetry}}, {{name: commands}}]
    limits: {{sendQueueMessages: 65536, sendQueueBytes: 268435456}}
    auth:
      algorithm: HS256
      keyFile: {key}
      anonymous: {{subscribe: ["*"], publish: [commands]}}
"#,
        key = key.display()
    )
}

/// The hub agent on `port`, with `extra` YAML lines for its service.
fn spawn_hub(root: &Path, port: u16, extra: &str) -> AgentProcess {
    let state = root.join("hub").display().to_string();
    AgentProcess::spawn(
        Some(&(hub_config(root, port) + extra)),
        &["--state-dir", &state],
    )
}

/// An edge whose `telemetry` goes up and `commands` comes down.
fn edge_config(hub: &str, token_file: &Path, queue_bytes: u64) -> String {
    format!(
        r#"
services:
  - name: edge
    port: 0
    channels:
      - {{name: telemetry, uplink: true, downlink: true}}
      - {{name: commands, downlink: true}}
      - {{name: local}}
    hub:
      url: {hub}
      tokenFile: {token}
      queueBytes: {queue_bytes}
"#,
        token = token_file.display()
    )
}

struct Edge {
    node: String,
    state: PathBuf,
    token: PathBuf,
    config: String,
    agent: AgentProcess,
}

impl Edge {
    fn spawn(node: &str, root: &Path, hub: &str, queue_bytes: u64) -> Edge {
        let token = root.join(format!("{node}.token"));
        Edge::spawn_with(node, root, edge_config(hub, &token, queue_bytes))
    }

    /// An edge with its own `config`; its token file is `ROOT/NODE.token`.
    fn spawn_with(node: &str, root: &Path, config: String) -> Edge {
        let state = root.join(node);
        std::fs::create_dir_all(&state).unwrap();
        let token = root.join(format!("{node}.token"));
        let agent = spawn_edge(node, &state, &config);
        Edge {
            node: node.into(),
            state,
            token,
            config,
            agent,
        }
    }

    /// SIGKILL, then the same node on the same state directory again.
    async fn kill_and_restart(&mut self) {
        self.agent.signal("KILL");
        assert!(
            self.agent.wait_exit(WAIT).is_some(),
            "{} did not die",
            self.node
        );
        self.agent = spawn_edge(&self.node, &self.state, &self.config);
        self.agent.wait_ready().await;
    }

    fn give_token(&self, token: &str) {
        let tmp = self.token.with_extension("tmp");
        std::fs::write(&tmp, token).unwrap();
        std::fs::rename(&tmp, &self.token).unwrap();
    }

    async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.agent.metrics().await, series)
    }

    async fn relay(&self) -> Client {
        connect(self.agent.service_addr("edge").await, "/relay").await
    }
}

fn spawn_edge(node: &str, state: &Path, config: &str) -> AgentProcess {
    let state = state.display().to_string();
    AgentProcess::spawn(Some(config), &["--node-name", node, "--state-dir", &state])
}

/// Waits until `probe` is true, at most `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `data(k)` for each k in `range` on `channel`, pipelined; the
/// last carries an id and its reply is awaited, so every one of them has
/// been taken (and stored) by the agent when this returns.
async fn publish_all(
    ws: &mut Client,
    channel: &str,
    range: std::ops::Range<u64>,
    data: impl Fn(u64) -> Value,
) {
    let last = range.end - 1;
    for k in range {
        let mut message = json!({"type": "publish", "channel": channel, "data": data(k)});
        if k == last {
            message["id"] = json!("last");
        }
        ws.feed(Message::text(message.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    loop {
        let reply = next_json(ws).await;
        if reply["id"] == "last" {
            assert_eq!(reply["type"], "published", "{reply}");
            return;
        }
        assert_ne!(reply["type"], "error", "{reply}");
    }
}

async fn subscribe(ws: &mut Client, channel: &str) {
    let reply = request(
        ws,
        json!({"type": "subscribe", "channel": channel, "id": channel}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
}

/// Every `message` frame `ws` receives until `quiet` passes without one (or
/// `within` runs out), as (channel, data, origin node).
async fn drain_messages(
    ws: &mut Client,
    want: usize,
    within: Duration,
    quiet: Duration,
) -> Vec<(String, Value, Option<String>)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let wait = if got.len() >= want {
            quiet
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let Ok(next) = tokio::time::timeout(wait, ws.next()).await else {
            return got;
        };
        let Some(Ok(Message::Text(text))) = next else {
            match next {
                Some(Ok(_)) => continue,
                other => panic!("subscriber lost: {other:?}"),
            }
        };
        got.extend(delivery(&text));
    }
}

/// A relay frame as (channel, data, origin node) when it is a `message`.
fn delivery(text: &str) -> Option<(String, Value, Option<String>)> {
    let value: Value = serde_json::from_str(text).unwrap();
    (value["type"] == "message").then(|| {
        (
            value["channel"].as_str().unwrap_or_default().to_string(),
            value["data"].clone(),
            value["origin"]["node"].as_str().map(String::from),
        )
    })
}

/// The `n` of each edge's messages in the order the hub's subscriber got them.
fn by_edge(messages: &[(String, Value, Option<String>)]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, data, origin) in messages {
        let edge = data["edge"].as_str().unwrap().to_string();
        assert_eq!(
            origin.as_deref(),
            Some(edge.as_str()),
            "origin names the edge"
        );
        out.entry(edge)
            .or_default()
            .push(data["n"].as_u64().unwrap());
    }
    out
}

fn per_edge() -> u64 {
    std::env::var("EDGEWIRE_UPLINK_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// How long the hub stays away in the outage test; the edges' publishing is
/// spread over it.
fn outage() -> Duration {
    let seconds = std::env::var("EDGEWIRE_UPLINK_OUTAGE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

/// The outage's publishing comes in this many rounds, evenly spaced.
const ROUNDS: u64 = 40;

/// Three edges publish while the hub is down for `outage()`, their messages
/// spread over it; one is SIGKILLed and restarted halfway; then the hub
/// comes back. Its subscriber gets every message once, in publish order per
/// edge, and the queues empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_and_duplicates_nothing_across_an_edge_restart() {
    let n = per_edge();
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let mut edges: Vec<Edge> = (0..3)
        .map(|i| Edge::spawn(&format!("edge-{i}"), root.path(), &url, 64 * 1024 * 1024))
        .collect();
    for edge in &edges {
        edge.agent.wait_ready().await;
    }
    // The hub is away from here until `outage()` has passed: the edges
    // publish a round each 1/ROUNDS of it, and edge-0 is SIGKILLed and
    // restarted halfway.
    let started = Instant::now();
    let outage = outage();
    let data = |edge: String| move |k: u64| json!({"edge": edge, "n": k});
    let mut sockets = Vec::new();
    for edge in &edges {
        sockets.push(edge.relay().await);
    }
    for round in 0..ROUNDS {
        let range = round * n / ROUNDS..(round + 1) * n / ROUNDS;
        if round == ROUNDS / 2 {
            drop(sockets.remove(0));
            edges[0].kill_and_restart().await;
            assert_eq!(
                edges[0]
                    .metric(r#"edgewire_uplink_queue_messages{service="edge"}"#)
                    .await,
                range.start as f64,
                "the queue came back from disk"
            );
            sockets.insert(0, edges[0].relay().await);
        }
        if !range.is_empty() {
            for (edge, ws) in edges.iter().zip(&mut sockets) {
                publish_all(ws, "telemetry", range.clone(), data(edge.node.clone())).await;
            }
        }
        let next = started + outage * (round + 1) as u32 / ROUNDS as u32;
        tokio::time::sleep_until(next.into()).await;
    }
    drop(sockets);
    for edge in &edges {
        let text = edge.agent.metrics().await;
        assert_eq!(
            metric_value(&text, r#"edgewire_uplink_queue_messages{service="edge"}"#),
            n as f64,
            "{}",
            edge.node
        );
        assert!(
            metric_value(
                &text,
                r#"edgewire_uplink_connect_failures_total{reason="unreachable",service="edge"}"#
            ) >= 1.0
        );
        assert!(
            metric_value(
                &text,
                r#"edgewire_uplink_link{service="edge",state="connecting"}"#
            ) == 1.0
        );
    }
    eprintln!(
        "published {} messages during an outage of {:?}",
        3 * n,
        started.elapsed()
    );

    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let mut subscriber = connect(SocketAddr::from(([127, 0, 0, 1], port)), "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;
    let token = edge_token(SECRET);
    let drain_started = Instant::now();
    for edge in &edges {
        edge.give_token(&token);
    }
    // Halfway through edge-1's drain it is SIGKILLed: what the hub had
    // acknowledged since its last cursor write, and what was in flight, is
    // sent again from disk, and the hub must drop it as duplicates.
    let mut got = Vec::new();
    let mut killed = false;
    let mut edge1 = 0;
    while got.len() < 3 * n as usize {
        assert!(
            drain_started.elapsed() < DRAIN,
            "drained only {} of {}",
            got.len(),
            3 * n
        );
        let more = drain_messages(&mut subscriber, 1, WAIT, Duration::ZERO).await;
        edge1 += more
            .iter()
            .filter(|(_, _, origin)| origin.as_deref() == Some("edge-1"))
            .count() as u64;
        got.extend(more);
        if !killed && edge1 >= n / 2 {
            killed = true;
            edges[1].kill_and_restart().await;
        }
    }
    assert!(killed, "edge-1 was restarted during the drain");
    // Anything more now would be a duplicate.
    got.extend(drain_messages(&mut subscriber, 0, WAIT, Duration::from_secs(2)).await);
    eprintln!(
        "drained {} messages in {:?}",
        got.len(),
        drain_started.elapsed()
    );
    let got = by_edge(&got);
    let want: Vec<u64> = (0..n).collect();
    for edge in &edges {
        let seen = got.get(&edge.node).cloned().unwrap_or_default();
        assert_eq!(seen.len() as u64, n, "{}: each message once", edge.node);
        assert!(seen == want, "{}: in publish order", edge.node);
    }
    let duplicates = metric_value(
        &hub.metrics().await,
        r#"edgewire_uplink_duplicates_total{service="hub"}"#,
    );
    eprintln!("the hub dropped {duplicates} duplicates");
    assert!(
        duplicates > 0.0,
        "edge-1's restart sent some messages again"
    );
    for edge in &edges {
        let node = edge.node.clone();
        eventually(WAIT, &format!("{node}'s queue to empty"), || async {
            edge.metric(r#"edgewire_uplink_queue_messages{service="edge"}"#)
                .await
                == 0.0
        })
        .await;
        let text = edge.agent.metrics().await;
        assert_eq!(
            metric_value(&text, r#"edgewire_uplink_queue_bytes{service="edge"}"#),
            0.0
        );
        for reason in ["capacity", "ttl", "store_failed", "rejected"] {
            assert_eq!(
                metric_value(
                    &text,
                    &format!(
                        r#"edgewire_uplink_dropped_total{{reason="{reason}",service="edge"}}"#
                    )
                ),
                0.0,
                "{node}: nothing dropped ({reason})"
            );
        }
    }
}

/// A queue bound below the outage's volume: the oldest are dropped and
/// counted exactly; everything else arrives, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_bound_drops_the_oldest_and_counts_them_exactly() {
    let n = 2_000u64;
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    // Each record is 26 + 9 + about 50 bytes: 64 KiB holds some 770.
    let edge = Edge::spawn("edge-0", root.path(), &url, 64 * 1024);
    edge.agent.wait_ready().await;
    let mut ws = edge.relay().await;
    publish_all(
        &mut ws,
        "telemetry",
        0..n,
        |k| json!({"edge": "edge-0", "n": k, "pad": "x".repeat(10)}),
    )
    .await;
    let dropped = edge
        .metric(r#"edgewire_uplink_dropped_total{reason="capacity",service="edge"}"#)
        .await as u64;
    let queued = edge
        .metric(r#"edgewire_uplink_queue_messages{service="edge"}"#)
        .await as u64;
    assert!(dropped > 0 && dropped < n, "dropped {dropped} of {n}");
    assert_eq!(
        dropped + queued,
        n,
        "every message is queued or counted as dropped"
    );
    assert!(
        edge.metric(r#"edgewire_uplink_queue_bytes{service="edge"}"#)
            .await
            <= 65536.0
    );

    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let mut subscriber = connect(SocketAddr::from(([127, 0, 0, 1], port)), "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;
    edge.give_token(&edge_token(SECRET));
    let got = drain_messages(
        &mut subscriber,
        queued as usize,
        DRAIN,
        Duration::from_secs(2),
    )
    .await;
    let got = by_edge(&got);
    let want: Vec<u64> = (dropped..n).collect();
    assert_eq!(
        got.get("edge-0"),
        Some(&want),
        "the newest arrive, once, in order"
    );
}

/// Messages that wait longer than `ttlSeconds` for the hub are dropped and
/// counted as `ttl`, and never sent once it is back; what is published
/// after goes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_the_ttl_are_dropped_counted_and_never_sent() {
    let n = 5u64;
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let config =
        edge_config(&url, &root.path().join("edge-0.token"), 1 << 20) + "      ttlSeconds: 1\n";
    let edge = Edge::spawn_with("edge-0", root.path(), config);
    edge.agent.wait_ready().await;
    let mut ws = edge.relay().await;
    publish_all(
        &mut ws,
        "telemetry",
        0..n,
        |k| json!({"edge": "edge-0", "n": k}),
    )
    .await;
    edge.agent
        .wait_metric(
            r#"edgewire_uplink_dropped_total{reason="ttl",service="edge"}"#,
            n as f64,
        )
        .await;
    assert_eq!(
        edge.metric(r#"edgewire_uplink_queue_messages{service="edge"}"#)
            .await,
        0.0
    );

    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let mut subscriber = connect(SocketAddr::from(([127, 0, 0, 1], port)), "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;
    edge.give_token(&edge_token(SECRET));
    edge.agent
        .wait_metric(
            r#"edgewire_uplink_link{service="edge",state="connected"}"#,
            1.0,
        )
        .await;
    publish_all(
        &mut ws,
        "telemetry",
        n..n + 1,
        |k| json!({"edge": "edge-0", "n": k}),
    )
    .await;
    let got = drain_messages(&mut subscriber, 1, DRAIN, Duration::from_secs(2)).await;
    assert_eq!(
        by_edge(&got).get("edge-0"),
        Some(&vec![n]),
        "only the message published after the hub's return"
    );
    assert_eq!(
        edge.metric(r#"edgewire_uplink_dropped_total{reason="ttl",service="edge"}"#)
            .await,
        n as f64
    );
}

/// A command published at the hub reaches the subscribers of every linked
/// edge once; a message an edge sends up reaches the hub and the other edge
/// once, and does not come back to the edge it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_reaches_every_edge_once_and_nothing_loops() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let token = edge_token(SECRET);
    let edges: Vec<Edge> = (0..2)
        .map(|i| Edge::spawn(&format!("edge-{i}"), root.path(), &url, 1 << 20))
        .collect();
    for edge in &edges {
        edge.give_token(&token);
        edge.agent.wait_ready().await;
        edge.agent
            .wait_metric(
                r#"edgewire_uplink_link{service="edge",state="connected"}"#,
                1.0,
            )
            .await;
    }
    let mut locals = Vec::new();
    for edge in &edges {
        let mut ws = edge.relay().await;
        subscribe(&mut ws, "commands").await;
        subscribe(&mut ws, "telemetry").await;
        locals.push(ws);
    }
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut at_hub = connect(hub_addr, "/relay").await;
    subscribe(&mut at_hub, "telemetry").await;
    let reply = request(
        &mut at_hub,
        json!({"type": "publish", "channel": "commands", "data": {"cmd": "reboot"}, "id": 1}),
    )
    .await;
    assert_eq!(reply["type"], "published", "{reply}");
    for (edge, ws) in edges.iter().zip(&mut locals) {
        let got = drain_messages(ws, 1, WAIT, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 1, "{}: the command once: {got:?}", edge.node);
        assert_eq!(
            (got[0].0.as_str(), &got[0].1),
            ("commands", &json!({"cmd": "reboot"}))
        );
    }

    let mut publisher = edges[0].relay().await;
    publish_all(
        &mut publisher,
        "telemetry",
        0..1,
        |_| json!({"edge": "edge-0", "n": 0}),
    )
    .await;
    let at_edge0 = drain_messages(&mut locals[0], 1, WAIT, Duration::from_secs(2)).await;
    assert_eq!(
        at_edge0.len(),
        1,
        "published here, delivered here once, not echoed from the hub: {at_edge0:?}"
    );
    assert_eq!(at_edge0[0].2, None, "the local delivery");
    let at_edge1 = drain_messages(&mut locals[1], 1, WAIT, Duration::from_secs(1)).await;
    assert_eq!(
        at_edge1.len(),
        1,
        "the other edge gets it from the hub once: {at_edge1:?}"
    );
    assert_eq!(at_edge1[0].2.as_deref(), Some("edge-0"));
    let at_hub_got = drain_messages(&mut at_hub, 1, WAIT, Duration::from_secs(1)).await;
    assert_eq!(at_hub_got.len(), 1, "{at_hub_got:?}");
    assert_eq!(
        edges[0]
            .metric(r#"edgewire_uplink_delivered_total{service="edge"}"#)
            .await,
        1.0
    );
}

/// A hub stopped (SIGTERM) while two edges stream to it: what it
/// acknowledged reaches its subscriber before it closes, and what it did not
/// is sent again to the hub that comes back, so the subscriber, before and
/// after, gets every message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_hub_delivers_everything_it_acknowledged() {
    const N: u64 = 20_000;
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let mut subscriber = connect(hub_addr, "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;
    let edges: Vec<Edge> = (0..2)
        .map(|i| Edge::spawn(&format!("edge-{i}"), root.path(), &url, 64 << 20))
        .collect();
    for edge in &edges {
        edge.give_token(&edge_token(SECRET));
        edge.agent.wait_ready().await;
    }
    let mut publishers = Vec::new();
    for edge in &edges {
        let mut ws = edge.relay().await;
        let node = edge.node.clone();
        publishers.push(tokio::spawn(async move {
            publish_all(
                &mut ws,
                "telemetry",
                0..N,
                |k| json!({"edge": node, "n": k}),
            )
            .await;
        }));
    }
    // Well under way: stop the hub, and read what it sends until it closes.
    let mut got = drain_messages(&mut subscriber, (N / 2) as usize, DRAIN, Duration::ZERO).await;
    hub.signal("TERM");
    loop {
        match tokio::time::timeout(WAIT, subscriber.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => got.extend(delivery(&text)),
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    assert!(hub.wait_exit(WAIT).is_some(), "the hub did not stop");
    let before = got.len();
    // A hub delivers to the subscribers present: hold the edges until the
    // new one's subscriber is in place.
    for edge in &edges {
        edge.agent.signal("STOP");
    }
    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let mut subscriber = connect(hub_addr, "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;
    for edge in &edges {
        edge.agent.signal("CONT");
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let deadline = Instant::now() + DRAIN;
    while got.len() < 2 * N as usize && Instant::now() < deadline {
        got.extend(drain_messages(&mut subscriber, 1, WAIT, Duration::ZERO).await);
    }
    // Anything more now would be a duplicate.
    got.extend(drain_messages(&mut subscriber, 0, WAIT, Duration::from_secs(2)).await);
    eprintln!(
        "{before} messages before the hub stopped, {} after",
        got.len() - before
    );
    let got = by_edge(&got);
    let want: Vec<u64> = (0..N).collect();
    for edge in &edges {
        let seen = got.get(&edge.node).cloned().unwrap_or_default();
        let distinct: std::collections::BTreeSet<u64> = seen.iter().copied().collect();
        let missing = want.iter().filter(|k| !distinct.contains(k)).count();
        assert_eq!(
            missing, 0,
            "{}: {missing} messages never arrived",
            edge.node
        );
        assert!(seen == want, "{}: each once, in publish order", edge.node);
    }
}

/// A client of the hub that may publish, but whose token does not name
/// edge-0 among its `origins`, cannot forward as edge-0: were it let
/// through, its made-up sequence number would make the hub drop every
/// message edge-0 really sends after it as already delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forward_as_a_node_its_token_does_not_name() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut subscriber = connect(hub_addr, "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;

    let other = token(
        SECRET,
        json!({"publish": ["*"], "subscribe": ["*"], "origins": ["edge-9"]}),
    );
    let mut mallory = connect(hub_addr, &format!("/relay?token={other}")).await;
    let reply = request(
        &mut mallory,
        json!({"type": "publish", "channel": "telemetry", "id": "spoof",
               "data": {"edge": "edge-0", "n": 999},
               "origin": {"node": "edge-0", "seq": u64::MAX - 1}}),
    )
    .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );
    assert_eq!(
        metric_value(
            &hub.metrics().await,
            r#"edgewire_auth_total{outcome="denied",reason="forward",service="hub"}"#
        ),
        1.0
    );

    let edge = Edge::spawn("edge-0", root.path(), &url, 1 << 20);
    edge.give_token(&token(
        SECRET,
        json!({"publish": ["telemetry"], "subscribe": ["*"], "origins": ["edge-0"]}),
    ));
    edge.agent.wait_ready().await;
    let mut publisher = edge.relay().await;
    publish_all(
        &mut publisher,
        "telemetry",
        0..10,
        |k| json!({"edge": "edge-0", "n": k}),
    )
    .await;
    let got = drain_messages(&mut subscriber, 10, DRAIN, Duration::from_secs(2)).await;
    assert_eq!(
        by_edge(&got).get("edge-0"),
        Some(&(0..10).collect::<Vec<u64>>()),
        "edge-0's own messages all arrive, and nothing else: {got:?}"
    );
}

/// A message larger than the hub takes (its `maxMessageBytes` is below the
/// edge's) is dropped at the edge and counted, and the messages after it go
/// up: sent, it would make the hub close the link at every attempt and hold
/// everything behind it in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_the_hub_is_dropped_and_the_rest_go_up() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let state = root.path().join("hub").display().to_string();
    let config =
        hub_config(root.path(), port).replace("limits: {", "limits: {maxMessageBytes: 4096, ");
    let hub = AgentProcess::spawn(Some(&config), &["--state-dir", &state]);
    hub.wait_ready().await;
    let mut subscriber = connect(SocketAddr::from(([127, 0, 0, 1], port)), "/relay").await;
    subscribe(&mut subscriber, "telemetry").await;

    let edge = Edge::spawn("edge-0", root.path(), &url, 1 << 20);
    edge.give_token(&edge_token(SECRET));
    edge.agent.wait_ready().await;
    let mut publisher = edge.relay().await;
    publish_all(&mut publisher, "telemetry", 0..4, |k| {
        let pad = if k == 1 { 8_000 } else { 10 };
        json!({"edge": "edge-0", "n": k, "pad": "x".repeat(pad)})
    })
    .await;
    let got = drain_messages(&mut subscriber, 3, DRAIN, Duration::from_secs(2)).await;
    assert_eq!(
        by_edge(&got).get("edge-0"),
        Some(&vec![0, 2, 3]),
        "all but the oversize one, once, in order"
    );
    assert_eq!(
        edge.metric(r#"edgewire_uplink_dropped_total{reason="too_large",service="edge"}"#)
            .await,
        1.0
    );
    eventually(WAIT, "an empty queue", || async {
        edge.metric(r#"edgewire_uplink_queue_messages{service="edge"}"#)
            .await
            == 0.0
    })
    .await;
}

/// A hub that cannot be reached, one that fails TLS, and one that refuses
/// the credential: each is logged clearly and counted by reason, messages
/// wait in the queue, and the edge goes on serving its local clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hub_is_logged_and_counted_and_local_clients_are_served() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = spawn_hub(root.path(), port, "");
    hub.wait_ready().await;
    let nobody = free_port();
    let cases = [
        (
            "unreachable",
            format!("ws://127.0.0.1:{nobody}/relay"),
            "cannot reach the hub",
        ),
        (
            "tls",
            format!("wss://127.0.0.1:{port}/relay"),
            "TLS with the hub failed",
        ),
        (
            "unauthorized",
            format!("ws://127.0.0.1:{port}/relay"),
            "the hub refused the credential (HTTP 401)",
        ),
    ];
    let edges: Vec<Edge> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, url, _))| Edge::spawn(&format!("edge-{i}"), root.path(), url, 1 << 20))
        .collect();
    let wrong = edge_token("another-secret-that-the-hub-does-not-know-0123");
    for ((reason, _, line), edge) in cases.iter().zip(&edges) {
        edge.give_token(&wrong);
        edge.agent.wait_ready().await;
        edge.agent
            .wait_metric(
                &format!(
                    r#"edgewire_uplink_connect_failures_total{{reason="{reason}",service="edge"}}"#
                ),
                1.0,
            )
            .await;
        let log = edge.agent.log();
        assert!(
            log.contains(line),
            "{reason}: no {line:?} in the log:\n{log}"
        );
        assert_local_clients_served(edge).await;
        assert_eq!(
            edge.metric(r#"edgewire_uplink_queue_messages{service="edge"}"#)
                .await,
            1.0,
            "{reason}: the message waits"
        );
        assert_eq!(
            edge.metric(r#"edgewire_uplink_link{service="edge",state="connecting"}"#)
                .await,
            1.0
        );
    }
}

/// A local subscriber gets a local publish on an uplink channel.
async fn assert_local_clients_served(edge: &Edge) {
    let mut subscriber = edge.relay().await;
    subscribe(&mut subscriber, "telemetry").await;
    let mut publisher = edge.relay().await;
    publish_all(
        &mut publisher,
        "telemetry",
        0..1,
        |_| json!({"edge": "x", "n": 0}),
    )
    .await;
    let got = drain_messages(&mut subscriber, 1, WAIT, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1, "{}: {got:?}", edge.node);
}

/// A small tmpfs mounted for the test, unmounted when dropped (also when
/// the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount a tmpfs at {} (the tests run as root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The state directory's disk fills up: the messages that cannot be stored
/// are logged and counted, the ones stored before are kept, and local
/// clients get every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_logged_and_counted_and_local_clients_are_served() {
    let root = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&root.path().join("disk"), "256k");
    let nobody = free_port();
    let url = format!("ws://127.0.0.1:{nobody}/relay");
    let edge = Edge::spawn("edge-0", &disk.0, &url, 16 << 20);
    edge.agent.wait_ready().await;
    let mut subscriber = edge.relay().await;
    subscribe(&mut subscriber, "telemetry").await;
    let mut publisher = edge.relay().await;
    let n = 600u64;
    publish_all(
        &mut publisher,
        "telemetry",
        0..n,
        |k| json!({"edge": "edge-0", "n": k, "pad": "x".repeat(1000)}),
    )
    .await;
    let got = drain_messages(
        &mut subscriber,
        n as usize,
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(got.len() as u64, n, "local subscribers get every message");
    let text = edge.agent.metrics().await;
    let failed = metric_value(
        &text,
        r#"edgewire_uplink_dropped_total{reason="store_failed",service="edge"}"#,
    );
    let queued = metric_value(&text, r#"edgewire_uplink_queue_messages{service="edge"}"#);
    assert!(failed > 0.0, "256 KiB cannot hold {n} KiB");
    assert_eq!(
        failed + queued,
        n as f64,
        "stored or counted: {failed} + {queued}"
    );
    let log = edge.agent.log();
    assert!(log.contains("cannot store an uplink message"), "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    drop(edge);
    drop(disk);
}

fn tls_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

/// A `wss://` hub whose certificate chains to the edge's `caFile`: the link
/// comes up and the hub acknowledges what the edge sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_hub_is_reached_with_the_ca_from_ca_file() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let tls = format!(
        "    tls: {{certFile: {}, keyFile: {}}}\n",
        tls_fixture("server1.pem"),
        tls_fixture("server1.key")
    );
    let hub = spawn_hub(root.path(), port, &tls);
    hub.wait_ready().await;
    let token = root.path().join("edge-0.token");
    let url = format!("wss://127.0.0.1:{port}/relay");
    let config =
        edge_config(&url, &token, 1 << 20) + &format!("      caFile: {}\n", tls_fixture("ca.pem"));
    let edge = Edge::spawn_with("edge-0", root.path(), config);
    edge.give_token(&edge_token(SECRET));
    edge.agent.wait_ready().await;
    edge.agent
        .wait_metric(
            r#"edgewire_uplink_link{service="edge",state="connected"}"#,
            1.0,
        )
        .await;
    let mut publisher = edge.relay().await;
    publish_all(
        &mut publisher,
        "telemetry",
        0..3,
        |k| json!({"edge": "edge-0", "n": k}),
    )
    .await;
    edge.agent
        .wait_metric(r#"edgewire_uplink_delivered_total{service="edge"}"#, 3.0)
        .await;
    let metrics = edge.agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_uplink_connect_failures_total{reason="tls",service="edge"}"#
        ),
        0.0
    );
    // C_data of the uplink: the payloads sent up, each once here.
    let payloads: usize = (0..3)
        .map(|k| json!({"edge": "edge-0", "n": k}).to_string().len())
        .sum();
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_uplink_sent_bytes_total{service="edge"}"#
        ),
        payloads as f64,
        "{metrics}"
    );

    // The dashboard's C_data panel, its uplink query, answered
    // by a real Prometheus scraping the edge while it sends more.
    let config = format!(
        "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: edgewire-agents\n    static_configs: [{{targets: ['{}']}}]\n",
        edge.agent.admin
    );
    let prom =
        support::prometheus::Prometheus::start(&config, &root.path().join("prometheus")).await;
    prom.wait_value(r#"up{job="edgewire-agents"}"#, |v| v == 1.0)
        .await;
    let query = dashboard_query("edgewire_uplink_sent_bytes_total");
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        publish_all(
            &mut publisher,
            "telemetry",
            3 + round..4 + round,
            |k| json!({"edge": "edge-0", "n": k}),
        )
        .await;
    }
    prom.wait_value(&query, |v| v > 0.0).await;
}

/// The expression of the chart dashboard's panel target that reads `metric`.
fn dashboard_query(metric: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/edgewire/dashboards/edgewire.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .find(|expr| expr.contains(metric))
        .unwrap_or_else(|| panic!("no panel reads {metric} in {path}"))
}

/// The expression of alert `name` in the chart's PrometheusRule.
fn chart_alert(name: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/edgewire/templates/monitoring.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != format!("- alert: {name}"));
    lines
        .find_map(|l| l.trim().strip_prefix("expr: "))
        .unwrap_or_else(|| panic!("no alert {name} in {path}"))
        .to_string()
}

/// The chart's uplink alerts, their windows shortened from minutes to
/// seconds, answered by a real Prometheus scraping an edge whose hub is
/// away: a queue that keeps growing, and one that drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_alerts_see_a_growing_and_a_dropping_queue() {
    let root = tempfile::tempdir().unwrap();
    let url = format!("ws://127.0.0.1:{}/relay", free_port());
    // 4 KiB holds some 60 of these messages: drops start after half a minute.
    let edge = Edge::spawn("edge-0", root.path(), &url, 4096);
    edge.agent.wait_ready().await;
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: edgewire-agents\n    static_configs: [{{targets: ['{}']}}]\n",
        edge.agent.admin
    );
    let prom =
        support::prometheus::Prometheus::start(&config, &root.path().join("prometheus")).await;
    let growing = chart_alert("EdgewireUplinkQueueGrowing")
        .replace("[15m]", "[10s]")
        .replace("> 900", "> 3");
    let dropping = chart_alert("EdgewireUplinkDropping").replace("[15m]", "[30s]");
    assert!(
        growing.contains("[10s]") && dropping.contains("[30s]"),
        "{growing} / {dropping}"
    );
    let mut publisher = edge.relay().await;
    let started = Instant::now();
    let mut k = 0;
    let mut fired = (false, false);
    while !(fired.0 && fired.1) {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "alerts fired (growing, dropping): {fired:?}; targets: {:?}",
            prom.targets().await
        );
        publish_all(
            &mut publisher,
            "telemetry",
            k..k + 1,
            |n| json!({"edge": "edge-0", "n": n, "pad": "x".repeat(20)}),
        )
        .await;
        k += 1;
        if !fired.0 {
            fired.0 = !prom.series(&growing).await.is_empty();
        }
        if !fired.1 {
            fired.1 = !prom.series(&dropping).await.is_empty();
            // The queue is bounded: it cannot grow while it drops.
            assert!(fired.0 || !fired.1, "dropping before growing");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A state directory where no queue can be made (here: a file): the
/// service still serves its local clients, and the log says why it has no
/// hub link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_without_room_for_a_queue_keeps_local_clients_served() {
    let root = tempfile::tempdir().unwrap();
    let not_a_dir = root.path().join("state");
    std::fs::write(&not_a_dir, "not a directory").unwrap();
    let token = root.path().join("edge-0.token");
    let url = format!("ws://127.0.0.1:{}/relay", free_port());
    let agent = spawn_edge("edge-0", &not_a_dir, &edge_config(&url, &token, 1 << 20));
    agent.wait_ready().await;
    let log = agent.log();
    assert!(
        log.contains("the service runs without its hub link until it restarts"),
        "{log}"
    );
    let edge = Edge {
        node: "edge-0".into(),
        state: not_a_dir,
        token,
        config: String::new(),
        agent,
    };
    assert_local_clients_served(&edge).await;
}
