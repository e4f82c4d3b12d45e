//! The mesh: WebSocket links between the agents that run the same service,
//! so a channel spans every node of an EdgeService.
//!
//! Each agent dials every peer it shares a service with and sends on that
//! link only (so each ordered pair has one FIFO link); it receives on the
//! links its peers dialed. Links authenticate both ways with the shared
//! secret (`auth`). Peers learn which channels have subscribers here
//! (interest), and a publish is forwarded only to peers with interest, one
//! hop, never again (`routing`). Each link has a bounded queue: a slow or dead
//! peer loses its own messages (counted) and never stalls the others. Dial
//! failures back off exponentially with jitter.

pub mod auth;
pub mod frame;
pub mod routing;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use edgewire_api::PeerSpec;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use self::auth::Role;
use self::frame::{LinkFrame, now_us};
use crate::metrics::{DeliveryPath, DropReason, Metrics};
use crate::service::ServiceRuntime;

/// Frames queued per outbound link before new ones are dropped.
const LINK_QUEUE: usize = 8192;
const PING_EVERY: Duration = Duration::from_secs(5);
/// A link that hears nothing (not even a pong) for this long is redialed.
const DEAD_AFTER: Duration = Duration::from_secs(15);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Mesh frames carry whole relay messages; room for the largest allowed.
const MAX_LINK_FRAME: usize = 17 * 1024 * 1024;

pub struct Mesh {
    node: String,
    secret: Arc<Vec<u8>>,
    metrics: Metrics,
    inner: Mutex<Inner>,
    stop: CancellationToken,
    next_generation: AtomicU64,
}

#[derive(Default)]
struct Inner {
    services: HashMap<String, Weak<ServiceRuntime>>,
    peers_by_service: HashMap<String, Vec<PeerSpec>>,
    links: HashMap<String, Link>,
    /// What each peer has subscribers for, from its inbound link.
    remote_interest: HashMap<String, BTreeSet<(String, String)>>,
    /// The current inbound connection of each peer, so an old one that ends
    /// late does not clear the new one's interest.
    inbound_generation: HashMap<String, u64>,
}

struct Link {
    address: String,
    tx: mpsc::Sender<LinkFrame>,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
}

/// Backoff before redial `attempt` (1-based): doubling from 200 ms to 30 s,
/// scaled by a random factor in [0.5, 1.5) so peers do not redial in step.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = BACKOFF_MIN.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    base.min(BACKOFF_MAX).mul_f64(0.5 + jitter.clamp(0.0, 1.0))
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    f64::from(u16::from_le_bytes(b)) / 65536.0
}

fn link_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(MAX_LINK_FRAME))
        .max_frame_size(Some(MAX_LINK_FRAME))
}

