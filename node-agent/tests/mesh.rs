//! The mesh between agent processes, each on its own loopback address, with
//! static peers: channels span the agents, forwarding follows interest, a
//! killed agent relinks when it returns, and a wrong secret is refused.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use support::*;

const SECRET: &str = "correct horse battery staple";
/// The service's limits unless a test says otherwise.
const LIMITS: &str = "{maxMessageBytes: 16777216}";

/// Agent `i` of the mesh on 127.0.B.(10+i); every agent uses the same ports
/// on its own address, as agents on separate nodes would. Each cluster has a
/// block B of its own: the tests run at once, and two of them given the same
/// free port would otherwise reach each other's agents.
struct Cluster {
    block: u8,
    service_port: u16,
    mesh_port: u16,
    secret_dir: tempfile::TempDir,
}

/// The next cluster's address block.
static NEXT_BLOCK: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

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
            block: NEXT_BLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            service_port: free_port(),
            mesh_port: free_port(),
            secret_dir,
        }
    }

    fn ip(&self, i: usize) -> String {
        format!("127.0.{}.{}", self.block, 10 + i)
    }

    fn config_with(&self, me: usize, members: &[usize], limits: &str) -> String {
        let peers: Vec<String> = members
            .iter()
            .filter(|p| **p != me)
            .map(|p| {
                format!(
                    "      - {{node: n{p}, address: \"{}:{}\", publicKey: {}}}",
                    self.ip(*p),
                    self.mesh_port,
                    mesh_public_key(&self.key_file(*p))
                )
            })
            .collect();
        format!(
            "services:\n  - name: chat\n    port: {}\n    channels: [{{name: news}}, {{name: quiet}}, {{name: bulk}}]\n    limits: {}\n    peers:\n{}\n",
            self.service_port,
            limits,
            peers.join("\n")
        )
    }

    /// Node `i`'s mesh private key, made on first use.
    fn key_file(&self, i: usize) -> std::path::PathBuf {
        self.secret_dir.path().join(format!("n{i}.key"))
    }

    fn start(&self, me: usize, members: &[usize], secret: &str) -> AgentProcess {
        self.start_with(me, members, secret, LIMITS, &[])
    }

    /// As `start`, with the service's `limits` and extra agent flags.
    fn start_with(
        &self,
        me: usize,
        members: &[usize],
        secret: &str,
        limits: &str,
        extra: &[&str],
    ) -> AgentProcess {
        let secret = self.secret_dir.path().join(secret);
        let key = self.key_file(me);
        let mesh = format!("{}:{}", self.ip(me), self.mesh_port);
        let node = format!("n{me}");
        let mut args = vec![
            "--node-name",
            &node,
            "--mesh-address",
            &mesh,
            "--mesh-secret-file",
            secret.to_str().unwrap(),
            "--mesh-key-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        AgentProcess::spawn_on(
            &self.ip(me),
            Some(&self.config_with(me, members, limits)),
            &args,
        )
    }

    /// Agents `members`, all with the right secret, started and ready, each
    /// linked to every other.
    async fn linked(&self, members: &[usize]) -> Vec<AgentProcess> {
        let agents: Vec<AgentProcess> = members
            .iter()
            .map(|i| self.start(*i, members, "good"))
            .collect();
        let peers = (members.len() - 1) as f64;
        for agent in &agents {
            agent.wait_ready().await;
            wait_peers(agent, peers).await;
        }
        agents
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        format!("{}:{}", self.ip(i), self.service_port)
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
            drop_late_probes(subs).await;
            return;
        }
    }
    panic!("the mesh never carried a probe to every subscriber");
}

/// Lets the last probes land, then drops whatever `subs` have received.
async fn drop_late_probes(subs: &mut [&mut Client]) {
    drop_late_messages(subs, Duration::from_millis(200)).await;
}

