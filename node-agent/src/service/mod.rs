//! One service: its listening socket, the state its connections share, and the
//! accept loop. HTTP routing lives in `http`, a WebSocket session in `websocket`.

mod batch;
mod body;
mod gate;
mod http;
mod publish;
mod socket;
mod transport;
mod upstream_http;
mod wasm_http;
mod wasm_relay;
mod websocket;

pub use batch::{
    MAX_BYTES as BATCH_MAX_BYTES, MAX_MESSAGES as BATCH_MAX_MESSAGES,
    SUBPROTOCOL as BATCH_SUBPROTOCOL,
};
pub use http::MAX_MESSAGE_BYTES_HEADER;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgewire_api::ServiceConfig;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, KeyError};
use crate::budget::Budget;
use crate::handlers::HandlerSet;
use crate::handlers::wasm::WasmRuntime;
use crate::mesh::Mesh;
use crate::metrics::{DeliveryPath, DropReason, MessageCounters, Metrics};
use crate::relay::{ConnId, FanOut, Hub, Subscriber};
use crate::uplink::Uplink;
use crate::uplink::dedup::Dedup;

/// The WebSocket codec's own read buffer per connection. tungstenite
/// allocates it eagerly and keeps it (128 KiB by default), and most edge
/// connections are idle, so it is small: the socket (`socket`) reads from
/// the kernel in large calls and keeps, only while they wait, the bytes the
/// codec has not taken yet; the codec takes them in chunks of this size.
const READ_BUFFER_BYTES: usize = 512;
/// Frames are written once this much is buffered, or when the send queue runs
/// dry, so a burst of deliveries leaves in few writes.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// What every service of the agent shares.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Metrics,
    /// Links to the other agents, when meshed.
    pub mesh: Option<Arc<Mesh>>,
    /// The budget for everything queued in the agent (send queues and mesh
    /// links together).
    pub queue_budget: Arc<Budget>,
    /// Runs the `wasm` handlers of every service.
    pub wasm: WasmRuntime,
    /// This node's name and state directory, for links to a hub.
    pub uplink: crate::uplink::Context,
}

