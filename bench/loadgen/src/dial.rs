//! Connections and the dialects: `raw` (text echo, or broadcast of any
//! text), `relay` (edgewire's JSON envelope), `relay-batch` (the same in
//! batch mode: the `edgewire.batch.v1` subprotocol, arrays of messages per
//! frame) and `nats` (the NATS protocol over WebSocket). Connections can be spread over several loopback source
//! addresses, since one source address runs out of ephemeral ports near 28k.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Dialect {
    Raw,
    Relay,
    RelayBatch,
    Nats,
}

/// The subprotocol that asks edgewire's relay for batch mode.
const BATCH_SUBPROTOCOL: &str = "edgewire.batch.v1";

/// How to reach a server: the dialect and the source addresses to spread
/// connections over.
#[derive(Args, Clone, Debug)]
pub struct Dial {
    #[arg(long, value_enum, default_value_t = Dialect::Raw)]
    pub dialect: Dialect,
    /// Comma-separated loopback source addresses to spread connections over.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub source: Vec<IpAddr>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// `ip:port` of a `ws://` URL, refusing anything that is not loopback.
pub fn server_of(url: &str) -> anyhow::Result<SocketAddr> {
    loopback_server(url, "ws://")
}

/// `ip:port` of a URL of the scheme `prefix` (e.g. `nats://`), refusing
/// anything that is not loopback.
pub fn loopback_server(url: &str, prefix: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix(prefix)
        .with_context(|| format!("only {prefix} URLs"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("{authority} is not ip:port"))?;
    if !addr.ip().is_loopback() {
        bail!("benchmarks only talk to loopback; {addr} is not");
    }
    Ok(addr)
}

impl Dial {
    /// Connection number `n` to `url`, from the `n`th source address (round
    /// robin), with the dialect's session set up.
    pub async fn connect(&self, url: &str, n: usize) -> anyhow::Result<Ws> {
        let server = server_of(url)?;
        let (socket, source) = if server.is_ipv6() {
            (
                TcpSocket::new_v6()?,
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            )
        } else {
            (TcpSocket::new_v4()?, self.source[n % self.source.len()])
        };
        if !source.is_loopback() {
            bail!("source address {source} is not loopback");
        }
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(server).await?;
        tcp.set_nodelay(true)?;
        let mut request = url.into_client_request()?;
        if self.dialect == Dialect::RelayBatch {
            // tungstenite fails the handshake unless the server chooses it.
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static(BATCH_SUBPROTOCOL),
            );
        }
        let (mut ws, _) =
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)).await?;
        if self.dialect == Dialect::Nats {
            // INFO, then CONNECT and a PING/PONG so the session is live.
            next_text(&mut ws).await?;
            ws.send(Message::text(
                "CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n",
            ))
            .await?;
            while !next_text(&mut ws).await?.contains("PONG") {}
        }
        Ok(ws)
    }
}

pub async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await.context("closed")?? {
            Message::Text(t) => return Ok(t.to_string()),
            Message::Binary(b) => return Ok(String::from_utf8_lossy(&b).into_owned()),
            Message::Close(f) => bail!("closed by the server: {f:?}"),
            _ => {}
        }
    }
}

/// The payloads of the messages delivered in one NATS frame: a server may
/// put several `MSG`s (and a `PING`) into one WebSocket frame.
pub fn nats_payloads(frame: &str) -> (Vec<String>, bool) {
    let mut payloads = Vec::new();
    let mut ping = false;
    let mut lines = frame.split("\r\n");
    while let Some(line) = lines.next() {
        if line.starts_with("MSG ") {
            payloads.push(lines.next().unwrap_or_default().to_string());
        } else if line == "PING" {
            ping = true;
        }
    }
    (payloads, ping)
}

/// What the load generator reads of a relay message: its type and, for a
/// delivery, its string payload. Parsed in place, so that the client's own
/// parsing weighs on the figures as little as NATS' line protocol does.
#[derive(serde::Deserialize)]
struct RelayMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<Cow<'a, str>>,
}

