//! The agent's Prometheus metrics. The names and labels are part of the contract
//! (DESIGN.md); labels stay bounded: service, handler, reason, direction, path,
//! outcome, state. Never a client address or an id.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets from 50µs to 10s: the range from a loopback echo to a slow upstream.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Why a message or connection was refused; the `reason` label of
/// `edgewire_messages_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Oversize,
    InvalidUtf8,
    InvalidJson,
    InvalidRequest,
    UnknownType,
    UnknownChannel,
    UnknownHandler,
    InvalidArguments,
    Unsupported,
    SlowConsumer,
    Protocol,
    /// A publish for a peer whose mesh link is down or backed up.
    MeshUnavailable,
    /// A delivery refused because the agent's global queue budget was spent.
    MemoryBudget,
    /// A publish whose channel processor failed, or a call whose handler did.
    HandlerFailed,
    /// A request the client's token does not allow.
    Forbidden,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::Oversize,
        DropReason::InvalidUtf8,
        DropReason::InvalidJson,
        DropReason::InvalidRequest,
        DropReason::UnknownType,
        DropReason::UnknownChannel,
        DropReason::UnknownHandler,
        DropReason::InvalidArguments,
        DropReason::Unsupported,
        DropReason::SlowConsumer,
        DropReason::Protocol,
        DropReason::MeshUnavailable,
        DropReason::MemoryBudget,
        DropReason::HandlerFailed,
        DropReason::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Oversize => "oversize",
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::InvalidJson => "invalid_json",
            DropReason::InvalidRequest => "invalid_request",
            DropReason::UnknownType => "unknown_type",
            DropReason::UnknownChannel => "unknown_channel",
            DropReason::UnknownHandler => "unknown_handler",
            DropReason::InvalidArguments => "invalid_arguments",
            DropReason::Unsupported => "unsupported",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::Protocol => "protocol",
            DropReason::MeshUnavailable => "mesh_unavailable",
            DropReason::MemoryBudget => "memory_budget",
            DropReason::HandlerFailed => "handler_failed",
            DropReason::Forbidden => "forbidden",
        }
    }
}

impl From<edgewire_api::wire::ErrorCode> for DropReason {
    fn from(code: edgewire_api::wire::ErrorCode) -> Self {
        use edgewire_api::wire::ErrorCode;
        match code {
            ErrorCode::InvalidJson => DropReason::InvalidJson,
            ErrorCode::InvalidRequest => DropReason::InvalidRequest,
            ErrorCode::UnknownType => DropReason::UnknownType,
            ErrorCode::UnknownChannel => DropReason::UnknownChannel,
            ErrorCode::UnknownHandler => DropReason::UnknownHandler,
            ErrorCode::InvalidArguments => DropReason::InvalidArguments,
            ErrorCode::HandlerFailed => DropReason::HandlerFailed,
            ErrorCode::Forbidden => DropReason::Forbidden,
        }
    }
}

/// How a connection attempt ended; the `outcome` label of `edgewire_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    RejectedLimit,
    HandshakeTimeout,
    HandshakeFailed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::RejectedLimit => "rejected_limit",
            Outcome::HandshakeTimeout => "handshake_timeout",
            Outcome::HandshakeFailed => "handshake_failed",
        }
    }
}

/// Why the mesh refused a link or a frame; the `reason` label of
/// `edgewire_mesh_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshRefusal {
    /// An inbound link found every handshake slot taken.
    HandshakeBusy,
    /// An inbound link did not finish its handshake within the deadline.
    HandshakeTimeout,
    /// An inbound link failed authentication: a bad handshake, or a key
    /// that is not the key of a peer of ours.
    HandshakeFailed,
    /// An authenticated peer sent a publish for a service not placed on
    /// both nodes.
    NotPlaced,
}

