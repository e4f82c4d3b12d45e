//! The link to the hub: dials out (so it works behind NAT), reconnecting
//! with exponential backoff and jitter; sends the queue oldest first, at
//! most [`MAX_IN_FLIGHT`] unacknowledged, in batches; removes what the hub
//! acknowledges; subscribes to the downlink channels and delivers what
//! comes down, except this node's own messages.
//!
//! Batches: a batch of at most `batch::MAX_MESSAGES` messages or
//! `batch::MAX_BYTES` bytes is written and flushed at once when nothing is
//! in flight, else as soon as an acknowledgement makes room: the time bound
//! is one round trip to the hub.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use edgewire_api::wire::{Origin, RequestId, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::transport::{self, HubSocket};
use super::{SYNC_INTERVAL, Uplink, queue};
use crate::metrics::DeliveryPath;
use crate::service::{BATCH_MAX_BYTES, BATCH_MAX_MESSAGES, ServiceRuntime};

/// Publishes sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: u64 = 2048;
/// Every write to the hub must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The link pings the hub this often...
const PING_EVERY: Duration = Duration::from_secs(15);
/// ...and gives up on a hub it has heard nothing from for this long.
const SILENCE: Duration = Duration::from_secs(45);
/// A session that lasted this long starts the backoff afresh.
const STABLE: Duration = Duration::from_secs(10);
const CLOSE_WAIT: Duration = Duration::from_secs(2);

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs the link until the service stops.
pub async fn run(runtime: Arc<ServiceRuntime>, uplink: Arc<Uplink>) {
    let stop = runtime.stop_token();
    tokio::spawn(maintain(Arc::clone(&uplink), stop.clone()));
    let mut delays = backoff();
    let mut failing_since: Option<Instant> = None;
    loop {
        uplink.metrics.set_state(&uplink.service, "connecting");
        let max = runtime.config.limits.max_message_bytes as usize;
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            attempt = transport::connect(&uplink.spec, max) => attempt,
        };
        match attempt {
            Ok(socket) => {
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
                    confirmed: 0,
                    warned: false,
                };
                let end = session.serve(socket, &stop).await;
                if stop.is_cancelled() {
                    return;
                }
                tracing::warn!(service = %uplink.service, hub = %uplink.spec.url, reason = %end, "hub link down; messages are queued until it is back");
                failing_since = Some(Instant::now());
                if started.elapsed() >= STABLE {
                    delays = backoff();
                }
            }
            Err(err) => {
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
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Syncs the queue, drops what outlived the TTL and sets the gauges, every
/// [`SYNC_INTERVAL`] and once more when the service stops.
async fn maintain(uplink: Arc<Uplink>, stop: tokio_util::sync::CancellationToken) {
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
        let queue = Arc::clone(&uplink.queue);
        match tokio::task::spawn_blocking(move || queue.sync()).await {
            Ok(Ok(())) => warned = false,
            Ok(Err(err)) if !warned => {
                warned = true;
                tracing::error!(service = %uplink.service, %err, "cannot sync the uplink queue to disk");
            }
            _ => {}
        }
        uplink.refresh_gauges();
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
    /// Downlink subscriptions the hub confirmed (or refused).
    confirmed: usize,
    warned: bool,
}

impl Session<'_> {
    fn downlink_channels(&self) -> Vec<String> {
        let config = &self.runtime.config;
        config
            .channels
            .iter()
            .filter(|c| config.is_downlink(&c.name))
            .map(|c| c.name.clone())
            .collect()
    }

    /// Serves one connection; returns why it ended.
    async fn serve(
        &mut self,
        socket: HubSocket,
        stop: &tokio_util::sync::CancellationToken,
    ) -> String {
        let uplink: &Arc<Uplink> = self.uplink;
        let (mut sink, mut stream) = socket.split();
        let downlink = self.downlink_channels();
        for channel in &downlink {
            let subscribe = serde_json::json!({
                "type": "subscribe",
                "channel": channel,
                "id": format!("down:{channel}"),
            });
            if let Err(end) = write(&mut sink, Message::text(subscribe.to_string())).await {
                return end;
            }
        }
        if let Err(end) = flush(&mut sink).await {
            return end;
        }
        if downlink.is_empty() {
            uplink.metrics.set_state(&uplink.service, "connected");
        }
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let mut heard = tokio::time::Instant::now();
        loop {
            if let Err(end) = self.send_queued(&mut sink).await {
                return end;
            }
            let room = self.in_flight < MAX_IN_FLIGHT;
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = tokio::time::timeout(CLOSE_WAIT, sink.send(Message::Close(None))).await;
                    return "service stopping".into();
                }
                () = uplink.wake.notified(), if room => {}
                _ = ping.tick() => {
                    if heard.elapsed() > SILENCE {
                        return format!("nothing heard from the hub for {}s", SILENCE.as_secs());
                    }
                    if let Err(end) = write(&mut sink, Message::Ping(Default::default())).await {
                        return end;
                    }
                    if let Err(end) = flush(&mut sink).await {
                        return end;
                    }
                }
                read = tokio::time::timeout(SILENCE, stream.next()) => {
                    heard = tokio::time::Instant::now();
                    match read {
                        Err(_) => return format!("nothing heard from the hub for {}s", SILENCE.as_secs()),
                        Ok(None) => return "the hub closed the connection".into(),
                        Ok(Some(Err(err))) => return format!("read from the hub failed: {err}"),
                        Ok(Some(Ok(Message::Text(text)))) => self.on_frame(&text, downlink.len()),
                        Ok(Some(Ok(Message::Close(frame)))) => {
                            return format!("the hub closed the connection: {frame:?}");
                        }
                        Ok(Some(Ok(_))) => {}
                    }
                }
            }
        }
    }

    /// Sends what the window allows, in batches.
    async fn send_queued(&mut self, sink: &mut Sink) -> Result<(), String> {
        while self.in_flight < MAX_IN_FLIGHT {
            let room = (MAX_IN_FLIGHT - self.in_flight) as usize;
            let batch = self.uplink.queue.after(
                self.sent_through,
                room.min(BATCH_MAX_MESSAGES),
                BATCH_MAX_BYTES,
            );
            let Some(last) = batch.last().map(|r| r.seq) else {
                return Ok(());
            };
            for record in &batch {
                let text = publish_text(&self.uplink.node, record);
                write(sink, Message::text(text)).await?;
            }
            flush(sink).await?;
            self.in_flight += batch.len() as u64;
            self.sent_through = Some(last);
        }
        Ok(())
    }

    /// A frame from the hub: one relay message, or a batch of them.
    fn on_frame(&mut self, text: &str, downlink: usize) {
        let messages: Vec<ServerMessage> = if text.trim_start().starts_with('[') {
            match serde_json::from_str(text) {
                Ok(all) => all,
                Err(err) => {
                    tracing::debug!(service = %self.uplink.service, %err, "unreadable frame from the hub");
                    return;
                }
            }
        } else {
            match serde_json::from_str(text) {
                Ok(one) => vec![one],
                Err(err) => {
                    tracing::debug!(service = %self.uplink.service, %err, "unreadable frame from the hub");
                    return;
                }
            }
        };
        for message in messages {
            self.on_message(message, downlink);
        }
    }

    fn on_message(&mut self, message: ServerMessage, downlink: usize) {
        let service = self.uplink.service.as_str();
        let metrics = &self.uplink.metrics;
        match message {
            ServerMessage::Published {
                id: Some(RequestId::Number(seq)),
                ..
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let delivered = self.uplink.queue.remove_through(seq);
                metrics
                    .delivered
                    .with_label_values(&[service])
                    .inc_by(delivered);
                self.uplink.refresh_gauges();
            }
            ServerMessage::Error {
                id: Some(RequestId::Number(seq)),
                code,
                message,
                ..
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let delivered = self.uplink.queue.remove_through(seq.saturating_sub(1));
                metrics
                    .delivered
                    .with_label_values(&[service])
                    .inc_by(delivered);
                let rejected = self.uplink.queue.remove_through(seq);
                metrics.drop_n(service, "rejected", rejected);
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(service, code = code.as_str(), %message, "the hub refused an uplink message; it is dropped (counted as rejected)");
                }
            }
            ServerMessage::Subscribed { .. } => self.confirm(downlink),
            ServerMessage::Error {
                id: Some(RequestId::Text(id)),
                code,
                message,
                ..
            } if id.starts_with("down:") => {
                tracing::warn!(service, channel = &id[5..], code = code.as_str(), %message, "the hub refused a downlink subscription");
                self.confirm(downlink);
            }
            ServerMessage::Message {
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
            _ => {}
        }
    }

    fn confirm(&mut self, downlink: usize) {
        self.confirmed += 1;
        if self.confirmed == downlink {
            self.uplink
                .metrics
                .set_state(&self.uplink.service, "connected");
        }
    }
}