/// Publishes probes on `channel` from `publisher` (up to 200, 50 ms apart)
/// until one reaches `subscriber`; whether one did.
async fn probe_reaches(publisher: &mut Client, channel: &str, subscriber: &mut Client) -> bool {
    for round in 0..200 {
        send_text(
            publisher,
            json!({"type": "publish", "channel": channel, "data": {"probe": round}}).to_string(),
        )
        .await;
        if tokio::time::timeout(Duration::from_millis(50), next_json(subscriber))
            .await
            .is_ok()
        {
            return true;
        }
    }
    false
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
    let agents = cluster.linked(&[0, 1, 2]).await;
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
    assert!(
        probe_reaches(&mut at_c, "quiet", &mut marker_at_a).await,
        "C's publishes never reached A"
    );
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

/// A restarted agent hears its peers' subscribers as soon as it is back:
/// a peer redials it once it links to that peer, not after a backoff that
/// grew while it was away. (Its interest travels on its own link, so until
/// then the restarted agent's publishes reached none of its subscribers,
/// and nothing counted them.)
#[tokio::test]
async fn a_restarted_agent_is_redialled_at_once() {
    let cluster = Cluster::new();
    let pair = [0, 1];
    let a = cluster.start(0, &pair, "good");
    let b = cluster.start(1, &pair, "good");
    for agent in [&a, &b] {
        agent.wait_ready().await;
        wait_peers(agent, 1.0).await;
    }
    let mut at_b = subscriber(cluster.addr(1), "news").await;

    // Away long enough for B's backoff to grow: doubling from 0.2 s, its
    // attempts are 13 to 38 s apart after 40 s.
    drop(a);
    wait_peers(&b, 0.0).await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let a = cluster.start(0, &pair, "good");
    a.wait_ready().await;
    wait_peers(&a, 1.0).await;
    let back = Instant::now();
    wait_peers(&b, 1.0).await;
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "B relinked to the restarted A only after {took:?}"
    );
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut at_b]).await;
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

