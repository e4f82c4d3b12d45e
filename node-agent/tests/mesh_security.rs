//! The mesh against an attacker on the network or with one node's
//! credentials: real agent processes on loopback, a TCP relay the test runs
//! between them, and hostile clients of the mesh port.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edgewire_agent::mesh::noise::{
    HandshakeError, Identity, SecureSink, StaticKey, initiate, parse_public,
};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

/// Agents on 127.0.0.(40+i), each with two services whose peers the test
/// chooses, and a mesh key of its own.
struct Nodes {
    chat_port: u16,
    side_port: u16,
    mesh_port: u16,
    dir: tempfile::TempDir,
}

/// Who a node links with for one service: (peer index, address override).
type Peers<'a> = &'a [(usize, Option<SocketAddr>)];

impl Nodes {
    fn new() -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        Nodes {
            chat_port: free_port(),
            side_port: free_port(),
            mesh_port: free_port(),
            dir,
        }
    }

    fn ip(i: usize) -> String {
        format!("127.0.0.{}", 40 + i)
    }

    fn mesh(&self, i: usize) -> SocketAddr {
        format!("{}:{}", Nodes::ip(i), self.mesh_port)
            .parse()
            .unwrap()
    }

    fn chat(&self, i: usize) -> SocketAddr {
        format!("{}:{}", Nodes::ip(i), self.chat_port)
            .parse()
            .unwrap()
    }

    fn side(&self, i: usize) -> SocketAddr {
        format!("{}:{}", Nodes::ip(i), self.side_port)
            .parse()
            .unwrap()
    }

    /// Node `i`'s mesh private key, made on first use.
    fn key_file(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("n{i}.key"))
    }

    fn peer_lines(&self, peers: Peers) -> String {
        if peers.is_empty() {
            return "    peers: []\n".into();
        }
        let mut out = "    peers:\n".to_string();
        for (p, via) in peers {
            let address = via.unwrap_or_else(|| self.mesh(*p));
            let key = mesh_public_key(&self.key_file(*p));
            out.push_str(&format!(
                "      - {{node: n{p}, address: \"{address}\", publicKey: {key}}}\n"
            ));
        }
        out
    }

    /// Starts node `me` running `chat` with `chat_peers` and, when given,
    /// `side` with `side_peers`.
    fn start(&self, me: usize, chat_peers: Peers, side_peers: Option<Peers>) -> AgentProcess {
        let mut config = format!(
            "services:\n  - name: chat\n    port: {}\n    channels: [{{name: news}}]\n{}",
            self.chat_port,
            self.peer_lines(chat_peers)
        );
        if let Some(side_peers) = side_peers {
            config.push_str(&format!(
                "  - name: side\n    port: {}\n    channels: [{{name: news}}]\n{}",
                self.side_port,
                self.peer_lines(side_peers)
            ));
        }
        let node = format!("n{me}");
        let mesh = self.mesh(me).to_string();
        let key = self.key_file(me);
        AgentProcess::spawn_on(
            &Nodes::ip(me),
            Some(&config),
            &[
                "--node-name",
                &node,
                "--mesh-address",
                &mesh,
                "--mesh-key-file",
                key.to_str().unwrap(),
            ],
        )
    }
}

async fn subscriber(addr: SocketAddr) -> Client {
    let mut ws = connect(addr, "/relay").await;
    let reply = request(&mut ws, json!({"type": "subscribe", "channel": "news"})).await;
    assert_eq!(reply["type"], "subscribed");
    ws
}