type Sink = futures_util::stream::SplitSink<HubSocket, Message>;

async fn write(sink: &mut Sink, message: Message) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, sink.feed(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("write to the hub failed: {err}")),
        Err(_) => Err(format!(
            "the hub took no bytes for {}s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

async fn flush(sink: &mut Sink) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, sink.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("write to the hub failed: {err}")),
        Err(_) => Err(format!(
            "the hub took no bytes for {}s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

/// The relay publish that carries one queued message to the hub: its
/// sequence is both the request id (the hub's `published` reply is the
/// acknowledgement) and the origin's.
pub fn publish_text(node: &str, record: &super::record::Record) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let origin = Origin {
        node: node.to_string(),
        seq: record.seq,
    };
    format!(
        r#"{{"type":"publish","id":{seq},"channel":{channel},"data":{data},"origin":{origin}}}"#,
        seq = record.seq,
        channel = quote(&record.channel),
        data = record.data,
        origin = serde_json::to_string(&origin).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewire_api::wire::{ClientMessage, parse_client_message};

    #[test]
    fn a_queued_message_goes_up_as_a_relay_publish_with_its_origin() {
        let record = super::super::record::Record {
            seq: 42,
            enqueued_ms: 0,
            channel: "tele\"metry".into(),
            data: r#"{"t":21.5,"s":[1,"x"]}"#.into(),
        };
        let parsed = parse_client_message(&publish_text("edge-1", &record)).unwrap();
        assert_eq!(
            parsed,
            ClientMessage::Publish {
                id: Some(RequestId::Number(42)),
                channel: "tele\"metry".into(),
                data: serde_json::json!({"t": 21.5, "s": [1, "x"]}),
                origin: Some(Origin {
                    node: "edge-1".into(),
                    seq: 42
                }),
            }
        );
    }
}
