//! The agent's client contract over real sockets: echo, the add handler,
//! channels, relay calls, and every kind of bad input.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

const CONFIG: &str = r#"
services:
  - name: edge
    port: 0
    handlers:
      - {name: echo, kind: echo, path: /}
      - {name: add, kind: add, path: /add}
    channels:
      - {name: chat}
      - {name: sensors}
    limits:
      maxMessageBytes: 1024
"#;

#[tokio::test]
async fn echo_answers_each_text_message() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut ws = connect(addr, "/").await;
    for text in ["Hello, WebSocket!", "", "ünïcödé ✓"] {
        send_text(&mut ws, text).await;
        assert_eq!(next_text(&mut ws).await, format!("Echo: {text}"));
    }
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_messages_total{direction="in",service="edge"}"#
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_messages_total{direction="out",service="edge"}"#
        ),
        3.0
    );
    assert_eq!(
        metric_value(&metrics, r#"edgewire_connections{service="edge"}"#),
        1.0
    );
    assert!(
        metric_value(
            &metrics,
            r#"edgewire_handshake_duration_seconds_count{service="edge"}"#
        ) >= 1.0
    );
    assert!(
        metric_value(
            &metrics,
            r#"edgewire_handler_duration_seconds_count{handler="echo",service="edge"}"#
        ) >= 3.0
    );
}

#[tokio::test]
async fn add_over_http_and_its_errors() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let (status, body) = http_get(addr, "/add?a=1&b=2").await.unwrap();
    assert_eq!(
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        ),
        (200, json!({"result": 3}))
    );
    let (status, body) = http_get(addr, "/add?a=one&b=2").await.unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("must be an integer"), "{body}");
    let (status, _) = http_get(addr, "/nowhere").await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = http_get(addr, "/relay").await.unwrap();
    assert_eq!(status, 426, "the relay path needs a WebSocket upgrade");
    // The service still works after the bad requests.
    let (status, _) = http_get(addr, "/add?a=-4&b=4").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn publish_reaches_every_subscriber_once_in_order() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut subs = Vec::new();
    for i in 0..3 {
        let mut ws = connect(addr, "/relay").await;
        let reply = request(
            &mut ws,
            json!({"type": "subscribe", "channel": "chat", "id": i}),
        )
        .await;
        assert_eq!(
            reply,
            json!({"type": "subscribed", "channel": "chat", "id": i})
        );
        subs.push(ws);
    }
    let mut other = connect(addr, "/relay").await;
    request(
        &mut other,
        json!({"type": "subscribe", "channel": "sensors"}),
    )
    .await;

    let mut publisher = connect(addr, "/relay").await;
    for n in 0..200 {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "chat", "data": {"n": n}}).to_string(),
        )
        .await;
    }
    let ack = request(
        &mut publisher,
        json!({"type": "publish", "channel": "chat", "data": "end", "id": "last"}),
    )
    .await;
    assert_eq!(
        ack,
        json!({"type": "published", "channel": "chat", "id": "last"})
    );

    for ws in &mut subs {
        for n in 0..200 {
            assert_eq!(
                next_json(ws).await,
                json!({"type": "message", "channel": "chat", "data": {"n": n}})
            );
        }
        assert_eq!(next_json(ws).await["data"], "end");
    }
    // Nothing more for the subscribers, nothing at all for the other channel:
    // the next thing each sees is the reply to its own request.
    for ws in subs.iter_mut().chain([&mut other]) {
        let reply = request(
            ws,
            json!({"type": "call", "id": 9, "handler": "add", "args": {"a": 1, "b": 1}}),
        )
        .await;
        assert_eq!(reply["type"], "result", "{reply}");
    }
    agent
        .wait_metric(
            r#"edgewire_message_latency_seconds_count{path="local",service="edge"}"#,
            603.0,
        )
        .await;

    // After unsubscribing, a subscriber gets no more deliveries.
    let reply = request(
        &mut subs[0],
        json!({"type": "unsubscribe", "channel": "chat"}),
    )
    .await;
    assert_eq!(reply, json!({"type": "unsubscribed", "channel": "chat"}));
    request(
        &mut publisher,
        json!({"type": "publish", "channel": "chat", "data": 1, "id": 2}),
    )
    .await;
    assert_eq!(next_json(&mut subs[1]).await["data"], 1);
    let reply = request(
        &mut subs[0],
        json!({"type": "call", "id": 3, "handler": "echo", "args": {"text": "x"}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"type": "result", "id": 3, "handler": "echo", "result": "Echo: x"})
    );
}