impl MeshRefusal {
    pub const ALL: [MeshRefusal; 4] = [
        MeshRefusal::HandshakeBusy,
        MeshRefusal::HandshakeTimeout,
        MeshRefusal::HandshakeFailed,
        MeshRefusal::NotPlaced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MeshRefusal::HandshakeBusy => "handshake_busy",
            MeshRefusal::HandshakeTimeout => "handshake_timeout",
            MeshRefusal::HandshakeFailed => "handshake_failed",
            MeshRefusal::NotPlaced => "not_placed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryPath {
    Local,
    Mesh,
    /// Published at the service's hub and brought down by its link.
    Hub,
}

/// One service's per-message series, looked up once: a relay message
/// costs an atomic add, not a label lookup under the vector's lock.
#[derive(Clone, Debug)]
pub struct MessageCounters {
    pub messages_in: IntCounter,
    pub messages_out: IntCounter,
    latency_local: Histogram,
    latency_mesh: Histogram,
}

impl MessageCounters {
    /// The latency series of `path`; `None` for the hub's, which is made
    /// on first use (most services have no hub).
    pub fn latency(&self, path: DeliveryPath) -> Option<&Histogram> {
        match path {
            DeliveryPath::Local => Some(&self.latency_local),
            DeliveryPath::Mesh => Some(&self.latency_mesh),
            DeliveryPath::Hub => None,
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    connections_total: IntCounterVec,
    pub handshake_duration: HistogramVec,
    message_latency: HistogramVec,
    pub handler_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    upstream_bytes: IntCounterVec,
    upstream_breaker: IntGaugeVec,
    upstream_errors: IntCounterVec,
    handler_errors: IntCounterVec,
    messages: IntCounterVec,
    dropped: IntCounterVec,
    pub mesh_peers: IntGaugeVec,
    pub mesh_messages: IntCounterVec,
    config_reloads: IntCounterVec,
    mesh_refused: IntCounterVec,
    auth: IntCounterVec,
    /// The links to a hub and their queues.
    pub uplink: crate::uplink::metrics::UplinkMetrics,
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("static histogram definition is valid")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static counter definition is valid")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static gauge definition is valid")
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::new(),
            connections: gauge(
                "edgewire_connections",
                "Open WebSocket connections.",
                &["service"],
            ),
            connections_total: counter(
                "edgewire_connections_total",
                "WebSocket connection attempts by outcome.",
                &["service", "outcome"],
            ),
            handshake_duration: histogram(
                "edgewire_handshake_duration_seconds",
                "Time from TCP accept to a completed WebSocket upgrade.",
                &["service"],
            ),
            message_latency: histogram(
                "edgewire_message_latency_seconds",
                "Time from a publish arriving to its delivery being written to a subscriber.",
                &["service", "path"],
            ),
            handler_duration: histogram(
                "edgewire_handler_duration_seconds",
                "Time spent in a compute handler.",
                &["service", "handler"],
            ),
            upstream_duration: histogram(
                "edgewire_upstream_duration_seconds",
                "Time spent waiting on an upstream (cloud) call, per attempt, by outcome.",
                &["service", "upstream", "outcome"],
            ),
            upstream_bytes: counter(
                "edgewire_upstream_bytes_total",
                "Body bytes sent to and received from upstreams.",
                &["service", "upstream", "direction"],
            ),
            upstream_breaker: gauge(
                "edgewire_upstream_breaker_state",
                "An upstream's circuit breaker: 0 closed, 1 half-open, 2 open.",
                &["service", "upstream"],
            ),
            upstream_errors: counter(
                "edgewire_upstream_errors_total",
                "Upstream forwards answered by the agent instead of the upstream, by reason.",
                &["service", "upstream", "reason"],
            ),
            handler_errors: counter(
                "edgewire_handler_errors_total",
                "Handler calls that failed, by reason (trap, timeout, memory, unavailable, ...).",
                &["service", "handler", "reason"],
            ),
            messages: counter(
                "edgewire_messages_total",
                "WebSocket messages received (in) and sent (out).",
                &["service", "direction"],
            ),
            dropped: counter(
                "edgewire_messages_dropped_total",
                "Messages refused or not delivered, by reason.",
                &["service", "reason"],
            ),
            mesh_peers: gauge(
                "edgewire_mesh_peers",
                "Mesh links to peer agents by state.",
                &["service", "state"],
            ),
            mesh_messages: counter(
                "edgewire_mesh_messages_total",
                "Publishes sent to and received from mesh peers.",
                &["service", "direction"],
            ),
            config_reloads: counter(
                "edgewire_config_reloads_total",
                "Config reloads by outcome (applied or rejected).",
                &["outcome"],
            ),
            mesh_refused: counter(
                "edgewire_mesh_refused_total",
                "Inbound mesh links and publishes refused, by reason.",
                &["reason"],
            ),
            auth: counter(
                "edgewire_auth_total",
                "Client authentication and permission decisions, by outcome and reason.",
                &["service", "outcome", "reason"],
            ),
            uplink: crate::uplink::metrics::UplinkMetrics::new(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.connections.clone()),
            Box::new(metrics.connections_total.clone()),
            Box::new(metrics.handshake_duration.clone()),
            Box::new(metrics.message_latency.clone()),
            Box::new(metrics.handler_duration.clone()),
            Box::new(metrics.upstream_duration.clone()),
            Box::new(metrics.upstream_bytes.clone()),
            Box::new(metrics.upstream_breaker.clone()),
            Box::new(metrics.upstream_errors.clone()),
            Box::new(metrics.handler_errors.clone()),
            Box::new(metrics.messages.clone()),
            Box::new(metrics.dropped.clone()),
            Box::new(metrics.mesh_peers.clone()),
            Box::new(metrics.mesh_messages.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.mesh_refused.clone()),
            Box::new(metrics.auth.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("each metric is registered once");
        }
        metrics
            .uplink
            .register(&metrics.registry)
            .expect("each metric is registered once");
        for reason in MeshRefusal::ALL {
            metrics.mesh_refused.with_label_values(&[reason.as_str()]);
        }
        metrics
    }

