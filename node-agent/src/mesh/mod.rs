//! The mesh: WebSocket links between the agents that run the same service,
//! so a channel spans every node of an EdgeService.
//!
//! Each agent dials every peer it shares a service with and sends on that
//! link only (so each ordered pair has one FIFO link); it receives on the
//! links its peers dialed. Links are encrypted and authenticated both ways
//! with Noise (`noise`): each side proves it holds the key of the node it
//! claims to be, and a peer delivers only for services placed on both
//! nodes. Before authentication a link gets a few KiB per frame, a deadline
//! and one of a bounded number of handshake slots. Peers learn which channels have subscribers here
//! (interest), and a publish is forwarded only to peers with interest, one
//! hop, never again (`routing`). Interest belongs to the peer, not to one
//! connection: it outlives a dropped link until the peer's next snapshot.
//! Each link has a bounded queue for data and its own lane for interest
//! (`outbox`): a link that is behind paces the publishers that feed it (they
//! are read no faster than it drains), a peer's link to us is read no faster
//! than the subscribers it fills drain, a dead peer loses its own messages
//! (counted) and stalls no one for long, and data never crowds out interest.
//! Every write has a deadline and the link's reader judges silence on its
//! own, so a peer that stops reading is noticed and redialed. Dial failures back off
//! exponentially with jitter.

pub mod deadline;
pub mod frame;
mod inbound_run;
pub mod noise;
pub mod outbox;
pub mod routing;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use edgewire_api::PeerSpec;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use self::deadline::Deadline;
use self::frame::{LinkFrame, Publish, now_us};
use self::inbound_run::InboundRun;
use self::noise::{HandshakeError, Identity, KEY_LEN, SecureSink, SecureStream};
use self::outbox::{Outbox, Queued, Refused};
use crate::budget::Budget;
use crate::metrics::{DropReason, MeshRefusal, Metrics};
use crate::relay::Subscriber;
use crate::service::ServiceRuntime;

const PING_EVERY: Duration = Duration::from_secs(5);
/// A link that hears nothing (not even a pong) for this long is redialed.
const DEAD_AFTER: Duration = Duration::from_secs(15);
/// A link whose peer takes no bytes of one write (or flush) for this long is
/// redialed: a stopped or black-holed peer must not wedge it for as long as
/// TCP takes to give up.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Publishes written per flush: bounded in count and in bytes, so pings go
/// out between batches even on a slow path.
const BATCH_FRAMES: usize = 256;
const BATCH_BYTES: usize = 1024 * 1024;
/// The whole of a link's setup (WebSocket upgrade and Noise handshake) has
/// this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound links still in their handshake at once; more are closed at
/// accept, so a flood of idle connections costs a bounded amount and the
/// slots free up within the handshake deadline.
const MAX_HANDSHAKES: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Mesh frames carry whole relay messages; room for the largest allowed.
const MAX_LINK_FRAME: usize = 17 * 1024 * 1024;

pub struct Mesh {
    node: String,
    identity: Identity,
    handshakes: Arc<tokio::sync::Semaphore>,
    metrics: Metrics,
    /// Bytes each outbound link may have queued.
    link_queue_bytes: usize,
    /// The agent's budget for everything queued.
    queue_budget: Arc<Budget>,
    inner: Mutex<Inner>,
    stop: CancellationToken,
    next_generation: AtomicU64,
}

#[derive(Default)]
struct Inner {
    services: HashMap<String, Weak<ServiceRuntime>>,
    // The maps a publish looks up hash with foldhash (see Cargo.toml).
    peers_by_service: foldhash::HashMap<String, Vec<PeerSpec>>,
    /// Each service's name as its queued publishes share it (one
    /// allocation per service, not per publish).
    service_names: foldhash::HashMap<String, Arc<str>>,
    links: foldhash::HashMap<String, Link>,
    /// What each peer has subscribers for. Kept when the peer's link to us
    /// drops (the peer still has them, and our link to it may be healthy);
    /// replaced by its snapshot when it links again; removed when it is no
    /// longer a peer.
    remote_interest: foldhash::HashMap<String, routing::PeerInterest>,
    /// The current inbound connection of each peer: only it may change the
    /// peer's interest, and a newer one stops an older one.
    inbound: HashMap<String, (u64, CancellationToken)>,
}