/// Publishes read together are queued together (one entry per subscriber
/// for a run on one channel), and nothing changes for what a client sees:
/// order across channels, and a request after publishes comes after them.
#[tokio::test]
async fn publishes_read_together_keep_their_order_across_channels_and_requests() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut both = connect(addr, "/relay").await;
    for channel in ["chat", "sensors"] {
        request(
            &mut both,
            json!({"type": "subscribe", "channel": channel, "id": channel}),
        )
        .await;
    }
    // One write: the agent reads these frames in one go.
    let mut publisher = connect(addr, "/relay").await;
    request(
        &mut publisher,
        json!({"type": "subscribe", "channel": "chat", "id": 0}),
    )
    .await;
    for n in 0..90 {
        let channel = if (30..60).contains(&n) {
            "sensors"
        } else {
            "chat"
        };
        let publish = json!({"type": "publish", "channel": channel, "data": n});
        publisher
            .feed(Message::text(publish.to_string()))
            .await
            .unwrap();
    }
    // The publisher's own unsubscribe comes after its publishes.
    let unsubscribe = json!({"type": "unsubscribe", "channel": "chat", "id": 1});
    publisher
        .feed(Message::text(unsubscribe.to_string()))
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    for n in 0..90 {
        assert_eq!(next_json(&mut both).await["data"], n, "in publish order");
    }
    let mut own = Vec::new();
    let mut replied = false;
    while own.len() < 60 || !replied {
        let message = next_json(&mut publisher).await;
        match message["type"].as_str() {
            Some("message") => own.push(message["data"].as_i64().unwrap()),
            Some("unsubscribed") => replied = true,
            _ => panic!("unexpected {message}"),
        }
    }
    let sent: Vec<i64> = (0..30).chain(60..90).collect();
    assert_eq!(own, sent, "its own chat messages, all of them, in order");
    agent
        .wait_metric(
            r#"edgewire_message_latency_seconds_count{path="local",service="edge"}"#,
            150.0,
        )
        .await;
}

