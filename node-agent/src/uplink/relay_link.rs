//! A hub that is an edgewire relay: the link is a relay client. Publishes
//! carry their `origin` and their sequence as `id`; the `published` reply
//! is the acknowledgement (see README, "Edge and hub").

use std::collections::VecDeque;
use std::time::Duration;

use edgewire_api::wire::{Origin, RequestId, ServerMessage};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

use super::hub_link::{Event, HubLink};
use super::record::Record;
use super::transport::HubSocket;

/// Every write to the hub must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A hub heard nothing from (not even a pong) for this long is gone.
const SILENCE: Duration = Duration::from_secs(45);
const CLOSE_WAIT: Duration = Duration::from_secs(2);

type Sink = SplitSink<HubSocket, Message>;

pub struct RelayLink {
    sink: Sink,
    stream: SplitStream<HubSocket>,
    node: String,
    /// Events read from a batch frame and not yet taken.
    pending: VecDeque<Event>,
    /// Downlink subscriptions not yet confirmed.
    unconfirmed: usize,
    /// The largest message the hub reads, as its upgrade answer said (an
    /// older hub does not say).
    max_message_bytes: Option<usize>,
    heard: Instant,
}

impl RelayLink {
    /// Subscribes to the downlink channels on a fresh connection.
    pub async fn start(
        (socket, max_message_bytes): (HubSocket, Option<usize>),
        node: &str,
        downlink: &[String],
    ) -> Result<RelayLink, String> {
        let (sink, stream) = socket.split();
        let mut link = RelayLink {
            sink,
            stream,
            node: node.to_string(),
            pending: VecDeque::new(),
            unconfirmed: downlink.len(),
            max_message_bytes,
            heard: Instant::now(),
        };
        for channel in downlink {
            let subscribe = serde_json::json!({
                "type": "subscribe",
                "channel": channel,
                "id": format!("down:{channel}"),
            });
            link.write(Message::text(subscribe.to_string())).await?;
        }
        link.flush().await?;
        if downlink.is_empty() {
            link.pending.push_back(Event::Ready);
        }
        Ok(link)
    }

    async fn write(&mut self, message: Message) -> Result<(), String> {
        within_deadline(self.sink.feed(message)).await
    }

    async fn flush(&mut self) -> Result<(), String> {
        within_deadline(self.sink.flush()).await
    }

    /// The events in a frame: one relay message, or a batch of them.
    fn read_frame(&mut self, text: &str) {
        let parsed = if text.trim_start().starts_with('[') {
            serde_json::from_str::<Vec<ServerMessage>>(text)
        } else {
            serde_json::from_str::<ServerMessage>(text).map(|one| vec![one])
        };
        match parsed {
            Ok(messages) => {
                for message in messages {
                    let event = self.event(message);
                    self.pending.push_back(event);
                }
            }
            Err(err) => tracing::debug!(%err, "unreadable frame from the hub"),
        }
    }

    fn event(&mut self, message: ServerMessage) -> Event {
        match message {
            ServerMessage::Published {
                id: Some(RequestId::Number(seq)),
                ..
            } => Event::Acked(seq),
            ServerMessage::Error {
                id: Some(RequestId::Number(seq)),
                code,
                message,
                ..
            } => Event::Rejected {
                seq,
                why: format!("{}: {message}", code.as_str()),
            },
            ServerMessage::Subscribed {
                id: Some(RequestId::Text(id)),
                ..
            } if id.starts_with("down:") => self.confirmed(),
            ServerMessage::Error {
                id: Some(RequestId::Text(id)),
                code,
                message,
                ..
            } if id.starts_with("down:") => {
                tracing::warn!(channel = &id[5..], code = code.as_str(), %message, "the hub refused a downlink subscription");
                self.confirmed()
            }
            ServerMessage::Message {
                channel,
                data,
                origin,
            } => Event::Down {
                channel,
                data,
                origin,
            },
            _ => Event::Nothing,
        }
    }

    fn confirmed(&mut self) -> Event {
        self.unconfirmed = self.unconfirmed.saturating_sub(1);
        if self.unconfirmed == 0 {
            Event::Ready
        } else {
            Event::Nothing
        }
    }
}

impl HubLink for RelayLink {
    fn takes(&self, record: &Record) -> bool {
        let Some(max) = self.max_message_bytes else {
            return true;
        };
        // The publish around the data is short: build it only when the
        // data alone comes near the limit. A quoted name is at most six
        // bytes per byte (`\u00XX`).
        let around = 128 + 6 * (record.channel.len() + self.node.len());
        record.data.len() + around <= max || publish_text(&self.node, record).len() <= max
    }

    async fn send(&mut self, batch: &[Record]) -> Result<(), String> {
        // One deadline for the whole batch: a timer per message would cost
        // more than writing it.
        let (sink, node) = (&mut self.sink, self.node.as_str());
        within_deadline(async move {
            for record in batch {
                sink.feed(Message::text(publish_text(node, record))).await?;
            }
            sink.flush().await
        })
        .await
    }

    async fn next(&mut self) -> Result<Event, String> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            match self.stream.next().await {
                None => return Err("the hub closed the connection".into()),
                Some(Err(err)) => return Err(format!("read from the hub failed: {err}")),
                Some(Ok(frame)) => {
                    self.heard = Instant::now();
                    match frame {
                        Message::Text(text) => self.read_frame(&text),
                        Message::Close(frame) => {
                            return Err(format!("the hub closed the connection: {frame:?}"));
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    async fn keepalive(&mut self) -> Result<(), String> {
        if self.heard.elapsed() > SILENCE {
            return Err(format!(
                "nothing heard from the hub for {}s",
                SILENCE.as_secs()
            ));
        }
        self.write(Message::Ping(Default::default())).await?;
        self.flush().await
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.sink.send(Message::Close(None))).await;
    }
}

/// Runs a write to the hub within [`WRITE_TIMEOUT`].
async fn within_deadline(
    write: impl Future<Output = Result<(), tungstenite::Error>>,
) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
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
pub fn publish_text(node: &str, record: &Record) -> String {
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
        let record = Record {
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