struct Link {
    address: String,
    key: [u8; KEY_LEN],
    outbox: Arc<Outbox>,
    stop: CancellationToken,
    /// Cuts the redial backoff short: the peer just linked to us, so it is
    /// up again.
    redial: Arc<Notify>,
}

/// Why a link ended, for the log.
type LinkEnd = &'static str;

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

/// Every WebSocket message of a link is one Noise message of a few KiB;
/// link frames larger than that travel in several (see `noise`).
fn link_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(noise::MAX_WIRE_MESSAGE))
        .max_frame_size(Some(noise::MAX_WIRE_MESSAGE))
}

/// The key `node` must show to link with us for `service`, from its spec.
fn peer_key(peer: &PeerSpec) -> Option<[u8; KEY_LEN]> {
    peer.public_key.as_deref().and_then(noise::parse_public)
}

/// Runs one write on a link within [`WRITE_DEADLINE`] of its start
/// (`deadline` is the link's writer's, one timer for all its writes).
async fn within<F>(deadline: &mut Deadline, write: F) -> Result<(), LinkEnd>
where
    F: std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
{
    match deadline.within(write).await {
        Some(Ok(())) => Ok(()),
        Some(Err(_)) => Err("write failed"),
        None => Err("the peer took no bytes within the write deadline"),
    }
}