impl RelayMessage<'_> {
    /// The payload of a delivery, borrowed; `None` for a reply; an error
    /// for an error.
    fn payload_ref(&self, frame: &str) -> anyhow::Result<Option<&str>> {
        match self.kind.as_ref() {
            "message" => Ok(Some(self.data.as_deref().unwrap_or_default())),
            "error" => bail!("the relay answered an error: {frame}"),
            _ => Ok(None),
        }
    }

    /// The payload of a delivery, owned; see [`RelayMessage::payload_ref`].
    fn payload(self, frame: &str) -> anyhow::Result<Option<String>> {
        Ok(self.payload_ref(frame)?.map(str::to_owned))
    }
}

/// The `data` strings of the messages in one batch-mode frame (a JSON array
/// of relay messages); replies in it are skipped.
pub fn batch_payloads(frame: &str) -> anyhow::Result<Vec<String>> {
    let messages: Vec<RelayMessage> = serde_json::from_str(frame)
        .with_context(|| format!("not a JSON array of relay messages: {frame}"))?;
    let mut payloads = Vec::with_capacity(messages.len());
    for m in messages {
        if let Some(payload) = m.payload(frame)? {
            payloads.push(payload);
        }
    }
    Ok(payloads)
}

/// Reads until at least one delivered message arrives; returns the payloads
/// of all that came in that frame. Relay payloads are the `data` string;
/// raw payloads are the text itself.
pub async fn next_deliveries(ws: &mut Ws, dialect: Dialect) -> anyhow::Result<Vec<String>> {
    loop {
        let text = next_text(ws).await?;
        match dialect {
            Dialect::Raw => return Ok(vec![text]),
            Dialect::Relay => {
                let m: RelayMessage = serde_json::from_str(&text)
                    .with_context(|| format!("not a relay message: {text}"))?;
                if let Some(payload) = m.payload(&text)? {
                    return Ok(vec![payload]);
                }
            }
            Dialect::RelayBatch => {
                let payloads = batch_payloads(&text)?;
                if !payloads.is_empty() {
                    return Ok(payloads);
                }
            }
            Dialect::Nats => {
                let (payloads, ping) = nats_payloads(&text);
                if ping {
                    ws.send(Message::text("PONG\r\n")).await?;
                }
                if !payloads.is_empty() {
                    return Ok(payloads);
                }
            }
        }
    }
}

/// Reads until at least one delivered message arrives and hands each payload
/// of that frame to `each`, borrowed from the frame as read: no copy and no
/// allocation per message, as a client that keeps up with a burst would do
/// (and as the NATS side does too). Returns how many payloads it handed on.
pub async fn each_delivery(
    ws: &mut Ws,
    dialect: Dialect,
    mut each: impl FnMut(&str),
) -> anyhow::Result<usize> {
    loop {
        let message = ws.next().await.context("closed")??;
        let text = match &message {
            Message::Text(t) => t.as_str(),
            Message::Binary(b) => std::str::from_utf8(b).context("a binary frame not in UTF-8")?,
            Message::Close(f) => bail!("closed by the server: {f:?}"),
            _ => continue,
        };
        let mut handed = 0;
        let mut pong = false;
        match dialect {
            Dialect::Raw => {
                each(text);
                handed = 1;
            }
            Dialect::Relay => {
                let m: RelayMessage = serde_json::from_str(text)
                    .with_context(|| format!("not a relay message: {text}"))?;
                if let Some(payload) = m.payload_ref(text)? {
                    each(payload);
                    handed = 1;
                }
            }
            Dialect::RelayBatch => {
                let messages: Vec<RelayMessage> = serde_json::from_str(text)
                    .with_context(|| format!("not a JSON array of relay messages: {text}"))?;
                for m in &messages {
                    if let Some(payload) = m.payload_ref(text)? {
                        each(payload);
                        handed += 1;
                    }
                }
            }
            Dialect::Nats => {
                let mut lines = text.split("\r\n");
                while let Some(line) = lines.next() {
                    if line.starts_with("MSG ") {
                        each(lines.next().unwrap_or_default());
                        handed += 1;
                    } else if line == "PING" {
                        pong = true;
                    }
                }
            }
        }
        if pong {
            ws.send(Message::text("PONG\r\n")).await?;
        }
        if handed > 0 {
            return Ok(handed);
        }
    }
}