    pub fn mesh_refused(&self, reason: MeshRefusal) {
        self.mesh_refused
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Makes a handler's failure series visible at zero.
    pub fn init_handler(&self, service: &str, handler: &str, reasons: &[&str]) {
        self.handler_duration.with_label_values(&[service, handler]);
        for reason in reasons {
            self.handler_errors
                .with_label_values(&[service, handler, reason]);
        }
    }

    pub fn handler_error(&self, service: &str, handler: &str, reason: &str) {
        self.handler_errors
            .with_label_values(&[service, handler, reason])
            .inc();
    }

    /// `service`'s per-message series (see [`MessageCounters`]).
    pub fn message_counters(&self, service: &str) -> MessageCounters {
        MessageCounters {
            messages_in: self.messages.with_label_values(&[service, "in"]),
            messages_out: self.messages.with_label_values(&[service, "out"]),
            latency_local: self.message_latency.with_label_values(&[service, "local"]),
            latency_mesh: self.message_latency.with_label_values(&[service, "mesh"]),
        }
    }

    /// Makes every metric family of `service` visible at zero, so dashboards and
    /// alerts see the series before the first event.
    pub fn init_service(&self, service: &str) {
        self.connections.with_label_values(&[service]);
        for outcome in [
            Outcome::Accepted,
            Outcome::RejectedLimit,
            Outcome::HandshakeTimeout,
            Outcome::HandshakeFailed,
        ] {
            self.connections_total
                .with_label_values(&[service, outcome.as_str()]);
        }
        self.handshake_duration.with_label_values(&[service]);
        self.message_latency.with_label_values(&[service, "local"]);
        self.message_latency.with_label_values(&[service, "mesh"]);
        self.messages.with_label_values(&[service, "in"]);
        self.messages.with_label_values(&[service, "out"]);
        for reason in DropReason::ALL {
            self.dropped.with_label_values(&[service, reason.as_str()]);
        }
        for state in ["connected", "connecting"] {
            self.mesh_peers.with_label_values(&[service, state]);
        }
        for direction in ["sent", "received"] {
            self.mesh_messages.with_label_values(&[service, direction]);
        }
    }

    /// Makes an upstream's series visible at zero: bytes both ways, the
    /// breaker closed, each error reason, and the duration of `outcomes`.
    pub fn init_upstream(
        &self,
        service: &str,
        upstream: &str,
        outcomes: &[&str],
        reasons: &[&str],
    ) {
        for outcome in outcomes {
            self.upstream_duration
                .with_label_values(&[service, upstream, outcome]);
        }
        self.init_upstream_bytes(service, upstream);
        self.upstream_breaker
            .with_label_values(&[service, upstream])
            .set(0);
        for reason in reasons {
            self.upstream_errors
                .with_label_values(&[service, upstream, reason]);
        }
    }

    /// Shows an upstream's body bytes, both ways, at zero.
    pub fn init_upstream_bytes(&self, service: &str, upstream: &str) {
        for direction in ["sent", "received"] {
            self.upstream_bytes_counter(service, upstream, direction);
        }
    }

    /// Shows one outcome of an upstream's attempts at zero.
    pub fn upstream_attempt_init(&self, service: &str, upstream: &str, outcome: &str) {
        self.upstream_duration
            .with_label_values(&[service, upstream, outcome]);
    }

    /// One attempt at an upstream: how long the cloud took, and how it ended.
    pub fn upstream_attempt(&self, service: &str, upstream: &str, outcome: &str, seconds: f64) {
        self.upstream_duration
            .with_label_values(&[service, upstream, outcome])
            .observe(seconds);
    }

    /// The counter of body bytes to (`sent`) or from (`received`) an
    /// upstream, for a body that counts as it streams.
    pub fn upstream_bytes_counter(
        &self,
        service: &str,
        upstream: &str,
        direction: &str,
    ) -> prometheus::IntCounter {
        self.upstream_bytes
            .with_label_values(&[service, upstream, direction])
    }

    /// Body bytes to (`sent`) or from (`received`) an upstream.
    pub fn upstream_bytes(&self, service: &str, upstream: &str, direction: &str, bytes: usize) {
        self.upstream_bytes_counter(service, upstream, direction)
            .inc_by(bytes as u64);
    }

    pub fn upstream_breaker(&self, service: &str, upstream: &str, state: i64) {
        self.upstream_breaker
            .with_label_values(&[service, upstream])
            .set(state);
    }

    pub fn upstream_error(&self, service: &str, upstream: &str, reason: &str) {
        self.upstream_errors
            .with_label_values(&[service, upstream, reason])
            .inc();
    }

    /// Counts one authentication or permission decision; the labels come
    /// from a closed set (`auth::Decision`), never from the token.
    pub fn auth(&self, service: &str, (outcome, reason): (&'static str, &'static str)) {
        self.auth
            .with_label_values(&[service, outcome, reason])
            .inc();
    }

    /// Shows one decision series of a service at zero.
    pub fn auth_init(&self, service: &str, (outcome, reason): (&'static str, &'static str)) {
        self.auth.with_label_values(&[service, outcome, reason]);
    }

    pub fn connection(&self, service: &str, outcome: Outcome) {
        self.connections_total
            .with_label_values(&[service, outcome.as_str()])
            .inc();
    }

    pub fn dropped(&self, service: &str, reason: DropReason) {
        self.dropped
            .with_label_values(&[service, reason.as_str()])
            .inc();
    }

    pub fn latency(&self, service: &str, path: DeliveryPath, seconds: f64) {
        let label = match path {
            DeliveryPath::Local => "local",
            DeliveryPath::Mesh => "mesh",
            DeliveryPath::Hub => "hub",
        };
        self.message_latency
            .with_label_values(&[service, label])
            .observe(seconds);
    }

    pub fn config_reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.config_reloads.with_label_values(&[outcome]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec only fails on a malformed metric, which the
        // static definitions above rule out.
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%err, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
