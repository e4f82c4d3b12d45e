//! A hub that is a NATS server with JetStream: channel `C` is subject
//! `<subjectPrefix>.C`; each uplinked message is published to the stream
//! with `Nats-Msg-Id: <node>:<seq>`, so JetStream drops a resend within
//! the stream's duplicate window, and its publish ack is the
//! acknowledgement. Downlink channels are read by ordered consumers that
//! start at the newest message. The origin travels in the headers
//! `Edgewire-Origin-Node` and `Edgewire-Origin-Seq`.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use edgewire_api::HubSpec;
use edgewire_api::wire::Origin;
use futures_util::stream::{BoxStream, FuturesOrdered, SelectAll};
use futures_util::{Future, StreamExt};

use super::hub_link::{Event, HubLink};
use super::record::Record;
use super::transport::ConnectError;

const ORIGIN_NODE: &str = "Edgewire-Origin-Node";
const ORIGIN_SEQ: &str = "Edgewire-Origin-Seq";
/// Connecting, and every publish handed to the client, within this.
const TIMEOUT: Duration = Duration::from_secs(10);

type Ack = Pin<Box<dyn Future<Output = (u64, Result<(), (bool, String)>)> + Send>>;
type Down = BoxStream<'static, (String, Result<jetstream::Message, String>)>;

pub struct NatsLink {
    client: async_nats::Client,
    js: jetstream::Context,
    spec: HubSpec,
    node: String,
    acks: FuturesOrdered<Ack>,
    downs: SelectAll<Down>,
    ready: bool,
}