impl Mesh {
    pub fn new(
        identity: Identity,
        metrics: Metrics,
        link_queue_bytes: usize,
        queue_budget: Arc<Budget>,
    ) -> Arc<Mesh> {
        Arc::new(Mesh {
            node: identity.node.clone(),
            identity,
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            metrics,
            link_queue_bytes,
            queue_budget,
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
        let weak = Arc::downgrade(runtime);
        // A restarted service starts with no subscribers: its peers learn
        // that from a fresh snapshot.
        let replaced = inner
            .services
            .insert(name.to_string(), weak.clone())
            .is_some_and(|old| !Weak::ptr_eq(&old, &weak));
        let peers: Vec<PeerSpec> = peers
            .iter()
            .filter(|p| p.node != self.node)
            .filter(|p| {
                // Without its key a peer cannot be authenticated: no link.
                let known = peer_key(p).is_some();
                if !known {
                    tracing::warn!(service = name, peer = %p.node, "mesh peer without a valid public key; not linking");
                }
                known
            })
            .cloned()
            .collect();
        inner.peers_by_service.insert(name.to_string(), peers);
        inner
            .service_names
            .entry(name.to_string())
            .or_insert_with(|| Arc::from(name));
        self.reconcile_links(&mut inner);
        if replaced {
            inner.resync(name);
        }
    }

    pub fn remove_service(self: &Arc<Self>, name: &str) {
        let mut inner = self.lock();
        // Peers that stay linked for other services hear that this one has
        // no subscribers here any more.
        inner.resync(name);
        inner.services.remove(name);
        inner.peers_by_service.remove(name);
        inner.service_names.remove(name);
        self.reconcile_links(&mut inner);
    }

    fn reconcile_links(self: &Arc<Self>, inner: &mut Inner) {
        let mut wanted: HashMap<String, (String, [u8; KEY_LEN])> = HashMap::new();
        for peers in inner.peers_by_service.values() {
            for peer in peers {
                if let Some(key) = peer_key(peer) {
                    wanted
                        .entry(peer.node.clone())
                        .or_insert_with(|| (peer.address.clone(), key));
                }
            }
        }
        inner.links.retain(|node, link| {
            // A new key (the peer's node was rebuilt) means a new link too.
            let keep = wanted.get(node) == Some(&(link.address.clone(), link.key));
            if !keep {
                link.stop.cancel();
            }
            keep
        });
        inner
            .remote_interest
            .retain(|node, _| wanted.contains_key(node));
        // A node that is no longer a peer keeps no link into us either.
        inner.inbound.retain(|node, (_, link)| {
            let keep = wanted.contains_key(node);
            if !keep {
                link.cancel();
            }
            keep
        });
        for (node, (address, key)) in wanted {
            if inner.links.contains_key(&node) {
                continue;
            }
            let outbox = Arc::new(Outbox::new(self.link_queue_bytes, &self.queue_budget));
            let stop = self.stop.child_token();
            let redial = Arc::new(Notify::new());
            tokio::spawn(Arc::clone(self).dial_loop(
                node.clone(),
                address.clone(),
                key,
                Arc::clone(&outbox),
                (stop.clone(), Arc::clone(&redial)),
            ));
            inner.links.insert(
                node,
                Link {
                    address,
                    key,
                    outbox,
                    stop,
                    redial,
                },
            );
        }
        self.update_peer_gauges(inner);
    }

    fn update_peer_gauges(&self, inner: &Inner) {
        for (service, peers) in &inner.peers_by_service {
            let up = peers
                .iter()
                .filter(|p| inner.links.get(&p.node).is_some_and(|l| l.outbox.is_up()))
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

    /// Tells the peers of `service` that this agent's subscribers on
    /// `channel` changed (the first came or the last left). What is sent is
    /// the channel's state when the link gets to it, never a stale notice.
    pub fn interest(&self, service: &str, channel: &str) {
        let inner = self.lock();
        for peer in inner.peers_by_service.get(service).into_iter().flatten() {
            if let Some(link) = inner.links.get(&peer.node) {
                link.outbox.interest_changed(service, channel);
            }
        }
    }

    /// Whether `channel` of `service` has subscribers on this agent now.
    fn has_subscribers(&self, service: &str, channel: &str) -> bool {
        let runtime = self.lock().services.get(service).and_then(Weak::upgrade);
        runtime.is_some_and(|r| r.hub.subscriber_count(channel) > 0)
    }

    /// Sends a local publish to every peer with subscribers on the channel.
    /// Returns the links now over their pacing threshold: the publisher
    /// waits for them ([`Backlog::drained`]) before its next message is read.
    pub fn forward(&self, service: &str, channel: &str, message: &Utf8Bytes) -> Backlog {
        let mut backlog = Backlog::default();
        let (service_name, outboxes): (Arc<str>, Vec<Option<Arc<Outbox>>>) = {
            let inner = self.lock();
            let (Some(peers), Some(name)) = (
                inner.peers_by_service.get(service),
                inner.service_names.get(service),
            ) else {
                return backlog;
            };
            let nodes = peers.iter().map(|p| p.node.as_str());
            let outboxes = routing::targets(true, service, channel, nodes, &inner.remote_interest)
                .map(|node| inner.links.get(node).map(|l| Arc::clone(&l.outbox)))
                .collect();
            (Arc::clone(name), outboxes)
        };
        if outboxes.is_empty() {
            return backlog;
        }
        // Encoded once; each link's queue holds a reference to the same bytes.
        let frame = match Publish::encode(service, channel, now_us(), message.as_bytes()) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::warn!(service, channel, %err, "cannot forward a publish");
                return backlog;
            }
        };
        // The last link takes the frame itself (`repeat_n` moves it there):
        // the first clone of fresh bytes allocates their shared header, so
        // the usual single link allocates none.
        let frames = std::iter::repeat_n(frame, outboxes.len());
        for (outbox, frame) in outboxes.into_iter().zip(frames) {
            let pushed = outbox
                .as_ref()
                .map_or(Err(Refused::Down), |o| o.push(&service_name, frame));
            match pushed {
                Ok(()) => {}
                Err(Refused::OverBudget) => self.metrics.dropped(service, DropReason::MemoryBudget),
                Err(Refused::Down | Refused::Full) => {
                    self.metrics.dropped(service, DropReason::MeshUnavailable)
                }
            }
            if let Some(outbox) = outbox.filter(|o| o.over_pace()) {
                backlog.links.push(outbox);
            }
        }
        backlog
    }

    /// This node's mesh public key, as peers must be told it.
    pub fn public_key(&self) -> String {
        self.identity.public_hex()
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
            // Over the cap the connection is closed at once: it costs no
            // task, and the slots of those in handshake free up within the
            // deadline.
            let Ok(slot) = Arc::clone(&self.handshakes).try_acquire_owned() else {
                self.metrics.mesh_refused(MeshRefusal::HandshakeBusy);
                tracing::debug!(%peer, "mesh link refused: too many handshakes at once");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(Arc::clone(&self).inbound(tcp, peer, slot));
        }
    }

    /// The key `node` must show to link here: the one its spec gives, in
    /// any service we share with it.
    fn key_of(&self, node: &str) -> Option<[u8; KEY_LEN]> {
        let inner = self.lock();
        inner
            .peers_by_service
            .values()
            .flatten()
            .filter(|p| p.node == node)
            .find_map(peer_key)
    }

    /// Whether `service` is placed here and on `node`: only then may `node`
    /// deliver into it or tell us its interest in it.
    fn shares(&self, node: &str, service: &str) -> bool {
        self.lock()
            .peers_by_service
            .get(service)
            .is_some_and(|peers| peers.iter().any(|p| p.node == node))
    }

    /// The acceptor's half of a link's setup: the WebSocket upgrade and the
    /// Noise handshake, within one deadline.
    async fn accept_link(&self, tcp: TcpStream) -> Result<(String, LinkSink, LinkStream), String> {
        let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
        let ws = tokio_tungstenite::accept_async_with_config(tcp, Some(link_config()))
            .await
            .map_err(|e| e.to_string())?;
        let (sink, stream) = ws.split();
        noise::respond(
            sink,
            stream,
            &self.identity,
            |node| self.key_of(node),
            MAX_LINK_FRAME,
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// One peer's link to us: authenticate, then take its interest and messages.
    async fn inbound(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let setup = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.accept_link(tcp)).await;
        drop(slot);
        let (node, mut sink, mut stream) = match setup {
            Ok(Ok(linked)) => linked,
            Ok(Err(why)) => {
                self.metrics.mesh_refused(MeshRefusal::HandshakeFailed);
                tracing::warn!(%peer, %why, "mesh link refused: authentication failed");
                return;
            }
            Err(_) => {
                self.metrics.mesh_refused(MeshRefusal::HandshakeTimeout);
                tracing::info!(%peer, "mesh link refused: no handshake within the deadline");
                return;
            }
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let superseded = self.stop.child_token();
        {
            let mut inner = self.lock();
            if let Some((_, older)) = inner
                .inbound
                .insert(node.clone(), (generation, superseded.clone()))
            {
                older.cancel();
            }
            if let Some(link) = inner.links.get(&node)
                && !link.outbox.is_up()
            {
                link.redial.notify_one();
            }
        }
        tracing::info!(peer = %node, "mesh link from peer up");
        // The dialer may pack publishes into batches from now on.
        let said = tokio::time::timeout(
            WRITE_DEADLINE,
            sink.send(Message::text(LinkFrame::PublishBatches.to_json())),
        )
        .await;
        let mut silence = Deadline::new(DEAD_AFTER);
        let why = 'link: {
            if !matches!(said, Ok(Ok(()))) {
                break 'link "write failed";
            }
            loop {
                let next = tokio::select! {
                    biased;
                    _ = superseded.cancelled() => break "replaced by a newer link, or no longer a peer",
                    next = stream.next() => next,
                    _ = silence.expired() => break "the peer was silent too long",
                };
                silence.progressed();
                match next {
                    Some(Ok(Message::Binary(frame))) => match frame::decode_publishes(frame) {
                        Ok(publishes) => {
                            let mut into = Delivering::now();
                            let mut run = InboundRun::new();
                            for publish in publishes {
                                // Backpressure across the mesh: this link is
                                // read no faster than the subscribers it fills
                                // drain, so the publisher at the peer is paced
                                // in turn.
                                for subscriber in
                                    self.on_publish(&node, &mut into, &mut run, publish)
                                {
                                    subscriber.room().await;
                                }
                            }
                            for subscriber in run.deliver() {
                                subscriber.room().await;
                            }
                            self.count_received(into);
                        }
                        Err(err) => tracing::warn!(peer = %node, %err, "bad mesh frame"),
                    },
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<LinkFrame>(text.as_str()) {
                            Ok(frame) => self.on_frame(&node, generation, frame),
                            Err(err) => tracing::warn!(peer = %node, %err, "bad mesh frame"),
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break "closed by the peer",
                    Some(Err(_)) => break "read failed",
                    Some(Ok(_)) => {}
                }
            }
        };
        // The dialer's ping answers need a flush; a closed link needs none.
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        let mut inner = self.lock();
        if inner
            .inbound
            .get(&node)
            .is_some_and(|(g, _)| *g == generation)
        {
            inner.inbound.remove(&node);
        }
        tracing::info!(peer = %node, why, "mesh link from peer down");
    }

    fn on_frame(&self, node: &str, generation: u64, frame: LinkFrame) {
        let current = |inner: &Inner| {
            inner
                .inbound
                .get(node)
                .is_some_and(|(g, _)| *g == generation)
        };
        match frame {
            LinkFrame::Interest { service, .. }
            | LinkFrame::Subscribe { service, .. }
            | LinkFrame::Unsubscribe { service, .. }
                if !self.shares(node, &service) =>
            {
                tracing::debug!(peer = %node, %service, "mesh interest ignored: the service is not placed on both nodes");
            }
            LinkFrame::Interest { service, channels } => {
                let mut inner = self.lock();
                if !current(&inner) {
                    return;
                }
                inner
                    .remote_interest
                    .entry(node.to_string())
                    .or_default()
                    .replace(service, channels);
            }
            LinkFrame::Subscribe { service, channel } => {
                let mut inner = self.lock();
                if current(&inner) {
                    inner
                        .remote_interest
                        .entry(node.to_string())
                        .or_default()
                        .insert(service, channel);
                }
            }
            LinkFrame::Unsubscribe { service, channel } => {
                let mut inner = self.lock();
                if current(&inner)
                    && let Some(set) = inner.remote_interest.get_mut(node)
                {
                    set.remove(&service, &channel);
                }
            }
            // Said by an accepting side; this side sends no publishes.
            LinkFrame::PublishBatches => {}
        }
    }

    /// Whether `from` and this node share `service`, and its runtime here
    /// if it runs.
    fn placement(&self, from: &str, service: &str) -> Option<Option<Arc<ServiceRuntime>>> {
        let inner = self.lock();
        let placed = inner
            .peers_by_service
            .get(service)
            .is_some_and(|peers| peers.iter().any(|p| p.node == from));
        placed.then(|| inner.services.get(service).and_then(Weak::upgrade))
    }

    /// Admits a publish from peer `from` if the service is placed on both
    /// nodes, and adds it to `run` for the local subscribers; returns the
    /// subscribers that delivering what waited left behind (see `relay`),
    /// for the link to wait on.
    fn on_publish(
        &self,
        from: &str,
        into: &mut Delivering,
        run: &mut InboundRun,
        publish: Publish,
    ) -> Vec<Subscriber> {
        if into.service != publish.service.as_str() {
            let placement = self.placement(from, &publish.service);
            self.count_received(std::mem::replace(
                into,
                Delivering {
                    service: publish.service.to_string(),
                    placement,
                    received: 0,
                    clock: into.clock,
                },
            ));
        }
        let Some(runtime) = &into.placement else {
            self.metrics.mesh_refused(MeshRefusal::NotPlaced);
            tracing::warn!(peer = %from, service = %publish.service, "mesh publish refused: the peer is not placed on the service");
            return Vec::new();
        };
        let Some(runtime) = runtime else {
            return Vec::new();
        };
        into.received += 1;
        let (now, now_wall) = into.clock;
        let age = Duration::from_micros(now_wall.saturating_sub(publish.sent_us));
        let published_at = now.checked_sub(age).unwrap_or(now);
        run.push(runtime, &publish.channel, publish.message, published_at)
    }

    fn count_received(&self, into: Delivering) {
        if into.received > 0 {
            self.metrics
                .mesh_messages
                .with_label_values(&[&into.service, "received"])
                .inc_by(into.received);
        }
    }

    fn link_state_changed(&self, node: &str, up: bool, why: LinkEnd) {
        let inner = self.lock();
        self.update_peer_gauges(&inner);
        drop(inner);
        if up {
            tracing::info!(peer = %node, "mesh link to peer up");
        } else {
            tracing::warn!(peer = %node, why, "mesh link to peer down; redialing");
        }
    }

    /// The interest snapshot of `service` for a peer: our active channels.
    fn snapshot_of(&self, service: &str) -> LinkFrame {
        let runtime = self.lock().services.get(service).and_then(Weak::upgrade);
        LinkFrame::Interest {
            service: service.to_string(),
            channels: runtime.map(|r| r.hub.active_channels()).unwrap_or_default(),
        }
    }

    /// The services this agent shares with `node`.
    fn services_with(&self, node: &str) -> Vec<String> {
        let inner = self.lock();
        inner
            .peers_by_service
            .iter()
            .filter(|(_, peers)| peers.iter().any(|p| p.node == node))
            .map(|(service, _)| service.clone())
            .collect()
    }

    /// Keeps the outbound link to `node` up until `stop`.
    async fn dial_loop(
        self: Arc<Self>,
        node: String,
        address: String,
        key: [u8; KEY_LEN],
        outbox: Arc<Outbox>,
        (stop, redial): (CancellationToken, Arc<Notify>),
    ) {
        let mut attempt = 0u32;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let dialed = tokio::select! {
                _ = stop.cancelled() => break,
                dialed = self.dial(&node, &address, &key) => dialed,
            };
            match dialed {
                Ok(link) => {
                    attempt = 0;
                    outbox.open();
                    self.link_state_changed(&node, true, "");
                    let why = self.run_link(&node, link, &outbox, &stop).await;
                    // What was queued for this connection is lost with it:
                    // counted, never silently discarded.
                    for queued in outbox.close() {
                        self.metrics
                            .dropped(&queued.service, DropReason::MeshUnavailable);
                    }
                    self.link_state_changed(&node, false, why);
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
                // The peer linked to us: dial now rather than after a
                // backoff that grew while it was away. Until this link is up
                // the peer knows nothing of our subscribers (our interest
                // travels on it), and our publishes cannot reach its.
                _ = redial.notified() => attempt = 0,
            }
        }
        outbox.close();
    }

    async fn dial(&self, node: &str, address: &str, key: &[u8; KEY_LEN]) -> Result<Dialed, String> {
        let url = format!("ws://{address}/mesh");
        let setup = async {
            let (ws, _) =
                tokio_tungstenite::connect_async_with_config(&url, Some(link_config()), true)
                    .await
                    .map_err(|e| e.to_string())?;
            let (sink, stream) = ws.split();
            noise::initiate(sink, stream, &self.identity, node, key, MAX_LINK_FRAME)
                .await
                .map_err(|e| match e {
                    HandshakeError::WrongPeer(_) => format!(
                        "the peer at {address} does not hold {node:?}'s key (is the address right?)"
                    ),
                    other => format!(
                        "{other} (does the peer know this node's key, and the same mesh secret if one is set?)"
                    ),
                })
        };
        let (sink, stream) = tokio::time::timeout(HANDSHAKE_TIMEOUT, setup)
            .await
            .map_err(|_| "no link within the handshake deadline".to_string())??;
        Ok(Dialed { sink, stream })
    }

    /// Runs one connection of the outbound link until it fails or `stop`.
    /// The reader and the writer run side by side: the reader judges the
    /// peer's silence whatever the writer is blocked on, and every write has
    /// its own deadline.
    async fn run_link(
        &self,
        node: &str,
        link: Dialed,
        outbox: &Outbox,
        stop: &CancellationToken,
    ) -> LinkEnd {
        let Dialed {
            mut sink,
            mut stream,
        } = link;
        // Whether the peer reads publish batches: it says so once, first
        // thing on the link; until then publishes go one per frame.
        let batches = AtomicBool::new(false);
        let reader = async {
            let mut silence = Deadline::new(DEAD_AFTER);
            loop {
                let next = tokio::select! {
                    biased;
                    next = stream.next() => next,
                    _ = silence.expired() => return "the peer was silent too long",
                };
                silence.progressed();
                match next {
                    Some(Ok(Message::Close(_))) | None => return "closed by the peer",
                    Some(Err(_)) => return "read failed",
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(LinkFrame::PublishBatches) =
                            serde_json::from_str::<LinkFrame>(text.as_str())
                        {
                            batches.store(true, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
        };
        // Publishes taken from the queue and not yet written; whatever is
        // left here when the link ends (the writer may be cut off mid-batch)
        // is counted as dropped.
        let mut in_flight = VecDeque::new();
        let why = tokio::select! {
            _ = stop.cancelled() => "stopped",
            why = reader => why,
            why = self.write_link(node, &mut sink, outbox, &batches, &mut in_flight) => why,
        };
        for lost in in_flight {
            self.metrics
                .dropped(&lost.service, DropReason::MeshUnavailable);
        }
        if why == "stopped" {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
        }
        why
    }

    /// Writes interest (first, always) and queued publishes, and pings.
    async fn write_link(
        &self,
        node: &str,
        sink: &mut LinkSink,
        outbox: &Outbox,
        batches: &AtomicBool,
        in_flight: &mut VecDeque<Queued>,
    ) -> LinkEnd {
        let mut deadline = Deadline::new(WRITE_DEADLINE);
        for service in self.services_with(node) {
            let frame = self.snapshot_of(&service);
            if let Err(why) = within(&mut deadline, sink.feed(Message::text(frame.to_json()))).await
            {
                return why;
            }
        }
        if let Err(why) = within(&mut deadline, sink.flush()).await {
            return why;
        }
        // One timer for the link's pings, moved after each.
        let mut next_ping = tokio::time::Instant::now() + PING_EVERY;
        let ping = tokio::time::sleep_until(next_ping);
        tokio::pin!(ping);
        loop {
            let interest = outbox.take_interest();
            if !interest.is_empty() {
                let frames = interest
                    .snapshots
                    .iter()
                    .map(|service| self.snapshot_of(service))
                    .chain(interest.channels.into_iter().map(|(service, channel)| {
                        if self.has_subscribers(&service, &channel) {
                            LinkFrame::Subscribe { service, channel }
                        } else {
                            LinkFrame::Unsubscribe { service, channel }
                        }
                    }));
                for frame in frames {
                    if let Err(why) =
                        within(&mut deadline, sink.feed(Message::text(frame.to_json()))).await
                    {
                        return why;
                    }
                }
                if let Err(why) = within(&mut deadline, sink.flush()).await {
                    return why;
                }
                continue;
            }
            in_flight.extend(outbox.take_batch(BATCH_FRAMES, BATCH_BYTES));
            if in_flight.is_empty() {
                outbox.wrote();
                tokio::select! {
                    _ = outbox.wait() => {}
                    _ = &mut ping => {}
                }
            } else {
                while !in_flight.is_empty() {
                    // Publishes that fit one Noise message together travel
                    // as one batch: one encryption and one WebSocket frame
                    // for all of them.
                    let count = if batches.load(Ordering::Relaxed) {
                        frame::batch_len(in_flight.iter().map(|q| q.frame.len()), noise::CHUNK)
                    } else {
                        0
                    };
                    let message = match count {
                        0 | 1 => in_flight
                            .front()
                            .map(|q| q.frame.clone())
                            .unwrap_or_default(),
                        _ => {
                            frame::encode_batch(in_flight.iter().take(count).map(|q| &q.frame[..]))
                        }
                    };
                    if let Err(why) =
                        within(&mut deadline, sink.feed(Message::Binary(message))).await
                    {
                        return why;
                    }
                    // Counted per message written, so a link cut off later
                    // in the batch has counted what it wrote.
                    let mut sent = Sent::default();
                    for done in in_flight.drain(..count.max(1)) {
                        sent.count(&done.service);
                        // Its bytes are back in the budget: a paced
                        // publisher may go on.
                        drop(done);
                    }
                    self.metrics_sent(sent);
                    outbox.wrote();
                }
                if let Err(why) = within(&mut deadline, sink.flush()).await {
                    return why;
                }
            }
            if tokio::time::Instant::now() >= next_ping {
                if let Err(why) =
                    within(&mut deadline, sink.send(Message::Ping(Default::default()))).await
                {
                    return why;
                }
                next_ping = tokio::time::Instant::now() + PING_EVERY;
                ping.as_mut().reset(next_ping);
            }
        }
    }

    /// Counts the publishes a link wrote, by service.
    fn metrics_sent(&self, sent: Sent) {
        for (service, count) in sent.by_service {
            self.metrics
                .mesh_messages
                .with_label_values(&[&service, "sent"])
                .inc_by(count);
        }
    }
}

/// The service a link's reader last delivered into: its placement is looked
/// up, and its metric counted, once per run of publishes of one service in a
/// frame rather than once per publish.
struct Delivering {
    service: String,
    placement: Option<Option<Arc<ServiceRuntime>>>,
    received: u64,
    /// When the frame was read, by both clocks (read once per frame): the
    /// publishes in it are aged against it.
    clock: (Instant, u64),
}

impl Delivering {
    fn now() -> Delivering {
        Delivering {
            service: String::new(),
            placement: None,
            received: 0,
            clock: (Instant::now(), now_us()),
        }
    }
}

/// Publishes written in one message, by service: the metric is counted once
/// per service, not once per publish.
#[derive(Default)]
struct Sent {
    by_service: Vec<(Arc<str>, u64)>,
}

impl Sent {
    fn count(&mut self, service: &Arc<str>) {
        match self.by_service.iter_mut().find(|(s, _)| s == service) {
            Some((_, n)) => *n += 1,
            None => self.by_service.push((Arc::clone(service), 1)),
        }
    }
}

/// The mesh links a publish left over their pacing threshold.
#[derive(Debug, Default)]
pub struct Backlog {
    links: Vec<Arc<Outbox>>,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Waits until every link has drained below its threshold, gone down or
    /// stuck (see `outbox`).
    pub async fn drained(self) {
        for link in self.links {
            link.room().await;
        }
    }
}

impl Inner {
    /// Asks every link of `service`'s peers to send its interest again.
    fn resync(&self, service: &str) {
        for peer in self.peers_by_service.get(service).into_iter().flatten() {
            if let Some(link) = self.links.get(&peer.node) {
                link.outbox.resync(service);
            }
        }
    }
}

type LinkWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// An authenticated outbound connection.
struct Dialed {
    sink: LinkSink,
    stream: LinkStream,
}
type LinkSink = SecureSink<futures_util::stream::SplitSink<LinkWs, Message>>;
type LinkStream = SecureStream<futures_util::stream::SplitStream<LinkWs>>;

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
