//! The link to the hub: dials out (so it works behind NAT), reconnecting
//! with exponential backoff and jitter; sends the queue oldest first, at
//! most [`MAX_IN_FLIGHT`] unacknowledged, in batches; removes what the hub
//! acknowledges; delivers what comes down on the downlink channels, except
//! this node's own messages. The hub's kind is behind [`HubLink`].
//!
//! Batches: a batch of at most `batch::MAX_MESSAGES` messages or
//! `batch::MAX_BYTES` bytes is written and flushed at once when nothing is
//! in flight, else as soon as acknowledgements make room for
//! [`MIN_REFILL`] messages: the time bound is one round trip to the hub.
//! The acknowledgements that arrived together are taken together, so the
//! queue is settled once per burst of them, not once per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use edgewire_api::wire::ServerMessage;
use futures_util::FutureExt;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::hub_link::{Event, HubLink};
use super::nats_link::{self, NatsLink};
use super::relay_link::RelayLink;
use super::transport::{self, ConnectError};
use super::{SYNC_INTERVAL, Uplink, queue};
use crate::metrics::DeliveryPath;
use crate::service::{BATCH_MAX_BYTES, BATCH_MAX_MESSAGES, ServiceRuntime};

/// Publishes sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: u64 = 2048;
/// With messages in flight, the link sends again once the window has room
/// for this many: a batch of one message per acknowledgement would cost a
/// write (and the hub a read) per message.
pub const MIN_REFILL: u64 = 64;
/// Events taken without waiting once one has come (all that are already
/// read, up to this many).
const EVENT_RUN: usize = MAX_IN_FLIGHT as usize;
/// The link checks on the hub this often.
const PING_EVERY: Duration = Duration::from_secs(15);
/// A session that lasted this long starts the backoff afresh.
const STABLE: Duration = Duration::from_secs(10);

/// Waits between attempts while the hub cannot be reached: 100 ms doubling
/// to 1 s, each plus up to as much again in jitter. An edge tries again
/// within 2 s of its hub's return (a NATS leaf node redials every second),
/// so a backlog starts draining at once; a refused dial costs a hub that is
/// down nothing.
fn backoff() -> impl Iterator<Item = Duration> {
    exponential(Duration::from_millis(100), Duration::from_secs(1))
}

/// Waits between attempts that reached the hub and were turned away (a
/// wrong token, a failed TLS or WebSocket handshake): 1 s doubling to 10 s,
/// plus jitter. Each such attempt costs the hub a handshake, and a fleet
/// with a stale credential must not keep it busy.
fn refused_backoff() -> impl Iterator<Item = Duration> {
    exponential(Duration::from_secs(1), Duration::from_secs(10))
}

