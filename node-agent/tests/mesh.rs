//! The mesh between agent processes, each on its own loopback address, with
//! static peers: channels span the agents, forwarding follows interest, a
//! killed agent relinks when it returns, and a wrong secret is refused.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const SECRET: &str = "correct horse battery staple";

/// Agent `i` of the mesh on 127.0.0.(10+i); every agent uses the same ports
/// on its own address, as agents on separate nodes would.
struct Cluster {
    service_port: u16,
    mesh_port: u16,
    secret_dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let secret_dir = tempfile::tempdir().unwrap();
        std::fs::write(secret_dir.path().join("good"), SECRET).unwrap();
        std::fs::write(
            secret_dir.path().join("bad"),
            "an entirely different secret",
        )
        .unwrap();
        Cluster {
            service_port: free_port(),
            mesh_port: free_port(),
            secret_dir,
        }
    }

    fn ip(i: usize) -> String {
        format!("127.0.0.{}", 10 + i)
    }

    fn config(&self, me: usize, members: &[usize]) -> String {
        let peers: Vec<String> = members
            .iter()
            .filter(|p| **p != me)
            .map(|p| {
                format!(
                    "      - {{node: n{p}, address: \"{}:{}\"}}",
                    Cluster::ip(*p),
                    self.mesh_port
                )
            })
            .collect();
        format!(
            "services:\n  - name: chat\n    port: {}\n    channels: [{{name: news}}, {{name: quiet}}]\n    peers:\n{}\n",
            self.service_port,
            peers.join("\n")
        )
    }

    fn start(&self, me: usize, members: &[usize], secret: &str) -> AgentProcess {
        let secret = self.secret_dir.path().join(secret);
        let mesh = format!("{}:{}", Cluster::ip(me), self.mesh_port);
        let node = format!("n{me}");
        AgentProcess::spawn_on(
            &Cluster::ip(me),
            Some(&self.config(me, members)),
            &[
                "--node-name",
                &node,
                "--mesh-address",
                &mesh,
                "--mesh-secret-file",
                secret.to_str().unwrap(),
            ],
        )
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        format!("{}:{}", Cluster::ip(i), self.service_port)
            .parse()
            .unwrap()
    }
}

async fn subscriber(addr: std::net::SocketAddr, channel: &str) -> Client {
    let mut ws = connect(addr, "/relay").await;
    let reply = request(&mut ws, json!({"type": "subscribe", "channel": channel})).await;
    assert_eq!(reply["type"], "subscribed");
    ws
}

async fn wait_peers(agent: &AgentProcess, connected: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric_value(
            &agent.metrics().await,
            r#"edgewire_mesh_peers{service="chat",state="connected"}"#,
        );
        if v == connected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mesh peers stayed at {v}, wanted {connected}; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes probes at `publisher` until each of `subs` has seen one (the
/// interest has reached the publisher's agent), then drains them.
async fn settle(publisher: &mut Client, subs: &mut [&mut Client]) {
    for round in 0..200 {
        send_text(
            publisher,
            json!({"type": "publish", "channel": "news", "data": {"probe": round}}).to_string(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut all = true;
        for sub in subs.iter_mut() {
            let mut seen = false;
            while let Ok(Some(Ok(msg))) = tokio::time::timeout(
                Duration::from_millis(20),
                futures_util::StreamExt::next(&mut **sub),
            )
            .await
            {
                if msg.is_text() {
                    seen = true;
                }
            }
            all &= seen;
        }
        if all {
            // Let the last probes land, then drop them.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for sub in subs.iter_mut() {
                while let Ok(Some(Ok(_))) = tokio::time::timeout(
                    Duration::from_millis(50),
                    futures_util::StreamExt::next(&mut **sub),
                )
                .await
                {}
            }
            return;
        }
    }
    panic!("the mesh never carried a probe to every subscriber");
}

async fn expect_sequence(sub: &mut Client, tag: &str, count: usize) {
    for n in 0..count {
        let msg = next_json(sub).await;
        assert_eq!(
            msg["data"],
            json!({"tag": tag, "n": n}),
            "message {n} of {tag}"
        );
    }
}

#[tokio::test]
async fn channels_span_the_mesh_once_in_order_following_interest() {
    let cluster = Cluster::new();
    let all = [0, 1, 2];
    let agents: Vec<AgentProcess> = all
        .iter()
        .map(|i| cluster.start(*i, &all, "good"))
        .collect();
    for agent in &agents {
        agent.wait_ready().await;
    }
    for agent in &agents {
        wait_peers(agent, 2.0).await;
    }
    let mut local = subscriber(cluster.addr(0), "news").await;
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    let mut at_c = subscriber(cluster.addr(2), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut local, &mut at_b, &mut at_c]).await;

    for n in 0..300 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "a", "n": n}}).to_string(),
        )
        .await;
    }
    for sub in [&mut local, &mut at_b, &mut at_c] {
        expect_sequence(sub, "a", 300).await;
    }
    // Nothing more: the next message each sees is the reply to its own call.
    for sub in [&mut local, &mut at_b, &mut at_c] {
        let reply = request(
            sub,
            json!({"type": "unsubscribe", "channel": "quiet", "id": 1}),
        )
        .await;
        assert_eq!(
            reply["type"], "unsubscribed",
            "no duplicate deliveries: {reply}"
        );
    }
    let b_metrics = agents[1].metrics().await;
    assert!(
        metric_value(
            &b_metrics,
            r#"edgewire_message_latency_seconds_count{path="mesh",service="chat"}"#
        ) >= 300.0
    );

    // Interest: C's subscriber leaves, so A stops sending to C; B still gets all.
    let mut marker_at_a = subscriber(cluster.addr(0), "quiet").await;
    let reply = request(
        &mut at_c,
        json!({"type": "unsubscribe", "channel": "news", "id": 2}),
    )
    .await;
    assert_eq!(reply["type"], "unsubscribed");
    // C's unsubscribe and C's later publishes share the C -> A link, in order:
    // once a publish on "quiet" from C reaches A, A has heard the unsubscribe.
    let mut heard = false;
    for _ in 0..200 {
        send_text(
            &mut at_c,
            json!({"type": "publish", "channel": "quiet", "data": "marker"}).to_string(),
        )
        .await;
        if tokio::time::timeout(Duration::from_millis(50), next_json(&mut marker_at_a))
            .await
            .is_ok()
        {
            heard = true;
            break;
        }
    }
    assert!(heard, "C's publishes never reached A");
    let c_before = metric_value(
        &agents[2].metrics().await,
        r#"edgewire_mesh_messages_total{direction="received",service="chat"}"#,
    );
    for n in 0..50 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "b", "n": n}}).to_string(),
        )
        .await;
    }
    expect_sequence(&mut at_b, "b", 50).await;
    expect_sequence(&mut local, "b", 50).await;
    let c_after = metric_value(
        &agents[2].metrics().await,
        r#"edgewire_mesh_messages_total{direction="received",service="chat"}"#,
    );
    assert_eq!(
        c_after, c_before,
        "C has no subscribers, so nothing is forwarded to it"
    );

    // Publishing at another node works the same way.
    let mut from_b = connect(cluster.addr(1), "/relay").await;
    for n in 0..20 {
        send_text(
            &mut from_b,
            json!({"type": "publish", "channel": "news", "data": {"tag": "c", "n": n}}).to_string(),
        )
        .await;
    }
    expect_sequence(&mut local, "c", 20).await;
    expect_sequence(&mut at_b, "c", 20).await;
}