#[tokio::test]
async fn handlers_are_callable_over_the_relay() {
    let agent = AgentProcess::start(CONFIG).await;
    let mut ws = connect(agent.service_addr("edge").await, "/relay").await;
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": "r1", "handler": "add", "args": {"a": 1, "b": 2}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"type": "result", "id": "r1", "handler": "add", "result": 3})
    );
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": "r2", "handler": "add", "args": {"a": "1", "b": 2}}),
    )
    .await;
    assert_eq!(
        (
            reply["type"].as_str(),
            reply["code"].as_str(),
            reply["id"].as_str()
        ),
        (Some("error"), Some("invalid_arguments"), Some("r2"))
    );
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": "r3", "handler": "divide", "args": {}}),
    )
    .await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_str()),
        (Some("unknown_handler"), Some("r3"))
    );
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_messages_dropped_total{reason="invalid_arguments",service="edge"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_messages_dropped_total{reason="unknown_handler",service="edge"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn malformed_requests_get_an_error_and_the_connection_stays() {
    let agent = AgentProcess::start(CONFIG).await;
    let mut ws = connect(agent.service_addr("edge").await, "/relay").await;
    for (text, code) in [
        ("{this is not json", "invalid_json"),
        ("42", "invalid_request"),
        (r#"{"type":"shout"}"#, "unknown_type"),
        (
            r#"{"type":"subscribe","channel":"nope"}"#,
            "unknown_channel",
        ),
        (
            r#"{"type":"publish","channel":"nope","data":1}"#,
            "unknown_channel",
        ),
        (r#"{"type":"subscribe"}"#, "invalid_request"),
    ] {
        send_text(&mut ws, text).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{text} -> {reply}"
        );
        assert!(!reply["message"].as_str().unwrap_or("").is_empty());
    }
    let reply = request(&mut ws, json!({"type": "subscribe", "channel": "chat"})).await;
    assert_eq!(reply["type"], "subscribed");
    let metrics = agent.metrics().await;
    for (reason, n) in [
        ("invalid_json", 1.0),
        ("invalid_request", 2.0),
        ("unknown_type", 1.0),
        ("unknown_channel", 2.0),
    ] {
        let series =
            format!(r#"edgewire_messages_dropped_total{{reason="{reason}",service="edge"}}"#);
        assert_eq!(metric_value(&metrics, &series), n, "{series}");
    }
}

/// Opens a bystander that must not notice another client's bad input.
async fn bystander(addr: std::net::SocketAddr) -> Client {
    let mut ws = connect(addr, "/").await;
    send_text(&mut ws, "before").await;
    assert_eq!(next_text(&mut ws).await, "Echo: before");
    ws
}

async fn bystander_still_served(ws: &mut Client) {
    send_text(ws, "after").await;
    assert_eq!(next_text(ws).await, "Echo: after");
}

#[tokio::test]
async fn oversize_message_closes_with_1009() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut other = bystander(addr).await;
    for path in ["/", "/relay"] {
        let mut ws = connect(addr, path).await;
        send_text(&mut ws, "x".repeat(2048)).await;
        let frame = expect_close(&mut ws).await;
        assert_eq!(frame.code, CloseCode::Size, "{path}: {frame:?}");
    }
    bystander_still_served(&mut other).await;
    agent
        .wait_metric(
            r#"edgewire_messages_dropped_total{reason="oversize",service="edge"}"#,
            2.0,
        )
        .await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut other = bystander(addr).await;
    let mut ws = connect(addr, "/relay").await;
    let bad = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await.unwrap();
    let frame = expect_close(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Invalid, "{frame:?}");
    bystander_still_served(&mut other).await;
    agent
        .wait_metric(
            r#"edgewire_messages_dropped_total{reason="invalid_utf8",service="edge"}"#,
            1.0,
        )
        .await;
}

#[tokio::test]
async fn binary_message_closes_with_1003() {
    let agent = AgentProcess::start(CONFIG).await;
    let addr = agent.service_addr("edge").await;
    let mut other = bystander(addr).await;
    let mut ws = connect(addr, "/").await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let frame = expect_close(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Unsupported, "{frame:?}");
    bystander_still_served(&mut other).await;
    agent
        .wait_metric(
            r#"edgewire_messages_dropped_total{reason="unsupported",service="edge"}"#,
            1.0,
        )
        .await;
}

#[tokio::test]
async fn the_client_close_handshake_is_answered() {
    let agent = AgentProcess::start(CONFIG).await;
    let mut ws = connect(agent.service_addr("edge").await, "/").await;
    ws.close(None).await.unwrap();
    // The server answers with its own close, then the stream ends cleanly.
    let end = tokio::time::timeout(WAIT, async {
        while let Some(msg) = ws.next().await {
            if msg.is_err() {
                return false;
            }
        }
        true
    })
    .await
    .expect("stream ends in time");
    assert!(end, "clean close handshake");
    let deadline = std::time::Instant::now() + WAIT;
    while metric_value(
        &agent.metrics().await,
        r#"edgewire_connections{service="edge"}"#,
    ) != 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "connection gauge went back to 0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The README's example session, replayed line by line against the default
/// config: the documented protocol is the one the agent speaks.
#[tokio::test]
async fn the_readme_session_is_what_the_agent_says() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let session = readme
        .split("A complete session against the default config")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("the README has the example session");
    let mut config = edgewire_api::AgentConfig::builtin_default();
    for service in &mut config.services {
        service.port = 0;
    }
    let agent = AgentProcess::start(&config.to_yaml().unwrap()).await;
    let mut ws = connect(agent.service_addr("echo").await, "/relay").await;
    let mut lines = 0;
    for line in session.lines() {
        if let Some(sent) = line.strip_prefix("> ") {
            send_text(&mut ws, sent).await;
        } else if let Some(expected) = line.strip_prefix("< ") {
            assert_eq!(next_text(&mut ws).await, expected);
        } else {
            continue;
        }
        lines += 1;
    }
    assert!(
        lines >= 10,
        "the session was found and replayed ({lines} lines)"
    );
}