/// State shared by every connection of one service.
pub struct ServiceRuntime {
    pub config: ServiceConfig,
    /// The handlers by name, with each `wasm` handler's module loaded.
    pub handlers: HandlerSet,
    pub metrics: Metrics,
    /// This service's per-message series, looked up once.
    pub counters: MessageCounters,
    pub hub: Hub,
    /// Links to the other agents running this service, when meshed.
    pub mesh: Option<Arc<Mesh>>,
    /// The agent's budget for everything queued, shared by all services.
    pub queue_budget: Arc<Budget>,
    /// The link to the service's hub, when it has one.
    pub uplink: Option<Arc<Uplink>>,
    /// As a hub: the forwarded messages already delivered, per origin.
    pub dedup: Dedup,
    /// The service's token rules; `None` when it is open to every client.
    auth: Option<Authenticator>,
    ws_config: WebSocketConfig,
    open: AtomicU32,
    next_id: AtomicU64,
    stop: CancellationToken,
    stop_reason: OnceLock<(CloseCode, &'static str)>,
    /// As a hub: whether publishes forwarded by edges (with an `origin`)
    /// are still taken. Each is delivered and acknowledged under a read
    /// guard; stopping takes the write side first (`close_forwarding`).
    forwarding: tokio::sync::RwLock<bool>,
    tracker: TaskTracker,
}

impl ServiceRuntime {
    fn new(
        config: ServiceConfig,
        handlers: HandlerSet,
        shared: &Shared,
        stop: CancellationToken,
        auth: Option<Authenticator>,
        (uplink, dedup): (Option<Arc<Uplink>>, Dedup),
    ) -> ServiceRuntime {
        let metrics = shared.metrics.clone();
        let max = config.limits.max_message_bytes as usize;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            // Bounded so a peer that stops reading cannot grow it without limit;
            // room for the buffer plus the largest frame the agent sends.
            .max_write_buffer_size(WRITE_BUFFER_BYTES + 2 * max + 1024)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        metrics.init_service(&config.name);
        let counters = metrics.message_counters(&config.name);
        ServiceRuntime {
            config,
            handlers,
            metrics,
            counters,
            hub: Hub::new(),
            mesh: shared.mesh.clone(),
            queue_budget: Arc::clone(&shared.queue_budget),
            uplink,
            dedup,
            auth,
            ws_config,
            open: AtomicU32::new(0),
            next_id: AtomicU64::new(1),
            stop,
            stop_reason: OnceLock::new(),
            forwarding: tokio::sync::RwLock::new(true),
            tracker: TaskTracker::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Takes no more publishes forwarded by edges, once those being
    /// delivered are queued to their subscribers. Called before the service
    /// stops: its subscribers then write out what they were given before
    /// they close, and an edge gets no acknowledgement for anything later,
    /// so it sends that again to the next hub rather than lose it.
    pub async fn close_forwarding(&self) {
        *self.forwarding.write().await = false;
    }

    /// Cancelled when the service stops.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Queues a relay frame for this agent's subscribers of `channel`,
    /// counting what the slow-consumer policy dropped. For a publish from
    /// the mesh, returns the subscribers it left behind: the
    /// link waits for them (`Subscriber::room`) before it reads on. A local
    /// publisher never waits for a subscriber.
    pub fn deliver(
        &self,
        channel: &str,
        frame: &Utf8Bytes,
        published_at: std::time::Instant,
        path: DeliveryPath,
    ) -> Vec<Subscriber> {
        let report = self.hub.publish(
            channel,
            frame,
            published_at,
            path,
            self.config.limits.slow_consumer,
            &self.queue_budget,
        );
        self.count_drops(report)
    }

    /// Queues relay frames published back to back on `channel`, in order,
    /// for the local subscribers, and leaves `frames` empty: one alone as a
    /// single delivery, several as one run (see `Hub::publish_run`).
    /// Counts what was dropped; returns the subscribers now over their
    /// threshold.
    pub fn deliver_all(
        &self,
        channel: &str,
        frames: &mut Vec<Utf8Bytes>,
        published_at: std::time::Instant,
        path: DeliveryPath,
    ) -> Vec<Subscriber> {
        if frames.len() < 2 {
            // One alone needs no shared slice.
            return match frames.pop() {
                Some(frame) => self.deliver(channel, &frame, published_at, path),
                None => Vec::new(),
            };
        }
        let run: Arc<[Utf8Bytes]> = frames.drain(..).collect();
        let report = self.hub.publish_run(
            channel,
            &run,
            published_at,
            path,
            self.config.limits.slow_consumer,
            &self.queue_budget,
        );
        self.count_drops(report)
    }

    fn count_drops(&self, report: FanOut) -> Vec<Subscriber> {
        for _ in 0..report.dropped {
            self.metrics.dropped(self.name(), DropReason::SlowConsumer);
        }
        for _ in 0..report.over_budget {
            self.metrics.dropped(self.name(), DropReason::MemoryBudget);
        }
        report.behind
    }

    /// Tells the mesh peers when a channel gains its first or loses its last
    /// local subscriber.
    pub fn interest_changed(&self, channel: &str) {
        if let Some(mesh) = &self.mesh {
            mesh.interest(self.name(), channel);
        }
    }

    fn next_conn_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a connection slot if the service is under its limit.
    fn try_open(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.config.limits.max_connections;
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| {
            self.metrics
                .connections
                .with_label_values(&[self.name()])
                .inc();
            ConnectionSlot {
                runtime: Arc::clone(self),
            }
        })
    }

    pub fn open_connections(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// The close frame sent to clients when the service stops.
    fn stop_reason(&self) -> (CloseCode, &'static str) {
        *self
            .stop_reason
            .get()
            .unwrap_or(&(CloseCode::Away, "agent shutting down"))
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.config.limits.handshake_timeout_seconds.into())
    }
}

/// An open WebSocket connection's place under `maxConnections`; freed on drop.
struct ConnectionSlot {
    runtime: Arc<ServiceRuntime>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.runtime.open.fetch_sub(1, Ordering::AcqRel);
        self.runtime
            .metrics
            .connections
            .with_label_values(&[self.runtime.name()])
            .dec();
    }
}

/// A service that is listening.
pub struct RunningService {
    pub runtime: Arc<ServiceRuntime>,
    pub local_addr: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

/// Why a service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Auth(#[from] KeyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Uplink(#[from] crate::uplink::UplinkError),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

impl RunningService {
    /// Binds the service's port and starts accepting.
    pub async fn start(
        config: ServiceConfig,
        bind_ip: IpAddr,
        shared: &Shared,
        parent: &CancellationToken,
    ) -> Result<RunningService, StartError> {
        // The key first: a service that cannot check tokens must not listen.
        let auth = config.auth.as_ref().map(Authenticator::load).transpose()?;
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let uplink = match Uplink::open(&config, &shared.uplink, &shared.metrics.uplink).await {
            Ok(uplink) => uplink,
            // A state directory that cannot be written (a full disk) must
            // not take the service's local clients down with it.
            Err(err @ crate::uplink::UplinkError::Queue(_)) => {
                tracing::error!(service = %config.name, %err, "the service runs without its hub link until it restarts");
                None
            }
            Err(err) => return Err(err.into()),
        };
        let dedup = Dedup::open(Some(shared.uplink.dedup_path(&config.name)));
        let addr = SocketAddr::new(bind_ip, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| BindError { addr, source })?;
        let stop = parent.child_token();
        let handlers = HandlerSet::build(&config, &shared.metrics, &shared.wasm, &stop).await;
        let runtime = Arc::new(ServiceRuntime::new(
            config,
            handlers,
            shared,
            stop,
            auth,
            (uplink, dedup),
        ));
        gate::init_metrics(&runtime);
        if let Some(uplink) = &runtime.uplink {
            runtime.tracker.spawn(crate::uplink::link::run(
                Arc::clone(&runtime),
                Arc::clone(uplink),
            ));
        }
        let accept_loop = tokio::spawn(accept_loop(listener, Arc::clone(&runtime), tls));
        tracing::info!(service = runtime.name(), %local_addr, "service listening");
        Ok(RunningService {
            runtime,
            local_addr,
            accept_loop,
        })
    }