/// Whether rustls failed somewhere in `err`'s chain of causes.
fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(cause) = next {
        let io_inner = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if cause.is::<rustls::Error>() || io_inner.is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// Signs in with the credentials in `path`, read anew at each connect (a
/// rotated seed is used from the next one): a `.creds` file (the user's JWT
/// and seed) or an NKEY seed alone.
async fn with_credentials(
    options: async_nats::ConnectOptions,
    path: &str,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let failed = |why: String| ConnectError::Credentials {
        path: path.to_string(),
        why,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if text.contains("BEGIN NATS USER JWT") {
        options
            .credentials(&text)
            .map_err(|e| failed(e.to_string()))
    } else {
        Ok(options.nkey(text.trim().to_string()))
    }
}

/// Connects, makes the stream when missing, and starts a consumer per
/// downlink channel.
pub async fn connect(
    spec: &HubSpec,
    node: &str,
    downlink: &[String],
) -> Result<NatsLink, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .connection_timeout(TIMEOUT)
        .name(format!("edgewire-agent {node}"));
    if let Some(token) = super::transport::read_token(spec).await? {
        options = options.token(token);
    }
    if let Some(path) = &spec.credentials_file {
        options = with_credentials(options, path).await?;
    }
    if let Some(ca) = &spec.ca_file {
        // Only this CA is trusted, and the server must speak TLS.
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    let url = spec.url.clone();
    let client = match tokio::time::timeout(TIMEOUT, options.connect(url.as_str())).await {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => {
            use async_nats::ConnectErrorKind as Kind;
            return Err(match err.kind() {
                Kind::Authentication | Kind::AuthorizationViolation => {
                    ConnectError::Unauthorized(err.to_string())
                }
                Kind::Tls => ConnectError::Tls(err.to_string()),
                // A certificate the CA does not vouch for comes as an I/O
                // error carrying rustls' own.
                _ if is_tls_failure(&err) => ConnectError::Tls(err.to_string()),
                _ => ConnectError::Unreachable(err.to_string()),
            });
        }
        Err(_) => {
            return Err(ConnectError::Unreachable(format!(
                "no answer within {}s",
                TIMEOUT.as_secs()
            )));
        }
    };
    let js = jetstream::new(client.clone());
    let config = stream::Config {
        name: spec.stream_name().to_string(),
        subjects: vec![spec.subject(">")],
        ..Default::default()
    };
    let handshake = |err: String| ConnectError::Handshake(format!("JetStream: {err}"));
    let stream = tokio::time::timeout(TIMEOUT, js.get_or_create_stream(config))
        .await
        .map_err(|_| handshake("no answer".into()))?
        .map_err(|e| handshake(e.to_string()))?;
    let mut downs = SelectAll::new();
    for channel in downlink {
        let config = consumer::pull::OrderedConfig {
            filter_subject: spec.subject(channel),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| handshake(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| handshake(e.to_string()))?;
        let channel = channel.clone();
        let down: Down = messages
            .map(move |m| (channel.clone(), m.map_err(|e| e.to_string())))
            .boxed();
        downs.push(down);
    }
    Ok(NatsLink {
        client,
        js,
        spec: spec.clone(),
        node: node.to_string(),
        acks: FuturesOrdered::new(),
        downs,
        ready: false,
    })
}

impl NatsLink {
    fn down(&self, channel: String, message: &jetstream::Message) -> Event {
        // Another NATS client may publish text that is not JSON: it comes
        // down as a JSON string.
        let data = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let origin = match (header(ORIGIN_NODE), header(ORIGIN_SEQ)) {
            (Some(node), Some(seq)) => seq.parse().ok().map(|seq| Origin { node, seq }),
            _ => None,
        };
        Event::Down {
            channel,
            data,
            origin,
        }
    }
}

impl HubLink for NatsLink {
    fn takes(&self, record: &Record) -> bool {
        // The server's max_payload bounds the payload with its headers
        // (ids, origin: well under 512 bytes for any node name it takes).
        record.data.len() + 512 + self.node.len() <= self.client.server_info().max_payload
    }

    async fn send(&mut self, batch: &[Record]) -> Result<(), String> {
        for record in batch {
            let seq = record.seq;
            let publish = jetstream::context::Publish::build()
                .payload(record.data.clone().into())
                .message_id(format!("{}:{seq}", self.node))
                .header(ORIGIN_NODE, self.node.as_str())
                .header(ORIGIN_SEQ, seq.to_string());
            let subject = self.spec.subject(&record.channel);
            let ack =
                match tokio::time::timeout(TIMEOUT, self.js.send_publish(subject, publish)).await {
                    Ok(Ok(ack)) => ack,
                    Ok(Err(err)) => return Err(format!("publish to JetStream failed: {err}")),
                    Err(_) => return Err("publish to JetStream took too long".into()),
                };
            self.acks.push_back(Box::pin(async move {
                let result = ack.await.map(|_| ()).map_err(|err| {
                    // Gone or not there: send again on the next connection.
                    let retry = matches!(
                        err.kind(),
                        PublishErrorKind::TimedOut
                            | PublishErrorKind::BrokenPipe
                            | PublishErrorKind::StreamNotFound
                    );
                    (retry, err.to_string())
                });
                (seq, result)
            }));
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<Event, String> {
        if !self.ready {
            self.ready = true;
            return Ok(Event::Ready);
        }
        tokio::select! {
            Some((seq, result)) = self.acks.next(), if !self.acks.is_empty() => match result {
                Ok(()) => Ok(Event::Acked(seq)),
                Err((true, why)) => Err(format!("JetStream did not acknowledge: {why}")),
                Err((false, why)) => Ok(Event::Rejected { seq, why }),
            },
            Some((channel, message)) = self.downs.next(), if !self.downs.is_empty() => match message {
                Ok(message) => Ok(self.down(channel, &message)),
                Err(err) => Err(format!("downlink consumer failed: {err}")),
            },
            else => std::future::pending().await,
        }
    }

    async fn keepalive(&mut self) -> Result<(), String> {
        match tokio::time::timeout(TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("the NATS server does not answer: {err}")),
            Err(_) => Err(format!(
                "the NATS server did not answer a ping within {}s",
                TIMEOUT.as_secs()
            )),
        }
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}