async fn wait_connected(agent: &AgentProcess, service: &str, peers: f64) {
    let series = format!(r#"edgewire_mesh_peers{{service="{service}",state="connected"}}"#);
    let deadline = Instant::now() + WAIT;
    loop {
        if metric_value(&agent.metrics().await, &series) == peers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service}: never {peers} peers connected; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the subscriber hears anything within `within`.
async fn hears(sub: &mut Client, within: Duration) -> Option<serde_json::Value> {
    tokio::time::timeout(within, next_json(sub)).await.ok()
}

/// What a TCP relay between a dialer and a listener saw, both directions.
#[derive(Default)]
struct Capture {
    bytes: Mutex<Vec<u8>>,
    /// What each dialer sent, one entry per connection.
    dialers: Mutex<Vec<Vec<u8>>>,
    from_dialer: AtomicUsize,
    from_listener: AtomicUsize,
}

/// A TCP relay the test runs on its own loopback address; stopped when
/// dropped.
struct Relay {
    via: SocketAddr,
    capture: Arc<Capture>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr, inject: Option<Vec<u8>>) -> Relay {
        let listener = TcpListener::bind(format!("{}:0", Nodes::ip(9)))
            .await
            .unwrap();
        let via = listener.local_addr().unwrap();
        let capture = Arc::new(Capture::default());
        let task = tokio::spawn(relay(listener, to, Arc::clone(&capture), inject));
        Relay { via, capture, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts on `listener` and relays each connection to `to`, recording every
/// byte. When `inject` is set and the dialer hangs up, the relay keeps the
/// listener's side open and writes `inject` to it instead.
async fn relay(
    listener: TcpListener,
    to: SocketAddr,
    capture: Arc<Capture>,
    inject: Option<Vec<u8>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let capture = Arc::clone(&capture);
        let inject = inject.clone();
        tokio::spawn(async move {
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await
            else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = {
                let capture = Arc::clone(&capture);
                async move {
                    let index = {
                        let mut dialers = capture.dialers.lock().await;
                        dialers.push(Vec::new());
                        dialers.len() - 1
                    };
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(60), cr.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        capture.bytes.lock().await.extend_from_slice(&buf[..n]);
                        capture.dialers.lock().await[index].extend_from_slice(&buf[..n]);
                        capture.from_dialer.fetch_add(n, Ordering::Relaxed);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    if let Some(frame) = inject {
                        let _ = sw.write_all(&frame).await;
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                }
            };
            let down = async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(60), sr.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    capture.bytes.lock().await.extend_from_slice(&buf[..n]);
                    capture.from_listener.fetch_add(n, Ordering::Relaxed);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            // The dialer's side decides when the connection ends.
            tokio::join!(up, async {
                let _ = tokio::time::timeout(Duration::from_secs(60), down).await;
            });
        });
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The payloads of the WebSocket frames a dialer sent on one connection
/// (after its upgrade request), unmasked: what anyone on the path can read,
/// since a client's frame mask is sent with the frame.
fn client_payloads(bytes: &[u8]) -> Vec<u8> {
    let Some(start) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut rest = &bytes[start + 4..];
    let mut out = Vec::new();
    while rest.len() >= 2 {
        let (len, mut at) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => (
                usize::try_from(u64::from_be_bytes(rest[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        let mut mask = [0u8; 4];
        if rest[1] & 0x80 != 0 {
            if rest.len() < at + 4 {
                break;
            }
            mask.copy_from_slice(&rest[at..at + 4]);
            at += 4;
        }
        if rest.len() < at + len {
            break;
        }
        out.extend(
            rest[at..at + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4]),
        );
        rest = &rest[at + len..];
    }
    out
}

/// A publish of `data` on channel `news` of `service`, in the mesh's
/// publish encoding.
fn publish(service: &str, data: &str) -> bytes::Bytes {
    let message = json!({"type": "message", "channel": "news", "data": data}).to_string();
    edgewire_agent::mesh::frame::Publish::encode(
        service,
        "news",
        edgewire_agent::mesh::frame::now_us(),
        message.as_bytes(),
    )
    .unwrap()
}

/// A publish of `data` on channel `news` of `service`, as one masked WebSocket
/// binary frame from a dialer, in the mesh's publish encoding.
fn publish_frame(service: &str, data: &str) -> Vec<u8> {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut frame = Frame::message(publish(service, data), OpCode::Data(Data::Binary), true);
    frame.header_mut().mask = Some([7, 1, 9, 3]);
    let mut out = Vec::new();
    frame.format(&mut out).unwrap();
    out
}

#[tokio::test]
async fn bytes_between_two_agents_carry_no_plaintext() {
    let nodes = Nodes::new();
    // n0 reaches n1 through the recording relay.
    let relay = Relay::start(nodes.mesh(1), None).await;
    let a = nodes.start(0, &[(1, Some(relay.via))], None);
    let b = nodes.start(1, &[(0, None)], None);
    a.wait_ready().await;
    b.wait_ready().await;
    wait_connected(&a, "chat", 1.0).await;
    wait_connected(&b, "chat", 1.0).await;

    let marker = "plaintext-marker-5c1e0b7d";
    let mut sub = subscriber(nodes.chat(1)).await;
    let mut publisher = connect(nodes.chat(0), "/relay").await;
    let mut heard = false;
    for round in 0..100 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "news", "data": format!("{marker} {round}")})
                .to_string(),
        )
        .await;
        if let Some(msg) = hears(&mut sub, Duration::from_millis(200)).await {
            assert!(msg["data"].as_str().unwrap().starts_with(marker), "{msg}");
            heard = true;
            break;
        }
    }
    assert!(
        heard,
        "no publish crossed the relayed link; log:\n{}",
        a.log()
    );
    assert!(relay.capture.from_dialer.load(Ordering::Relaxed) > 0);
    assert!(relay.capture.from_listener.load(Ordering::Relaxed) > 0);
    let mut bytes = relay.capture.bytes.lock().await.clone();
    for dialer in relay.capture.dialers.lock().await.iter() {
        bytes.extend(client_payloads(dialer));
    }
    for plain in [marker, "\"news\"", "\"type\":\"message\""] {
        assert!(
            !contains(&bytes, plain.as_bytes()),
            "{plain:?} crossed the mesh in plaintext ({} bytes captured)",
            bytes.len()
        );
    }
}

#[tokio::test]
async fn a_handshake_relayed_to_another_node_is_refused() {
    let nodes = Nodes::new();
    // n0 believes it dials n1; the relay hands its handshake to n2, which
    // trusts n0, and once n0 hangs up it sends n2 a publish of its own on
    // the connection n0 authenticated.
    let relay = Relay::start(
        nodes.mesh(2),
        Some(publish_frame(
            "chat",
            "injected through a relayed handshake",
        )),
    )
    .await;
    let n2 = nodes.start(2, &[(0, None)], None);
    n2.wait_ready().await;
    let mut sub = subscriber(nodes.chat(2)).await;
    let n0 = nodes.start(0, &[(1, Some(relay.via))], None);
    n0.wait_ready().await;

    // The relay gets to pass several handshakes (n0 redials).
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        if let Some(msg) = hears(&mut sub, Duration::from_millis(200)).await {
            panic!(
                "n2 took a publish from a handshake meant for n1: {msg}; n2 log:\n{}",
                n2.log()
            );
        }
    }
    assert!(
        relay.capture.from_dialer.load(Ordering::Relaxed) > 0
            && relay.capture.from_listener.load(Ordering::Relaxed) > 0,
        "the relay never carried a handshake"
    );
    assert!(
        !n2.log().contains("mesh link from peer up"),
        "n2 accepted the relayed handshake:\n{}",
        n2.log()
    );
    assert!(
        n0.log().contains("does not hold \"n1\"'s key"),
        "n0 saw through the relay:\n{}",
        n0.log()
    );
}

type LinkSink = SecureSink<SplitSink<Client, Message>>;

/// Links to node `to` at `target` with node `me`'s key (as if stolen off its
/// disk), the way an agent does, naming itself `claim`.
async fn link_as(
    target: SocketAddr,
    to: usize,
    me: usize,
    claim: &str,
    nodes: &Nodes,
) -> Result<LinkSink, HandshakeError> {
    let key = StaticKey::load_or_create(&nodes.key_file(me)).unwrap();
    let identity = Identity::new(claim.to_string(), key, None);
    let peer_key = parse_public(&mesh_public_key(&nodes.key_file(to))).unwrap();
    let (sink, stream) = connect(target, "/mesh").await.split();
    let (sink, stream) = tokio::time::timeout(
        WAIT,
        initiate(
            sink,
            stream,
            &identity,
            &format!("n{to}"),
            &peer_key,
            1 << 20,
        ),
    )
    .await
    .expect("a handshake in time")?;
    // The agent reads nothing it needs from this side; keep it open.
    tokio::spawn(async move {
        let mut stream = stream;
        while let Some(Ok(_)) = stream.next().await {}
    });
    Ok(sink)
}

async fn send_publish(link: &mut LinkSink, service: &str, data: &str) {
    link.send(Message::Binary(publish(service, data)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_node_not_placed_on_a_service_cannot_inject_into_it() {
    let nodes = Nodes::new();
    // n1 runs chat with n0, and side with n2: n2 may link with n1, for side.
    let n1 = nodes.start(1, &[(0, None)], Some(&[(2, None)]));
    n1.wait_ready().await;
    let mut chat_sub = subscriber(nodes.chat(1)).await;
    let mut side_sub = subscriber(nodes.side(1)).await;

    // With n2's key, n2 cannot pass for n0 (which is placed on chat).
    let posing = link_as(nodes.mesh(1), 1, 2, "n0", &nodes).await;
    assert!(posing.is_err(), "n1 took n2's key for n0's");
    let deadline = Instant::now() + WAIT;
    while !n1
        .log()
        .contains("\"n0\" is not a peer here with the key it showed")
    {
        assert!(
            Instant::now() < deadline,
            "refusal not logged:\n{}",
            n1.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut link = link_as(nodes.mesh(1), 1, 2, "n2", &nodes)
        .await
        .expect("n1 takes n2's key for n2");
    send_publish(&mut link, "chat", "injected by n2").await;
    send_publish(&mut link, "side", "from n2, where it is placed").await;

    let side = hears(&mut side_sub, WAIT).await;
    assert_eq!(
        side.as_ref().map(|m| m["data"].clone()),
        Some(json!("from n2, where it is placed")),
        "n2's publish on its own service never arrived; log:\n{}",
        n1.log()
    );
    if let Some(msg) = hears(&mut chat_sub, Duration::from_secs(1)).await {
        panic!("n2 injected into chat, where it is not placed: {msg}");
    }
    let refused = metric_value(
        &n1.metrics().await,
        r#"edgewire_mesh_refused_total{reason="not_placed"}"#,
    );
    assert_eq!(refused, 1.0, "the refusal is counted");
    assert!(n1.log().contains("not placed"), "and logged:\n{}", n1.log());
}

#[tokio::test]
async fn a_thousand_unauthenticated_connections_do_not_stop_two_agents_linking() {
    const FLOOD: usize = 1000;
    let nodes = Nodes::new();
    let b = nodes.start(1, &[(0, None)], None);
    b.wait_ready().await;
    let (rss_before, _) = b.rss();

    // Each flood connection completes the WebSocket upgrade, then starts a
    // 1 MiB frame, sends a quarter of it and stalls.
    let target = nodes.mesh(1);
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let opened = Arc::clone(&opened);
        flood.push(tokio::spawn(async move {
            let source: SocketAddr = format!("127.0.1.{}:0", 1 + i % 200).parse().unwrap();
            let socket = tokio::net::TcpSocket::new_v4().ok()?;
            socket.bind(source).ok()?;
            let tcp = tokio::time::timeout(WAIT, socket.connect(target))
                .await
                .ok()?
                .ok()?;
            opened.fetch_add(1, Ordering::Relaxed);
            let url = format!("ws://{target}/mesh");
            let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tcp))
                .await
                .ok()?
                .ok()?;
            let len: u64 = 1024 * 1024;
            let mut head = vec![0x82u8, 0x80 | 127];
            head.extend_from_slice(&len.to_be_bytes());
            head.extend_from_slice(&[1, 2, 3, 4]);
            let stream = ws.get_mut();
            stream.write_all(&head).await.ok()?;
            let chunk = vec![0x5au8; 16 * 1024];
            for _ in 0..16 {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // Held open until the test ends.
            tokio::time::sleep(Duration::from_secs(60)).await;
            Some(ws)
        }));
    }
    let deadline = Instant::now() + WAIT;
    while opened.load(Ordering::Relaxed) < FLOOD && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(opened.load(Ordering::Relaxed), FLOOD, "the flood connected");

    // With the flood held, a real peer links and a publish crosses.
    let a = nodes.start(0, &[(1, None)], None);
    a.wait_ready().await;
    wait_connected(&a, "chat", 1.0).await;
    wait_connected(&b, "chat", 1.0).await;
    let (_s, _p, got) = first_across_mesh(nodes.chat(0), nodes.chat(1), "news").await;
    assert!(got.is_some(), "nothing crossed the mesh during the flood");
    let metrics = b.metrics().await;
    let refused: f64 = ["handshake_busy", "handshake_failed", "handshake_timeout"]
        .iter()
        .map(|r| {
            metric_value(
                &metrics,
                &format!(r#"edgewire_mesh_refused_total{{reason="{r}"}}"#),
            )
        })
        .sum();
    assert!(
        refused >= 1.0,
        "the flood was refused and counted:\n{metrics}"
    );
    let (_, peak) = b.rss();
    assert!(
        peak < rss_before + 64 * 1024 * 1024,
        "unauthenticated connections cost the agent {} MiB",
        (peak - rss_before) / (1024 * 1024)
    );
    for task in flood {
        task.abort();
    }
}
