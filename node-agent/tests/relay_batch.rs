//! Batch mode of the relay: a client that asks for the `edgewire.batch.v1`
//! subprotocol gets JSON arrays of messages, packed while they wait for it;
//! a client that does not ask, or asks for a subprotocol the agent does not
//! speak, gets one JSON object per frame as before.

mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::header;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const CONFIG: &str = r#"
services:
  - name: edge
    port: 0
    handlers:
      - {name: echo, kind: echo, path: /}
    channels:
      - {name: chat}
"#;

const BATCH: &str = "edgewire.batch.v1";
const MESSAGES: usize = 500;

async fn connect_asking(
    addr: std::net::SocketAddr,
    protocols: &str,
) -> Result<(Client, Option<String>), WsError> {
    let mut request = format!("ws://{addr}/relay").into_client_request()?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        protocols.parse().expect("a header value"),
    );
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")?;
    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    Ok((ws, chosen))
}

/// The next text frame as an array of relay messages.
async fn next_batch(ws: &mut Client) -> Vec<Value> {
    match serde_json::from_str(&next_text(ws).await).expect("JSON") {
        Value::Array(messages) => {
            assert!(!messages.is_empty(), "a batch holds at least one message");
            messages
        }
        other => panic!("a batch client got a frame that is not an array: {other}"),
    }
}

async fn publish_burst(ws: &mut Client) {
    for n in 0..MESSAGES {
        ws.feed(Message::text(
            json!({"type": "publish", "channel": "chat", "data": n}).to_string(),
        ))
        .await
        .expect("feed");
    }
    ws.flush().await.expect("flush");
}

#[tokio::test]
async fn a_batch_client_gets_arrays_packed_while_messages_wait_others_get_one_per_frame() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let (mut batched, chosen) = connect_asking(addr, &format!("chat.v2, {BATCH}"))
        .await
        .expect("batch handshake");
    assert_eq!(
        chosen.as_deref(),
        Some(BATCH),
        "the agent names the mode it chose"
    );
    send_text(
        &mut batched,
        json!({"type": "subscribe", "channel": "chat", "id": 1}).to_string(),
    )
    .await;
    assert_eq!(
        next_batch(&mut batched).await,
        [json!({"type": "subscribed", "id": 1, "channel": "chat"})],
        "replies come as arrays too"
    );
    let mut plain = connect(addr, "/relay").await;
    let reply = request(&mut plain, json!({"type": "subscribe", "channel": "chat"})).await;
    assert_eq!(reply["type"], "subscribed");

    // The batch client publishes a burst on its own channel: while the agent
    // reads it, its copies wait and leave packed.
    publish_burst(&mut batched).await;
    let mut got = Vec::new();
    let mut frames = 0;
    while got.len() < MESSAGES {
        for message in next_batch(&mut batched).await {
            assert_eq!(message["type"], "message", "{message}");
            got.push(message["data"].as_u64().expect("a number") as usize);
        }
        frames += 1;
    }
    assert_eq!(
        got,
        (0..MESSAGES).collect::<Vec<_>>(),
        "all, once, in order"
    );
    assert!(
        frames < MESSAGES,
        "{MESSAGES} messages came in {frames} frames: nothing was packed"
    );
    for n in 0..MESSAGES {
        let message = next_json(&mut plain).await;
        assert_eq!(
            message,
            json!({"type": "message", "channel": "chat", "data": n}),
            "the default client gets one object per frame"
        );
    }
    // A run of deliveries is counted once it is flushed, which may be just
    // after the client has read it: wait for the count, then it must be
    // exact.
    let out = r#"edgewire_messages_total{direction="out",service="edge"}"#;
    let expected = (2 * MESSAGES + 2) as f64;
    assert_eq!(
        agent.wait_metric(out, expected).await,
        expected,
        "messages are counted, not frames"
    );
}

/// The opening handshake by hand (hyper's client), to see what the agent
/// answers to a subprotocol it does not speak.
async fn handshake_asking(
    addr: std::net::SocketAddr,
    protocols: &str,
) -> (
    Option<String>,
    WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http handshake");
    tokio::spawn(conn.with_upgrades());
    let request = hyper::Request::get("/relay")
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, generate_key())
        .header(header::SEC_WEBSOCKET_PROTOCOL, protocols)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(response.status(), 101, "the upgrade is not refused");
    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let upgraded = hyper::upgrade::on(response).await.expect("upgraded");
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    (chosen, ws)
}

#[tokio::test]
async fn an_unknown_subprotocol_gets_the_default_framing_and_none_named() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let (chosen, mut ws) = handshake_asking(addr, "edgewire.batch.v9").await;
    assert_eq!(
        chosen, None,
        "no subprotocol is named for one the agent does not speak"
    );
    ws.send(Message::text(
        json!({"type": "subscribe", "channel": "chat", "id": 1}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!({"type": "publish", "channel": "chat", "data": "hi"}).to_string(),
    ))
    .await
    .unwrap();
    let mut texts = Vec::new();
    while texts.len() < 2 {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                texts.push(serde_json::from_str::<Value>(text.as_str()).unwrap())
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no reply: {other:?}"),
        }
    }
    assert_eq!(
        texts,
        [
            json!({"type": "subscribed", "id": 1, "channel": "chat"}),
            json!({"type": "message", "channel": "chat", "data": "hi"})
        ]
    );
    // A strict client (tungstenite's) then refuses the connection itself,
    // as RFC 6455 tells a client that needs the subprotocol to do.
    match connect_asking(addr, "edgewire.batch.v9").await {
        Err(WsError::Protocol(err)) => assert!(
            err.to_string().to_lowercase().contains("subprotocol"),
            "{err}"
        ),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("tungstenite accepted an answer without its subprotocol"),
    }
    // The agent is unharmed.
    let mut plain = connect(addr, "/relay").await;
    let reply = request(&mut plain, json!({"type": "subscribe", "channel": "chat"})).await;
    assert_eq!(reply["type"], "subscribed");
}

#[tokio::test]
async fn batch_mode_is_only_for_the_relay() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert(header::SEC_WEBSOCKET_PROTOCOL, BATCH.parse().unwrap());
    let refused = tokio_tungstenite::connect_async(request).await;
    assert!(
        refused.is_err(),
        "the echo handler names no subprotocol, so a client needing one refuses"
    );
}