impl Mesh {
    pub fn new(node: String, secret: Vec<u8>, metrics: Metrics) -> Arc<Mesh> {
        Arc::new(Mesh {
            node,
            secret: Arc::new(secret),
            metrics,
            inner: Mutex::new(Inner::default()),
            stop: CancellationToken::new(),
            next_generation: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a local service and the peers that also run it, and brings
    /// the outbound links in line.
    pub fn set_service(
        self: &Arc<Self>,
        name: &str,
        runtime: &Arc<ServiceRuntime>,
        peers: &[PeerSpec],
    ) {
        let mut inner = self.lock();
        inner
            .services
            .insert(name.to_string(), Arc::downgrade(runtime));
        let peers: Vec<PeerSpec> = peers
            .iter()
            .filter(|p| p.node != self.node)
            .cloned()
            .collect();
        inner.peers_by_service.insert(name.to_string(), peers);
        self.reconcile_links(&mut inner);
    }

    pub fn remove_service(self: &Arc<Self>, name: &str) {
        let mut inner = self.lock();
        inner.services.remove(name);
        inner.peers_by_service.remove(name);
        self.reconcile_links(&mut inner);
    }

    fn reconcile_links(self: &Arc<Self>, inner: &mut Inner) {
        let mut wanted: HashMap<String, String> = HashMap::new();
        for peers in inner.peers_by_service.values() {
            for peer in peers {
                wanted
                    .entry(peer.node.clone())
                    .or_insert_with(|| peer.address.clone());
            }
        }
        inner.links.retain(|node, link| {
            let keep = wanted.get(node) == Some(&link.address);
            if !keep {
                link.stop.cancel();
            }
            keep
        });
        for (node, address) in wanted {
            if inner.links.contains_key(&node) {
                continue;
            }
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let connected = Arc::new(AtomicBool::new(false));
            let stop = self.stop.child_token();
            tokio::spawn(Arc::clone(self).dial_loop(
                node.clone(),
                address.clone(),
                rx,
                Arc::clone(&connected),
                stop.clone(),
            ));
            inner.links.insert(
                node,
                Link {
                    address,
                    tx,
                    connected,
                    stop,
                },
            );
        }
        self.update_peer_gauges(inner);
    }

    fn update_peer_gauges(&self, inner: &Inner) {
        for (service, peers) in &inner.peers_by_service {
            let up = peers
                .iter()
                .filter(|p| {
                    inner
                        .links
                        .get(&p.node)
                        .is_some_and(|l| l.connected.load(Ordering::Acquire))
                })
                .count() as i64;
            let total = peers.len() as i64;
            self.metrics
                .mesh_peers
                .with_label_values(&[service, "connected"])
                .set(up);
            self.metrics
                .mesh_peers
                .with_label_values(&[service, "connecting"])
                .set(total - up);
        }
    }

    /// Tells the peers of `service` that this agent now has (or no longer
    /// has) subscribers on `channel`.
    pub fn interest(&self, service: &str, channel: &str, on: bool) {
        let frame = if on {
            LinkFrame::Subscribe {
                service: service.into(),
                channel: channel.into(),
            }
        } else {
            LinkFrame::Unsubscribe {
                service: service.into(),
                channel: channel.into(),
            }
        };
        let inner = self.lock();
        for peer in inner.peers_by_service.get(service).into_iter().flatten() {
            if let Some(link) = inner.links.get(&peer.node)
                && link.connected.load(Ordering::Acquire)
            {
                // A full queue loses this update; the snapshot on the next
                // reconnect repairs it, and a dead link is redialed.
                let _ = link.tx.try_send(frame.clone());
            }
        }
    }

    /// Sends a local publish to every peer with subscribers on the channel.
    pub fn forward(&self, service: &str, channel: &str, message: &Utf8Bytes) {
        let inner = self.lock();
        let Some(peers) = inner.peers_by_service.get(service) else {
            return;
        };
        let names: Vec<String> = peers.iter().map(|p| p.node.clone()).collect();
        let targets = routing::targets(true, service, channel, &names, &inner.remote_interest);
        if targets.is_empty() {
            return;
        }
        let frame = LinkFrame::Message {
            service: service.into(),
            channel: channel.into(),
            message: message.to_string(),
            sent_us: now_us(),
        };
        for node in targets {
            let sent = inner
                .links
                .get(node)
                .filter(|l| l.connected.load(Ordering::Acquire))
                .is_some_and(|l| l.tx.try_send(frame.clone()).is_ok());
            if sent {
                self.metrics
                    .mesh_messages
                    .with_label_values(&[service, "sent"])
                    .inc();
            } else {
                self.metrics.dropped(service, DropReason::MeshUnavailable);
            }
        }
    }

    /// Stops every link and the listener.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Accepts peers' links on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = self.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        tracing::warn!(%err, "mesh accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(Arc::clone(&self).inbound(tcp, peer));
        }
    }

    /// One peer's link to us: authenticate, then take its interest and messages.
    async fn inbound(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let ws = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::accept_async_with_config(tcp, Some(link_config())),
        )
        .await
        {
            Ok(Ok(ws)) => ws,
            _ => return,
        };
        let (mut sink, mut stream) = ws.split();
        let challenge = auth::nonce();
        if sink
            .send(Message::text(
                LinkFrame::Challenge {
                    nonce: challenge.clone(),
                }
                .to_json(),
            ))
            .await
            .is_err()
        {
            return;
        }
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream)).await;
        let (node, their_nonce) = match hello {
            Ok(Some(LinkFrame::Hello { node, proof, nonce }))
                if auth::verify(&self.secret, Role::Dialer, &challenge, &node, &proof) =>
            {
                (node, nonce)
            }
            _ => {
                tracing::warn!(%peer, "mesh link refused: authentication failed");
                let close = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "mesh authentication failed".into(),
                };
                let _ = sink.send(Message::Close(Some(close))).await;
                return;
            }
        };
        let welcome = LinkFrame::Welcome {
            node: self.node.clone(),
            proof: auth::prove(&self.secret, Role::Acceptor, &their_nonce, &self.node),
        };
        if sink.send(Message::text(welcome.to_json())).await.is_err() {
            return;
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        {
            let mut inner = self.lock();
            inner.inbound_generation.insert(node.clone(), generation);
            inner.remote_interest.insert(node.clone(), BTreeSet::new());
        }
        tracing::info!(peer = %node, "mesh link from peer up");

        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => break,
                next = tokio::time::timeout(DEAD_AFTER, stream.next()) => next,
            };
            let text = match next {
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
                Ok(Some(Ok(_))) => continue,
            };
            match serde_json::from_str::<LinkFrame>(text.as_str()) {
                Ok(frame) => self.on_frame(&node, frame),
                Err(err) => tracing::warn!(peer = %node, %err, "bad mesh frame"),
            }
        }
        // The dialer's ping answers need a flush; a closed link needs none.
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        let mut inner = self.lock();
        if inner.inbound_generation.get(&node) == Some(&generation) {
            inner.inbound_generation.remove(&node);
            inner.remote_interest.remove(&node);
        }
        tracing::info!(peer = %node, "mesh link from peer down");
    }

    fn on_frame(&self, node: &str, frame: LinkFrame) {
        match frame {
            LinkFrame::Interest { service, channels } => {
                let mut inner = self.lock();
                let set = inner.remote_interest.entry(node.to_string()).or_default();
                set.retain(|(s, _)| *s != service);
                set.extend(channels.into_iter().map(|c| (service.clone(), c)));
            }
            LinkFrame::Subscribe { service, channel } => {
                self.lock()
                    .remote_interest
                    .entry(node.to_string())
                    .or_default()
                    .insert((service, channel));
            }
            LinkFrame::Unsubscribe { service, channel } => {
                if let Some(set) = self.lock().remote_interest.get_mut(node) {
                    set.remove(&(service, channel));
                }
            }
            LinkFrame::Message {
                service,
                channel,
                message,
                sent_us,
            } => {
                let runtime = self.lock().services.get(&service).and_then(Weak::upgrade);
                let Some(runtime) = runtime else { return };
                self.metrics
                    .mesh_messages
                    .with_label_values(&[&service, "received"])
                    .inc();
                let age = Duration::from_micros(now_us().saturating_sub(sent_us));
                let published_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                runtime.deliver(
                    &channel,
                    &Utf8Bytes::from(message),
                    published_at,
                    DeliveryPath::Mesh,
                );
            }
            LinkFrame::Challenge { .. } | LinkFrame::Hello { .. } | LinkFrame::Welcome { .. } => {}
        }
    }

    fn set_connected(&self, node: &str, connected: &AtomicBool, up: bool) {
        connected.store(up, Ordering::Release);
        let inner = self.lock();
        self.update_peer_gauges(&inner);
        drop(inner);
        if up {
            tracing::info!(peer = %node, "mesh link to peer up");
        }
    }

    /// The interest snapshot for a peer: our active channels of each service
    /// we share with it.
    fn snapshot_for(&self, node: &str) -> Vec<LinkFrame> {
        let inner = self.lock();
        inner
            .peers_by_service
            .iter()
            .filter(|(_, peers)| peers.iter().any(|p| p.node == node))
            .filter_map(|(service, _)| {
                let runtime = inner.services.get(service)?.upgrade()?;
                Some(LinkFrame::Interest {
                    service: service.clone(),
                    channels: runtime.hub.active_channels(),
                })
            })
            .collect()
    }

    /// Keeps the outbound link to `node` up until `stop`.
    async fn dial_loop(
        self: Arc<Self>,
        node: String,
        address: String,
        mut rx: mpsc::Receiver<LinkFrame>,
        connected: Arc<AtomicBool>,
        stop: CancellationToken,
    ) {
        let mut attempt = 0u32;
        loop {
            if stop.is_cancelled() {
                break;
            }
            match self.dial(&node, &address).await {
                Ok((sink, stream)) => {
                    attempt = 0;
                    // Frames queued for the previous connection are stale: the
                    // snapshot below replaces the interest ones, and messages
                    // queued while down were not promised.
                    while rx.try_recv().is_ok() {}
                    self.set_connected(&node, &connected, true);
                    self.run_link(&node, sink, stream, &mut rx, &stop).await;
                    self.set_connected(&node, &connected, false);
                    tracing::info!(peer = %node, "mesh link to peer down");
                }
                Err(err) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(peer = %node, %address, %err, attempt, "mesh dial failed");
                    }
                }
            }
            let wait = backoff(attempt.max(1), jitter());
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        connected.store(false, Ordering::Release);
    }

    async fn dial(&self, node: &str, address: &str) -> Result<(LinkSink, LinkStream), String> {
        let url = format!("ws://{address}/mesh");
        let connect = tokio_tungstenite::connect_async_with_config(&url, Some(link_config()), true);
        let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (mut sink, mut stream) = ws.split();
        let Ok(Some(LinkFrame::Challenge { nonce })) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream)).await
        else {
            return Err("no challenge from the peer".into());
        };
        let ours = auth::nonce();
        let hello = LinkFrame::Hello {
            node: self.node.clone(),
            proof: auth::prove(&self.secret, Role::Dialer, &nonce, &self.node),
            nonce: ours.clone(),
        };
        sink.send(Message::text(hello.to_json()))
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream)).await {
            Ok(Some(LinkFrame::Welcome {
                node: theirs,
                proof,
            })) if theirs == node
                && auth::verify(&self.secret, Role::Acceptor, &ours, &theirs, &proof) =>
            {
                Ok((sink, stream))
            }
            Ok(Some(LinkFrame::Welcome { node: theirs, .. })) if theirs != node => {
                Err(format!("the peer at {address} is {theirs:?}, not {node:?}"))
            }
            _ => Err(
                "the peer refused or failed authentication (is the mesh secret the same?)".into(),
            ),
        }
    }

    async fn run_link(
        &self,
        node: &str,
        mut sink: LinkSink,
        mut stream: LinkStream,
        rx: &mut mpsc::Receiver<LinkFrame>,
        stop: &CancellationToken,
    ) {
        for frame in self.snapshot_for(node) {
            if sink.send(Message::text(frame.to_json())).await.is_err() {
                return;
            }
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
                // Keepalives first: a backlog of data never delays them.
                _ = ping.tick() => {
                    if heard.elapsed() > DEAD_AFTER {
                        tracing::warn!(peer = %node, "mesh peer silent; redialing");
                        return;
                    }
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                read = stream.next() => match read {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => heard = Instant::now(),
                },
                frame = rx.recv() => {
                    let Some(frame) = frame else { return };
                    if sink.feed(Message::text(frame.to_json())).await.is_err() {
                        return;
                    }
                    // Batch what is already queued into one flush.
                    let mut batch = 0;
                    while batch < 256 {
                        let Ok(more) = rx.try_recv() else { break };
                        if sink.feed(Message::text(more.to_json())).await.is_err() {
                            return;
                        }
                        batch += 1;
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

type LinkWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;
type LinkSink = futures_util::stream::SplitSink<LinkWs, Message>;
type LinkStream = futures_util::stream::SplitStream<LinkWs>;

async fn read_frame<S>(stream: &mut S) -> Option<LinkFrame>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await? {
            Ok(Message::Text(text)) => return serde_json::from_str(text.as_str()).ok(),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(1, 0.5), Duration::from_millis(200));
        assert_eq!(backoff(2, 0.5), Duration::from_millis(400));
        assert_eq!(backoff(20, 0.5), BACKOFF_MAX);
        assert_eq!(backoff(1, 0.0), Duration::from_millis(100));
        assert!(backoff(1, 0.999) < Duration::from_millis(300));
    }
}