    /// Stops accepting (the port is free when this returns) and tells every
    /// connection to close with `code`. Returns a handle to wait for the drain.
    pub async fn stop(self, code: CloseCode, reason: &'static str) -> TaskTracker {
        self.runtime.close_forwarding().await;
        let _ = self.runtime.stop_reason.set((code, reason));
        self.runtime.stop.cancel();
        if let Err(err) = self.accept_loop.await {
            tracing::error!(service = self.runtime.name(), %err, "accept loop failed");
        }
        self.runtime.tracker.close();
        self.runtime.tracker.clone()
    }
}

async fn accept_loop(
    listener: TcpListener,
    runtime: Arc<ServiceRuntime>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        tokio::select! {
            _ = runtime.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    let accepted_at = std::time::Instant::now();
                    // Small frames dominate: do not let Nagle hold them back.
                    let _ = tcp.set_nodelay(true);
                    let runtime = Arc::clone(&runtime);
                    let tracker = runtime.tracker.clone();
                    match &tls {
                        None => tracker.spawn(http::serve_connection(runtime, tcp, accepted_at)),
                        Some(tls) => tracker.spawn(serve_tls(tls.clone(), runtime, tcp, accepted_at)),
                    };
                }
                Err(err) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(service = runtime.name(), %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A TLS handshake, then HTTP over it. The handshake counts against the same
/// deadline as the request head.
async fn serve_tls(
    tls: tokio_rustls::TlsAcceptor,
    runtime: Arc<ServiceRuntime>,
    tcp: tokio::net::TcpStream,
    accepted_at: std::time::Instant,
) {
    match tokio::time::timeout(runtime.handshake_timeout(), tls.accept(tcp)).await {
        Ok(Ok(stream)) => http::serve_connection(runtime, stream, accepted_at).await,
        Ok(Err(err)) => {
            runtime
                .metrics
                .connection(runtime.name(), crate::metrics::Outcome::HandshakeFailed);
            tracing::debug!(service = runtime.name(), %err, "tls handshake failed");
        }
        Err(_) => {
            runtime
                .metrics
                .connection(runtime.name(), crate::metrics::Outcome::HandshakeTimeout);
        }
    }
}
