//! The publishes of one link frame, queued for this node's subscribers in
//! runs: consecutive publishes on one service's channel reach each local
//! subscriber as one delivery (one queue entry, one charge, one wake; see
//! `Hub::publish_run`), as a local publisher's do. The far end of a busy
//! link otherwise pays a delivery per message, where the frame already
//! carries dozens of them together.

use std::sync::Arc;
use std::time::Instant;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::metrics::DeliveryPath;
use crate::relay::Subscriber;
use crate::service::ServiceRuntime;

/// The most publishes in one run, as for a local publisher's run.
const MAX_RUN: usize = 64;
/// The most message bytes in one run. A subscriber's queue is looked at
/// (is it over its pacing threshold, so the link must wait?) after each
/// delivery; a run may carry it past the threshold by this much more than
/// one message would, which keeps the link's backpressure as close as it
/// was (see the README's table of what waits).
const MAX_RUN_BYTES: usize = 16 * 1024;

/// The publishes read so far that continue one another: same service, same
/// channel, in the order they came.
pub struct InboundRun {
    target: Option<(Arc<ServiceRuntime>, Utf8Bytes)>,
    frames: Vec<Utf8Bytes>,
    bytes: usize,
    /// When the first of them was published (a run's messages share it in
    /// the latency histogram).
    published_at: Instant,
}

impl InboundRun {
    pub fn new() -> InboundRun {
        InboundRun {
            target: None,
            frames: Vec::new(),
            bytes: 0,
            published_at: Instant::now(),
        }
    }

    /// Adds a publish of `runtime`'s `channel`. What waited is delivered
    /// first when this one does not continue it (another service or
    /// channel, or a run full in count or bytes); returns the subscribers
    /// that delivery left over their threshold, for the link to wait on.
    pub fn push(
        &mut self,
        runtime: &Arc<ServiceRuntime>,
        channel: &Utf8Bytes,
        message: Utf8Bytes,
        published_at: Instant,
    ) -> Vec<Subscriber> {
        let continues = self.frames.len() < MAX_RUN
            && self.bytes + message.len() <= MAX_RUN_BYTES
            && self
                .target
                .as_ref()
                .is_some_and(|(r, c)| Arc::ptr_eq(r, runtime) && c == channel);
        let behind = if continues {
            Vec::new()
        } else {
            self.deliver()
        };
        if self.frames.is_empty() {
            self.target = Some((Arc::clone(runtime), channel.clone()));
            self.published_at = published_at;
            self.bytes = 0;
        }
        self.bytes += message.len();
        self.frames.push(message);
        behind
    }

    /// Delivers what waits; returns the subscribers left over their
    /// threshold.
    pub fn deliver(&mut self) -> Vec<Subscriber> {
        match &self.target {
            Some((runtime, channel)) => runtime.deliver_all(
                channel,
                &mut self.frames,
                self.published_at,
                DeliveryPath::Mesh,
            ),
            None => Vec::new(),
        }
    }
}