fn exponential(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// An open connection to either kind of hub (boxed: one per service, and
/// the NATS client's state is large).
enum Link {
    Relay(Box<RelayLink>),
    Nats(Box<NatsLink>),
}

async fn connect(runtime: &ServiceRuntime, uplink: &Uplink) -> Result<Link, ConnectError> {
    let config = &runtime.config;
    let downlink: Vec<String> = config
        .channels
        .iter()
        .filter(|c| config.is_downlink(&c.name))
        .map(|c| c.name.clone())
        .collect();
    if uplink.spec.is_nats() {
        return nats_link::connect(&uplink.spec, &uplink.node, &downlink)
            .await
            .map(|link| Link::Nats(Box::new(link)));
    }
    let max = config.limits.max_message_bytes as usize;
    let socket = transport::connect(&uplink.spec, max).await?;
    RelayLink::start(socket, &uplink.node, &downlink)
        .await
        .map(|link| Link::Relay(Box::new(link)))
        .map_err(ConnectError::Handshake)
}

/// Runs the link until the service stops.
pub async fn run(runtime: Arc<ServiceRuntime>, uplink: Arc<Uplink>) {
    let stop = runtime.stop_token();
    tokio::spawn(maintain(Arc::clone(&uplink), stop.clone()));
    let mut delays = backoff();
    let mut refusals = refused_backoff();
    let mut failing_since: Option<Instant> = None;
    loop {
        uplink.metrics.set_state(&uplink.service, "connecting");
        let mut turned_away = false;
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            attempt = connect(&runtime, &uplink) => attempt,
        };
        match attempt {
            Ok(link) => {
                let since = failing_since.take();
                tracing::info!(
                    service = %uplink.service,
                    hub = %uplink.spec.url,
                    down_for_seconds = since.map(|s| s.elapsed().as_secs_f64()),
                    "hub link up"
                );
                let started = Instant::now();
                let mut session = Session {
                    runtime: &runtime,
                    uplink: &uplink,
                    sent_through: None,
                    in_flight: 0,
                    acked: None,
                    warned: false,
                };
                let end = match link {
                    Link::Relay(mut link) => session.serve(link.as_mut(), &stop).await,
                    Link::Nats(mut link) => session.serve(link.as_mut(), &stop).await,
                };
                if stop.is_cancelled() {
                    return;
                }
                tracing::warn!(service = %uplink.service, hub = %uplink.spec.url, reason = %end, "hub link down; messages are queued until it is back");
                failing_since = Some(Instant::now());
                if started.elapsed() >= STABLE {
                    delays = backoff();
                    refusals = refused_backoff();
                }
            }
            Err(err) => {
                turned_away = err.turned_away();
                uplink
                    .metrics
                    .connect_failures
                    .with_label_values(&[&uplink.service, err.reason()])
                    .inc();
                failing_since.get_or_insert_with(Instant::now);
                tracing::warn!(
                    service = %uplink.service,
                    hub = %uplink.spec.url,
                    reason = err.reason(),
                    error = %err,
                    "cannot reach the hub; messages are queued until it is back"
                );
            }
        }
        let delay = if turned_away {
            refusals.next().unwrap_or(Duration::from_secs(10))
        } else {
            delays.next().unwrap_or(Duration::from_secs(1))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Syncs the queue, drops what outlived the TTL and sets the gauges, every
/// [`SYNC_INTERVAL`] and once more when the service stops.
async fn maintain(uplink: Arc<Uplink>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        let last = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let expired = uplink.queue.expire(queue::now_ms());
        uplink.metrics.drop_n(&uplink.service, "ttl", expired);
        // Before the sync, which may take long: the gauges agree with the
        // drop counter as soon as it moves.
        uplink.refresh_gauges();
        let queue = Arc::clone(&uplink.queue);
        match tokio::task::spawn_blocking(move || queue.sync()).await {
            Ok(Ok(())) => warned = false,
            Ok(Err(err)) if !warned => {
                warned = true;
                tracing::error!(service = %uplink.service, %err, "cannot sync the uplink queue to disk");
            }
            _ => {}
        }
        if last {
            return;
        }
    }
}

struct Session<'a> {
    runtime: &'a Arc<ServiceRuntime>,
    uplink: &'a Arc<Uplink>,
    /// The newest sequence sent on this connection.
    sent_through: Option<u64>,
    in_flight: u64,
    /// The newest sequence acknowledged and not yet removed from the queue
    /// (see `settle`).
    acked: Option<u64>,
    warned: bool,
}

impl Session<'_> {
    /// Serves one connection; returns why it ended.
    async fn serve<L: HubLink>(&mut self, link: &mut L, stop: &CancellationToken) -> String {
        let uplink: &Arc<Uplink> = self.uplink;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            if let Err(end) = self.send_queued(link).await {
                return end;
            }
            let room = self.has_room();
            let mut check = false;
            tokio::select! {
                _ = stop.cancelled() => {
                    link.close().await;
                    return "service stopping".into();
                }
                () = uplink.wake.notified(), if room => {}
                _ = ping.tick() => check = true,
                event = link.next() => {
                    let end = self.take_events(link, event);
                    self.settle();
                    if let Err(end) = end {
                        return end;
                    }
                }
            }
            if check && let Err(end) = link.keepalive().await {
                return end;
            }
        }
    }

    /// Whether the window has room for a batch now: any room when nothing
    /// is in flight, else at least [`MIN_REFILL`].
    fn has_room(&self) -> bool {
        self.in_flight == 0 || MAX_IN_FLIGHT.saturating_sub(self.in_flight) >= MIN_REFILL
    }

    /// Acts on `first` and on the events already there behind it (up to
    /// [`EVENT_RUN`]); the queue is settled by the caller.
    fn take_events<L: HubLink>(
        &mut self,
        link: &mut L,
        first: Result<Event, String>,
    ) -> Result<(), String> {
        self.on_event(first?);
        for _ in 1..EVENT_RUN {
            // `next` is cancel-safe: a poll that finds nothing loses nothing.
            match link.next().now_or_never() {
                Some(event) => self.on_event(event?),
                None => break,
            }
        }
        Ok(())
    }

    /// Removes what the hub acknowledged from the queue.
    fn settle(&mut self) {
        let Some(seq) = self.acked.take() else {
            return;
        };
        let delivered = self.uplink.queue.remove_through(seq);
        self.uplink.series.delivered.inc_by(delivered);
        self.uplink.refresh_gauges();
    }

    /// Sends what the window allows, in batches.
    async fn send_queued<L: HubLink>(&mut self, link: &mut L) -> Result<(), String> {
        while self.has_room() {
            let room = (MAX_IN_FLIGHT - self.in_flight) as usize;
            let batch = self.uplink.queue.after(
                self.sent_through,
                room.min(BATCH_MAX_MESSAGES),
                BATCH_MAX_BYTES,
            );
            let Some(first) = batch.first() else {
                return Ok(());
            };
            let sendable = batch.iter().take_while(|r| link.takes(r)).count();
            if sendable == 0 {
                // Once everything before it is acknowledged it heads the
                // queue: drop it there, and go on with the rest.
                if self.in_flight == 0 {
                    self.drop_too_large(first.seq, first.data.len());
                    continue;
                }
                return Ok(());
            }
            let batch = &batch[..sendable];
            let Some(last) = batch.last().map(|r| r.seq) else {
                return Ok(());
            };
            link.send(batch).await?;
            let bytes: usize = batch.iter().map(|r| r.data.len()).sum();
            self.uplink.series.sent_bytes.inc_by(bytes as u64);
            self.in_flight += batch.len() as u64;
            self.sent_through = Some(last);
        }
        Ok(())
    }

    /// Drops the queue's head, `seq`, which the hub would not take.
    fn drop_too_large(&mut self, seq: u64, bytes: usize) {
        let service = self.uplink.service.as_str();
        let dropped = self.uplink.queue.remove_through(seq);
        self.uplink.metrics.drop_n(service, "too_large", dropped);
        self.uplink.refresh_gauges();
        tracing::warn!(
            service,
            bytes,
            "an uplink message is larger than the hub takes; it is dropped (counted as too_large)"
        );
    }

    fn on_event(&mut self, event: Event) {
        let uplink: &Arc<Uplink> = self.uplink;
        let service = uplink.service.as_str();
        let metrics = &uplink.metrics;
        match event {
            Event::Acked(seq) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.acked = self.acked.max(Some(seq));
            }
            Event::Rejected { seq, why } => {
                self.settle();
                self.in_flight = self.in_flight.saturating_sub(1);
                let delivered = uplink.queue.remove_through(seq.saturating_sub(1));
                uplink.series.delivered.inc_by(delivered);
                let rejected = uplink.queue.remove_through(seq);
                metrics.drop_n(service, "rejected", rejected);
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(service, %why, "the hub refused an uplink message; it is dropped (counted as rejected)");
                }
            }
            Event::Ready => metrics.set_state(service, "connected"),
            Event::Down {
                channel,
                data,
                origin,
            } => {
                // This node's own message coming back: it was delivered
                // here when it was published.
                if origin.as_ref().is_some_and(|o| o.node == self.uplink.node) {
                    return;
                }
                if !self.runtime.config.is_downlink(&channel) {
                    return;
                }
                let frame = Utf8Bytes::from(
                    ServerMessage::Message {
                        channel: channel.clone(),
                        data,
                        origin,
                    }
                    .to_json(),
                );
                let _ = self
                    .runtime
                    .deliver(&channel, &frame, Instant::now(), DeliveryPath::Hub);
                metrics.downlink.with_label_values(&[service]).inc();
            }
            Event::Nothing => {}
        }
    }
}