fn peers_in(metrics: &str, state: &str) -> f64 {
    metric_value(
        metrics,
        &format!(r#"edgewire_mesh_peers{{service="chat",state="{state}"}}"#),
    )
}

fn mesh_sent(metrics: &str) -> f64 {
    metric_value(
        metrics,
        r#"edgewire_mesh_messages_total{direction="sent",service="chat"}"#,
    )
}

/// B stops dead for 60 s (SIGSTOP: its sockets stay open, nothing is read)
/// while A publishes to subscribers at B and C. C keeps getting everything
/// in order; A and C notice B within 20 s (its link reads `connecting`) and
/// count what they cannot send it; every message for B is either sent or
/// counted; after SIGCONT B relinks and is served again.
#[tokio::test]
async fn a_frozen_peer_is_noticed_counted_and_relinked() {
    let cluster = Cluster::new();
    let agents = cluster.linked(&[0, 1, 2]).await;
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    let mut at_c = subscriber(cluster.addr(2), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut at_b, &mut at_c]).await;

    // C's subscriber reads as it goes and checks the order.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<usize>();
    let reader = tokio::spawn(async move {
        let mut want = 0usize;
        let mut done_rx = done_rx;
        let mut total = None;
        loop {
            if total == Some(want) {
                return want;
            }
            tokio::select! {
                n = &mut done_rx, if total.is_none() => total = Some(n.expect("the count")),
                msg = next_json(&mut at_c) => {
                    assert_eq!(msg["data"]["n"], want, "message {want} at C");
                    want += 1;
                }
            }
        }
    });

    let before = agents[0].metrics().await;
    let (sent_before, dropped_before) = (mesh_sent(&before), dropped_mesh(&before));
    let frozen_at = Instant::now();
    agents[1].signal("STOP");
    let pad = "x".repeat(16 * 1024);
    let mut published = 0usize;
    let publish = |n: usize| {
        json!({"type": "publish", "channel": "news", "data": {"n": n, "pad": pad}}).to_string()
    };
    // Within 20 s both A (which keeps writing to B) and C (which only pings
    // it) see B as down.
    let mut noticed = [false, false];
    while frozen_at.elapsed() < Duration::from_secs(20) && noticed != [true, true] {
        for _ in 0..20 {
            send_text(&mut publisher, publish(published)).await;
            published += 1;
        }
        for (k, i) in [0, 2].into_iter().enumerate() {
            noticed[k] = peers_in(&agents[i].metrics().await, "connecting") == 1.0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        noticed,
        [true, true],
        "20 s after B froze, A and C still count it as connected (A: {}, C: {})",
        peers_in(&agents[0].metrics().await, "connected"),
        peers_in(&agents[2].metrics().await, "connected"),
    );
    // While B is down, what A publishes for it is counted as dropped.
    let down = dropped_mesh(&agents[0].metrics().await);
    for _ in 0..50 {
        send_text(&mut publisher, publish(published)).await;
        published += 1;
    }
    let mut counted = false;
    for _ in 0..100 {
        if dropped_mesh(&agents[0].metrics().await) >= down + 50.0 {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counted, "A did not count its messages for the frozen B");
    done_tx.send(published).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("C got everything in time")
            .unwrap(),
        published
    );
    // Every message meant for B or C was either written to its link or
    // counted as dropped: none vanished in a queue.
    let after = agents[0].metrics().await;
    assert_eq!(
        (mesh_sent(&after) - sent_before) + (dropped_mesh(&after) - dropped_before),
        2.0 * published as f64,
        "sent + dropped at A, for {published} publishes to two peers"
    );

    // Stay frozen for 60 s in all, then resume: B relinks and is served.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(frozen_at.elapsed())).await;
    agents[1].signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    while peers_in(&agents[0].metrics().await, "connected") != 2.0
        || peers_in(&agents[1].metrics().await, "connected") != 2.0
    {
        assert!(
            Instant::now() < deadline,
            "B did not relink within 60 s of SIGCONT; A's log:\n{}",
            agents[0].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first publisher has sat silent past the relay's idle timeout (it
    // never reads, so it answers no ping) and A has rightly closed it; a new
    // client publishes.
    drop(publisher);
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    let mut at_c = subscriber(cluster.addr(2), "news").await;
    settle(&mut publisher, &mut [&mut at_b, &mut at_c]).await;
    for n in 0..50 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "back", "n": n}})
                .to_string(),
        )
        .await;
    }
    expect_sequence(&mut at_b, "back", 50).await;
    expect_sequence(&mut at_c, "back", 50).await;
}

fn dropped_mesh(metrics: &str) -> f64 {
    metric_value(
        metrics,
        r#"edgewire_messages_dropped_total{reason="mesh_unavailable",service="chat"}"#,
    )
}

/// Publishes 4 KiB messages on "bulk" at `publisher` (connected to `agent`)
/// as fast as the agent takes them, until the agent counts messages its mesh
/// links could not take (a link queue is full, or the link is down).
async fn fill_links(agent: &AgentProcess, publisher: &mut Client) {
    let pad = "b".repeat(4000);
    for batch in 0..200 {
        for n in 0..250 {
            send_text(
                publisher,
                json!({"type": "publish", "channel": "bulk", "data": {"n": batch * 250 + n, "pad": pad}})
                    .to_string(),
            )
            .await;
        }
        if dropped_mesh(&agent.metrics().await) > 0.0 {
            return;
        }
    }
    panic!("the mesh links never filled; log:\n{}", agent.log());
}