/// Subscribes a connection to `topic` in the dialect; for raw, nothing to do.
pub async fn subscribe(ws: &mut Ws, dialect: Dialect, topic: &str) -> anyhow::Result<()> {
    match dialect {
        Dialect::Raw => Ok(()),
        Dialect::Relay | Dialect::RelayBatch => {
            ws.send(Message::text(
                json!({"type": "subscribe", "channel": topic}).to_string(),
            ))
            .await?;
            let reply = next_text(ws).await?;
            anyhow::ensure!(reply.contains("subscribed"), "subscribe refused: {reply}");
            Ok(())
        }
        Dialect::Nats => {
            ws.send(Message::text(format!("SUB {topic} 1\r\nPING\r\n")))
                .await?;
            while !next_text(ws).await?.contains("PONG") {}
            Ok(())
        }
    }
}

/// A relay publish, written straight from borrowed strings, as NATS' `PUB`
/// line is: a JSON tree built per message made this client spend far more
/// CPU per publish in the relay dialect than in NATS' (see "The agent" in
/// `bench/README.md`), and client and servers share the cores.
#[derive(serde::Serialize)]
struct RelayPublish<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'a str,
    data: &'a str,
}

pub fn publish_frame(dialect: Dialect, topic: &str, payload: &str) -> String {
    match dialect {
        Dialect::Raw => payload.to_string(),
        Dialect::Relay | Dialect::RelayBatch => {
            let publish = RelayPublish {
                kind: "publish",
                channel: topic,
                data: payload,
            };
            serde_json::to_string(&publish).expect("a struct of strings serialises")
        }
        Dialect::Nats => format!("PUB {topic} {}\r\n{payload}\r\n", payload.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_publishes_are_the_json_object_of_the_protocol() {
        let frame = publish_frame(Dialect::Relay, "mesh", "say \"hi\"\n");
        assert_eq!(
            frame,
            r#"{"type":"publish","channel":"mesh","data":"say \"hi\"\n"}"#
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&frame).unwrap(),
            json!({"type": "publish", "channel": "mesh", "data": "say \"hi\"\n"})
        );
    }

    #[test]
    fn several_nats_messages_in_one_frame() {
        let frame = "MSG fan 1 2\r\nm1\r\nPING\r\nMSG fan 1 2\r\nm2\r\n";
        assert_eq!(nats_payloads(frame), (vec!["m1".into(), "m2".into()], true));
        assert_eq!(nats_payloads("PONG\r\n"), (vec![], false));
    }

    #[test]
    fn batch_frames_carry_several_messages() {
        let frame = r#"[{"type":"subscribed","channel":"fan"},{"type":"message","channel":"fan","data":"m1"},{"type":"message","channel":"fan","data":"m2"}]"#;
        assert_eq!(batch_payloads(frame).unwrap(), ["m1", "m2"]);
        assert!(batch_payloads(r#"{"type":"message"}"#).is_err());
    }

    #[test]
    fn only_loopback_targets() {
        assert!(server_of("ws://127.0.0.1:80/relay").is_ok());
        assert!(server_of("ws://[::1]:80/").is_ok());
        assert!(server_of("ws://10.0.0.1:80/").is_err());
        assert!(server_of("wss://127.0.0.1:80/").is_err());
        assert!(loopback_server("nats://127.0.0.20:4222", "nats://").is_ok());
        assert!(loopback_server("nats://10.0.0.1:4222", "nats://").is_err());
    }
}
