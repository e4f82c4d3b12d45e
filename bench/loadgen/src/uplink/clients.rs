//! The two systems' clients. edgewire: publishers are relay WebSocket
//! clients of the edge agents (one publish per frame, no `id`, so no
//! reply), the subscriber a relay client of the hub in batch mode. NATS:
//! publishers are NATS clients of the leaf servers publishing to
//! `up.<edge>`, which the leaf's stream `UP` stores; the hub's stream `UP`
//! sources every leaf's stream across its JetStream domain (`edge<i>`), and
//! the subscriber reads the hub's stream with an ordered push consumer.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::dial::{Dial, Dialect, Ws, loopback_server, next_deliveries, publish_frame, subscribe};

/// The edgewire channel and the NATS stream the messages go up on.
pub const CHANNEL: &str = "up";
const STREAM: &str = "UP";

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum System {
    Edgewire,
    Nats,
}

async fn nats_connect(url: &str) -> anyhow::Result<async_nats::Client> {
    loopback_server(url, "nats://")?;
    async_nats::ConnectOptions::new()
        // The load generator decides when to reconnect (after the hub's
        // return), so the client's own backoff adds nothing to the figures.
        .max_reconnects(Some(1))
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

fn edgewire_dial(dialect: Dialect) -> Dial {
    Dial {
        dialect,
        source: vec![std::net::IpAddr::from([127, 0, 0, 1])],
        timeout: 60,
    }
}

/// The NATS streams: one per leaf (`UP` in domain `edge<i>`, subject
/// `up.<i>`, on disk) and the hub's (`UP` in domain `hub`, on disk),
/// sourcing each leaf's. Made fresh for each run.
pub async fn nats_streams(edge_urls: &[String], hub_url: &str) -> anyhow::Result<()> {
    for (i, url) in edge_urls.iter().enumerate() {
        let client = nats_connect(url).await?;
        jetstream::new(client)
            .create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![format!("{CHANNEL}.{i}")],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .with_context(|| format!("the stream on leaf {i}"))?;
    }
    let sources = (0..edge_urls.len())
        .map(|i| stream::Source {
            name: STREAM.into(),
            external: Some(stream::External {
                api_prefix: format!("$JS.edge{i}.API"),
                delivery_prefix: None,
            }),
            ..Default::default()
        })
        .collect();
    let hub = nats_connect(hub_url).await?;
    jetstream::new(hub)
        .create_stream(stream::Config {
            name: STREAM.into(),
            sources: Some(sources),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("the hub's stream")?;
    Ok(())
}

pub enum Publisher {
    Relay(Box<Ws>),
    Nats {
        client: async_nats::Client,
        subject: String,
    },
}

impl Publisher {
    /// Publisher `index`, a client of the edge at `url`.
    pub async fn connect(system: System, url: &str, index: usize) -> anyhow::Result<Publisher> {
        Ok(match system {
            System::Edgewire => Publisher::Relay(Box::new(
                edgewire_dial(Dialect::Relay).connect(url, 0).await?,
            )),
            System::Nats => Publisher::Nats {
                client: nats_connect(url).await?,
                subject: format!("{CHANNEL}.{index}"),
            },
        })
    }

    /// Sends one payload; `flush` pushes it (and anything fed before it)
    /// onto the socket now, otherwise it may wait for the next flush.
    pub async fn send(&mut self, payload: String, flush: bool) -> anyhow::Result<()> {
        match self {
            Publisher::Relay(ws) => {
                let frame = Message::text(publish_frame(Dialect::Relay, CHANNEL, &payload));
                if flush {
                    ws.send(frame).await?;
                } else {
                    ws.feed(frame).await?;
                }
            }
            // The NATS client writes whatever it has queued as soon as its
            // connection task runs: it batches on its own.
            Publisher::Nats { client, subject } => {
                client.publish(subject.clone(), payload.into()).await?;
            }
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Publisher::Relay(ws) => ws.flush().await?,
            Publisher::Nats { client, .. } => client.flush().await?,
        }
        Ok(())
    }
}

/// The hub's subscriber.
pub enum Subscription {
    Relay(Box<Ws>),
    Nats {
        _client: async_nats::Client,
        messages: Box<consumer::push::Ordered>,
    },
}

/// One delivered payload, with its position in the hub's stream (NATS).
pub struct Delivery {
    pub payload: String,
    pub stream_seq: Option<u64>,
}

impl Subscription {
    /// Subscribes at the hub; a NATS subscriber starts after `after`, the
    /// last stream sequence it has seen, or at the stream's start.
    pub async fn open(system: System, hub_url: &str, after: Option<u64>) -> anyhow::Result<Self> {
        match system {
            System::Edgewire => {
                let mut ws = edgewire_dial(Dialect::RelayBatch)
                    .connect(hub_url, 0)
                    .await?;
                subscribe(&mut ws, Dialect::RelayBatch, CHANNEL).await?;
                Ok(Subscription::Relay(Box::new(ws)))
            }
            System::Nats => {
                let client = nats_connect(hub_url).await?;
                let js = jetstream::new(client.clone());
                let stream = js.get_stream(STREAM).await.context("the hub's stream")?;
                let deliver_policy = match after {
                    Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: seq + 1,
                    },
                    None => consumer::DeliverPolicy::All,
                };
                let consumer = stream
                    .create_consumer(consumer::push::OrderedConfig {
                        deliver_subject: client.new_inbox(),
                        deliver_policy,
                        ..Default::default()
                    })
                    .await
                    .context("an ordered consumer on the hub's stream")?;
                let messages = consumer.messages().await?;
                Ok(Subscription::Nats {
                    _client: client,
                    messages: Box::new(messages),
                })
            }
        }
    }

    /// The next delivered payloads (at least one).
    pub async fn next(&mut self) -> anyhow::Result<Vec<Delivery>> {
        match self {
            Subscription::Relay(ws) => Ok(next_deliveries(ws, Dialect::RelayBatch)
                .await?
                .into_iter()
                .map(|payload| Delivery {
                    payload,
                    stream_seq: None,
                })
                .collect()),
            Subscription::Nats { messages, .. } => {
                let message = messages
                    .next()
                    .await
                    .context("the consumer ended")?
                    .map_err(|e| anyhow::anyhow!("the consumer failed: {e}"))?;
                let stream_seq = message
                    .info()
                    .map_err(|e| anyhow::anyhow!("a message without stream info: {e}"))?
                    .stream_sequence;
                Ok(vec![Delivery {
                    payload: String::from_utf8_lossy(&message.payload).into_owned(),
                    stream_seq: Some(stream_seq),
                }])
            }
        }
    }
}