/// Subscribes and unsubscribes clients on "news" at `addr` so that the
/// channel goes from `start_subscribed` through several first-subscriber and
/// last-unsubscriber edges, ending with one subscriber, which is returned.
async fn churn(addr: std::net::SocketAddr, mut present: Option<Client>) -> Client {
    for round in 0..5 {
        if let Some(mut leaving) = present.take() {
            let reply = request(
                &mut leaving,
                json!({"type": "unsubscribe", "channel": "news", "id": round}),
            )
            .await;
            assert_eq!(reply["type"], "unsubscribed");
        }
        let first = subscriber(addr, "news").await;
        let second = subscriber(addr, "news").await;
        drop(first);
        present = Some(second);
        // Let the closed connection's unsubscribe happen before the next edge.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    present.expect("a subscriber is left")
}

/// Subscribers come and go at B and C while every mesh link towards A is
/// full (A stalls for a moment while B and C publish unpaced bursts through
/// it). Interest changes must still reach A: afterwards every subscriber
/// present gets every later publish from A, once, in order.
#[tokio::test]
async fn interest_changes_survive_full_link_queues() {
    let cluster = Cluster::new();
    let agents = cluster.linked(&[0, 1, 2]).await;
    // A subscriber on "bulk" at A, so B and C forward their bursts to A.
    let _bulk_at_a = subscriber(cluster.addr(0), "bulk").await;
    let mut local = subscriber(cluster.addr(0), "news").await;
    let at_c = subscriber(cluster.addr(2), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    let mut bulk_b = connect(cluster.addr(1), "/relay").await;
    let mut bulk_c = connect(cluster.addr(2), "/relay").await;
    let mut at_c = at_c;
    settle(&mut publisher, &mut [&mut local, &mut at_c]).await;
    // A has heard of the bulk subscriber's interest: B and C forward to it.
    for (i, agent) in agents.iter().enumerate().skip(1) {
        let mut heard = false;
        let mut probe = connect(cluster.addr(i), "/relay").await;
        for _ in 0..200 {
            send_text(
                &mut probe,
                json!({"type": "publish", "channel": "bulk", "data": "probe"}).to_string(),
            )
            .await;
            let sent = metric_value(
                &agent.metrics().await,
                r#"edgewire_mesh_messages_total{direction="sent",service="chat"}"#,
            );
            if sent > 0.0 {
                heard = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(heard, "agent {i} never forwarded bulk to A");
    }

    // A stops reading; B's and C's links to A fill up.
    agents[0].signal("STOP");
    fill_links(&agents[1], &mut bulk_b).await;
    fill_links(&agents[2], &mut bulk_c).await;
    // Churn while the links are full: B goes from no subscriber to one, C
    // from one to none and back, several times over.
    let at_b = churn(cluster.addr(1), None).await;
    let at_c = churn(cluster.addr(2), Some(at_c)).await;
    agents[0].signal("CONT");

    let (mut at_b, mut at_c) = (at_b, at_c);
    settle(&mut publisher, &mut [&mut local, &mut at_b, &mut at_c]).await;
    for n in 0..200 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": "after", "n": n}})
                .to_string(),
        )
        .await;
    }
    for sub in [&mut local, &mut at_b, &mut at_c] {
        expect_sequence(sub, "after", 200).await;
        let reply = request(
            sub,
            json!({"type": "unsubscribe", "channel": "quiet", "id": "end"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed", "no duplicates: {reply}");
    }
}

/// A publish whose JSON is mostly escaped quotes (9 MB, under the 16 MiB
/// message limit) crosses the mesh whole: the link carries the relay
/// message as bytes, not as a JSON string that would escape it twice over.
#[tokio::test]
async fn a_quote_heavy_publish_crosses_the_mesh_whole() {
    let cluster = Cluster::new();
    let agents = cluster.linked(&[0, 1]).await;
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut at_b]).await;
    let quotes = "\"".repeat(4_500_000);
    send_text(
        &mut publisher,
        json!({"type": "publish", "channel": "news", "data": quotes}).to_string(),
    )
    .await;
    send_text(
        &mut publisher,
        json!({"type": "publish", "channel": "news", "data": {"tag": "after", "n": 0}}).to_string(),
    )
    .await;
    let got = next_json(&mut at_b).await;
    assert!(
        got["data"].as_str() == Some(quotes.as_str()),
        "the large message arrived changed: {} bytes",
        got["data"].as_str().map_or(0, str::len)
    );
    expect_sequence(&mut at_b, "after", 1).await;
    assert!(
        !agents[0].log().contains("mesh link to peer down"),
        "the link survived: {}",
        agents[0].log()
    );
}

/// A burst written in one go, switching between two channels in runs of
/// several lengths (one longer than a run's cap), crosses the link in
/// batches; at the far node each subscriber gets its channels' messages,
/// all of them, once, in publish order, and a subscriber of both channels
/// gets the burst exactly as published.
#[tokio::test]
async fn a_burst_over_two_channels_reaches_far_subscribers_in_publish_order() {
    let cluster = Cluster::new();
    let agents = cluster.linked(&[0, 1]).await;
    let mut both = subscriber(cluster.addr(1), "bulk").await;
    let reply = request(
        &mut both,
        json!({"type": "subscribe", "channel": "news", "id": "news"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed");
    let mut news = subscriber(cluster.addr(1), "news").await;
    let mut bulk = subscriber(cluster.addr(1), "bulk").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut both, &mut news]).await;
    // The bulk interest has reached A once a bulk probe comes through.
    assert!(
        probe_reaches(&mut publisher, "bulk", &mut bulk).await,
        "bulk probes never reached B"
    );
    drop_late_probes(&mut [&mut both, &mut news, &mut bulk]).await;

    // Runs of 1, 2, 3, ... 12 messages, alternating channels, then 150 on
    // one channel, then 30 alternating one by one.
    let mut burst: Vec<&str> = Vec::new();
    for len in 1..=12 {
        let channel = if len % 2 == 0 { "bulk" } else { "news" };
        burst.extend(std::iter::repeat_n(channel, len));
    }
    burst.extend(std::iter::repeat_n("news", 150));
    burst.extend((0..30).map(|n| if n % 2 == 0 { "bulk" } else { "news" }));
    for (n, channel) in burst.iter().enumerate() {
        let publish = json!({"type": "publish", "channel": channel, "data": n});
        publisher
            .feed(tokio_tungstenite::tungstenite::Message::text(
                publish.to_string(),
            ))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();

    let numbers = |channel: &str| -> Vec<u64> {
        (0..burst.len() as u64)
            .filter(|n| burst[*n as usize] == channel)
            .collect()
    };
    for (sub, want) in [
        (&mut both, (0..burst.len() as u64).collect::<Vec<_>>()),
        (&mut news, numbers("news")),
        (&mut bulk, numbers("bulk")),
    ] {
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(next_json(sub).await["data"].as_u64().unwrap());
        }
        assert_eq!(got, want, "every message of its channels, in publish order");
        let reply = request(
            sub,
            json!({"type": "unsubscribe", "channel": "quiet", "id": "end"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed", "no duplicates: {reply}");
    }
    let received = metric_value(
        &agents[1].metrics().await,
        r#"edgewire_message_latency_seconds_count{path="mesh",service="chat"}"#,
    );
    assert!(
        received >= (2 * burst.len()) as f64,
        "one latency sample per message and subscriber: {received}"
    );
}

/// Reads `news` messages until `count` have come or none for `WAIT`;
/// returns their `n`s in the order they came. With `slowly`, pauses 2 ms
/// after every 20 messages.
fn collect(mut sub: Client, count: usize, slowly: bool) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut seen = Vec::with_capacity(count);
        while seen.len() < count {
            if slowly && seen.len() % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut sub)).await {
                Ok(Some(Ok(msg))) if msg.is_text() => {
                    let v: serde_json::Value =
                        serde_json::from_str(msg.to_text().unwrap()).unwrap();
                    seen.push(v["data"]["n"].as_u64().expect("a numbered message"));
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        seen
    })
}

/// Backpressure: an unpaced publisher at A bursts 20 MB to a subscriber at B
/// while B reads slowly (stopped 600 ms in every 900 ms, and its subscriber
/// reads slowly too), through a link whose queue holds 256 KiB. A reads the
/// publisher only as fast as the link drains, and B reads the link only as
/// fast as its subscriber drains, so
/// nothing is dropped and B's subscriber gets every message in order. At A,
/// a subscriber that never reads still gets the slow-consumer policy
/// (disconnected), and another subscriber there gets everything.
#[tokio::test]
async fn a_slow_peer_paces_the_publisher_and_nothing_is_dropped() {
    const MESSAGES: usize = 20_000;
    let cluster = Cluster::new();
    let members = [0, 1];
    let a = cluster.start_with(
        0,
        &members,
        "good",
        LIMITS,
        &["--mesh-link-queue-bytes", "262144"],
    );
    // B keeps the default send queue (4096 messages), and its subscriber is
    // slower than the link: B's link must wait for the subscriber in turn.
    let b = cluster.start(1, &members, "good");
    for agent in [&a, &b] {
        agent.wait_ready().await;
        wait_peers(agent, 1.0).await;
    }
    let mut at_b = subscriber(cluster.addr(1), "news").await;
    let mut at_a = subscriber(cluster.addr(0), "news").await;
    let mut publisher = connect(cluster.addr(0), "/relay").await;
    settle(&mut publisher, &mut [&mut at_b, &mut at_a]).await;
    let mut stalled = never_reading_subscriber(cluster.addr(0), "news").await;
    // B's subscriber reads more slowly than the link delivers.
    let (at_b, at_a) = (
        collect(at_b, MESSAGES, true),
        collect(at_a, MESSAGES, false),
    );

    let pid = b.pid().to_string();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let slow_reader = tokio::spawn(async move {
        let signal = |sig: &str| {
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill")
        };
        for _ in 0..200 {
            signal("-STOP");
            tokio::time::sleep(Duration::from_millis(600)).await;
            signal("-CONT");
            if tokio::time::timeout(Duration::from_millis(300), &mut done_rx)
                .await
                .is_ok()
            {
                break;
            }
        }
        signal("-CONT");
    });

    let pad = "p".repeat(1000);
    let started = Instant::now();
    for n in 0..MESSAGES {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": {"n": n, "pad": pad}}).to_string(),
        )
        .await;
    }
    let publishing = started.elapsed();
    let at_b = at_b.await.unwrap();
    let _ = done_tx.send(());
    slow_reader.await.unwrap();
    let at_a = at_a.await.unwrap();

    let metrics = a.metrics().await;
    assert_eq!(
        (
            dropped_mesh(&metrics),
            metric_value(
                &metrics,
                r#"edgewire_messages_dropped_total{reason="memory_budget",service="chat"}"#
            )
        ),
        (0.0, 0.0),
        "A dropped messages for B instead of pacing the publisher ({MESSAGES} published in {publishing:?})"
    );
    let want: Vec<u64> = (0..MESSAGES as u64).collect();
    assert!(
        at_b == want,
        "B's subscriber got {} of {MESSAGES}, first gap at {:?}",
        at_b.len(),
        at_b.iter().zip(0..).find(|(got, n)| **got != *n)
    );
    assert!(
        at_a == want,
        "the reading subscriber at A got {} of {MESSAGES}",
        at_a.len()
    );
    // The stalled one was cut as a slow consumer (with 1008 when the close
    // frame still fits through its full socket, else reset); its drops are
    // counted, and A let it go: only the publisher is left connected there.
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, futures_util::StreamExt::next(&mut stalled)).await {
            Err(_) => panic!("the stalled subscriber was never disconnected"),
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => break,
        }
    }
    assert!(
        metric_value(
            &metrics,
            r#"edgewire_messages_dropped_total{reason="slow_consumer",service="chat"}"#
        ) >= 1.0,
        "the stalled subscriber's drops are counted"
    );
    let deadline = Instant::now() + WAIT;
    while metric_value(
        &a.metrics().await,
        r#"edgewire_connections{service="chat"}"#,
    ) != 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the stalled subscriber is still connected at A"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