#[tokio::test]
async fn a_killed_agent_does_not_stop_the_others_and_relinks() {
    let cluster = Cluster::new();
    let all = [0, 1, 2];
    let mut agents: Vec<Option<AgentProcess>> = all
        .iter()
        .map(|i| Some(cluster.start(*i, &all, "good")))
        .collect();
    for agent in agents.iter().flatten() {
        agent.wait_ready().await;
        wait_peers(agent, 2.0).await;
    }
    let mut at_c = subscriber(cluster.addr(2), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut at_c]).await;

    // Kill B: A and C keep serving each other.
    drop(agents[1].take());
    wait_peers(agents[0].as_ref().unwrap(), 1.0).await;
    for n in 0..30 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "x", "n": n}}).to_string(),
        )
        .await;
    }
    expect_sequence(&mut at_c, "x", 30).await;

    // B returns on the same address: the others relink and it receives again.
    let b = cluster.start(1, &all, "good");
    b.wait_ready().await;
    wait_peers(&b, 2.0).await;
    wait_peers(agents[0].as_ref().unwrap(), 2.0).await;
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    settle(&mut publisher, &mut [&mut at_b, &mut at_c]).await;
    for n in 0..30 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "y", "n": n}}).to_string(),
        )
        .await;
    }
    expect_sequence(&mut at_b, "y", 30).await;
    expect_sequence(&mut at_c, "y", 30).await;
}

#[tokio::test]
async fn a_wrong_mesh_secret_is_refused() {
    let cluster = Cluster::new();
    let members = [0, 1];
    let good = cluster.start(0, &members, "good");
    let bad = cluster.start(1, &members, "bad");
    good.wait_ready().await;
    bad.wait_ready().await;
    let deadline = Instant::now() + WAIT;
    while !good.log().contains("authentication failed") {
        assert!(
            Instant::now() < deadline,
            "the good agent never refused the bad one:\n{}",
            good.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for agent in [&good, &bad] {
        let connected = metric_value(
            &agent.metrics().await,
            r#"edgewire_mesh_peers{service="chat",state="connected"}"#,
        );
        assert_eq!(connected, 0.0, "no link with a wrong secret");
    }
    // And nothing crosses: a subscriber behind the bad agent hears nothing.
    let mut behind_bad = subscriber(cluster.addr(1), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    for n in 0..20 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"n": n}}).to_string(),
        )
        .await;
    }
    let heard = tokio::time::timeout(Duration::from_millis(1500), next_json(&mut behind_bad)).await;
    assert!(
        heard.is_err(),
        "a message crossed an unauthenticated link: {heard:?}"
    );
    assert!(bad.log().contains("mesh dial failed"), "{}", bad.log());
}

#[tokio::test]
async fn a_frozen_peer_does_not_stall_the_others() {
    let cluster = Cluster::new();
    let all = [0, 1, 2];
    let agents: Vec<AgentProcess> = all
        .iter()
        .map(|i| cluster.start(*i, &all, "good"))
        .collect();
    for agent in &agents {
        agent.wait_ready().await;
        wait_peers(agent, 2.0).await;
    }
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    let mut at_c = subscriber(cluster.addr(2), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut at_b, &mut at_c]).await;

    // B stops dead (SIGSTOP): its sockets stay open but nothing is read.
    agents[1].signal("STOP");
    let payload = "x".repeat(2000);
    let count = 3000;
    for n in 0..count {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "f", "n": n, "pad": payload}}).to_string(),
        )
        .await;
    }
    // C gets every message, in order, while B is frozen: the link to B has
    // its own queue and task, so nothing waits on B.
    for n in 0..count {
        let msg = next_json(&mut at_c).await;
        assert_eq!(msg["data"]["n"], n, "message {n} at C");
    }
    agents[1].signal("CONT");
    // B recovers: its link is redialed (or resumes) and it is served again.
    wait_peers(&agents[0], 2.0).await;
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    settle(&mut publisher, &mut [&mut at_b, &mut at_c]).await;
}
