//! Links from a service to its hub (another edgewire relay, or a NATS
//! server with JetStream): channels marked
//! `uplink` go up through a store-and-forward queue, channels marked
//! `downlink` come down to this node's subscribers.
//!
//! - [`queue`]: the on-disk queue and its bounds; [`record`]: its format.
//! - [`link`]: the connection to the hub: dial, send, acknowledge, receive.
//! - [`hub_link`]: what a hub of either kind does for the link;
//!   [`relay_link`]: an edgewire relay; [`nats_link`]: NATS JetStream.
//! - [`transport`]: dialling a relay (TCP, TLS, the WebSocket handshake).
//! - [`dedup`]: the hub's side: each (node, channel, sequence) delivered once.
//! - [`metrics`]: the queue's and the link's metrics.
//!
//! The protocol is the relay's own (README, "Edge and hub"): the edge is an
//! ordinary relay client of the hub whose publishes carry an `origin`
//! (node, sequence) and an `id` the hub's `published` reply acknowledges.

pub mod dedup;
pub mod hub_link;
pub mod link;
pub mod metrics;
pub mod nats_link;
pub mod queue;
pub mod record;
pub mod relay_link;
pub mod transport;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgewire_api::{HubSpec, ServiceConfig};
use tokio::sync::Notify;

use self::metrics::{ServiceSeries, UplinkMetrics};
use self::queue::{Bounds, Queue, QueueError};

/// How often the queue is synced to disk, expired, and its gauges set.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// At most one log line per this long for repeated store failures.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What every service's hub link needs from the agent.
#[derive(Clone, Debug)]
pub struct Context {
    /// This node's name: the `origin` of what it sends up.
    pub node: Option<String>,
    /// Queues live in `uplink/` and the hub's tables in `uplink-dedup/` here.
    pub state_dir: PathBuf,
}

impl Context {
    /// Where a service keeps what it has delivered as a hub.
    pub fn dedup_path(&self, service: &str) -> PathBuf {
        self.state_dir
            .join("uplink-dedup")
            .join(format!("{}.log", file_name(service)))
    }

    fn queue_dir(&self, service: &str) -> PathBuf {
        self.state_dir.join("uplink").join(file_name(service))
    }
}

/// A service name as a file name: `namespace/name` becomes `namespace_name`
/// (neither part may hold `_`, so no two services share one).
fn file_name(service: &str) -> String {
    service.replace('/', "_")
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("service {0} has a hub, which needs this node's name (--node-name or NODE_NAME)")]
    NoNodeName(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// One service's link to its hub.
pub struct Uplink {
    pub service: String,
    pub node: String,
    pub spec: HubSpec,
    pub queue: Arc<Queue>,
    pub metrics: UplinkMetrics,
    /// This service's series of `metrics` that change per message.
    pub series: ServiceSeries,
    /// Told when a message was queued, so the link sends it.
    wake: Notify,
    last_store_log: Mutex<Option<Instant>>,
}

impl Uplink {
    /// The service's uplink, its queue recovered from disk; `None` when the
    /// service has no hub.
    pub async fn open(
        config: &ServiceConfig,
        context: &Context,
        metrics: &UplinkMetrics,
    ) -> Result<Option<Arc<Uplink>>, UplinkError> {
        let Some(spec) = config.hub.clone() else {
            return Ok(None);
        };
        let node = context
            .node
            .clone()
            .ok_or_else(|| UplinkError::NoNodeName(config.name.clone()))?;
        let dir = context.queue_dir(&config.name);
        let bounds = Bounds {
            max_bytes: spec.queue_bytes,
            ttl: Duration::from_secs(spec.ttl_seconds),
        };
        let (queue, dropped) = tokio::task::spawn_blocking(move || Queue::shared(&dir, bounds))
            .await
            .map_err(|e| QueueError::Open {
                dir: context.queue_dir(&config.name),
                source: std::io::Error::other(e),
            })??;
        metrics.init_service(&config.name, &transport::ConnectError::REASONS);
        metrics.drop_n(&config.name, "capacity", dropped);
        let uplink = Arc::new(Uplink {
            service: config.name.clone(),
            node,
            spec,
            queue,
            metrics: metrics.clone(),
            series: metrics.series(&config.name),
            wake: Notify::new(),
            last_store_log: Mutex::new(None),
        });
        let stats = uplink.queue.stats(queue::now_ms());
        tracing::info!(
            service = %uplink.service,
            hub = %uplink.spec.url,
            queued = stats.messages,
            queued_bytes = stats.bytes,
            "uplink queue open"
        );
        uplink.refresh_gauges();
        Ok(Some(uplink))
    }

    /// Queues a message published here on an uplink channel. A message that
    /// cannot be stored (a full disk) is dropped and counted; the local
    /// delivery it came with is not affected.
    pub fn publish(&self, channel: &str, data: &serde_json::Value) {
        match self.queue.push(channel, data.to_string(), queue::now_ms()) {
            Ok(pushed) => {
                self.metrics
                    .drop_n(&self.service, "capacity", pushed.dropped);
                if pushed.seq.is_some() {
                    self.wake.notify_one();
                }
            }
            Err(err) => {
                self.metrics.drop_n(&self.service, "store_failed", 1);
                let mut last = self
                    .last_store_log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                    *last = Some(Instant::now());
                    tracing::error!(
                        service = %self.service,
                        channel,
                        %err,
                        "cannot store an uplink message; it is dropped (counted in edgewire_uplink_dropped_total{{reason=\"store_failed\"}})"
                    );
                }
            }
        }
        self.refresh_gauges();
    }

    /// Sets the queue gauges from the queue.
    pub fn refresh_gauges(&self) {
        let stats = self.queue.stats(queue::now_ms());
        self.series.queue_messages.set(stats.messages as i64);
        self.series.queue_bytes.set(stats.bytes as i64);
        self.series.oldest_seconds.set(stats.oldest_seconds);
    }
}
