//! Per-service limits over real sockets: connection cap, slow consumers,
//! keepalive and idle timeout, handshake timeout.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn config(limits: &str) -> String {
    format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: echo, kind: echo, path: /}}
    channels:
      - {{name: firehose}}
    limits: {limits}
"#
    )
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let agent = AgentProcess::start(&config("{maxConnections: 2}")).await;
    let addr = agent.service_addr("edge").await;
    let mut a = connect(addr, "/").await;
    let _b = connect(addr, "/").await;
    match tokio_tungstenite::connect_async(format!("ws://{addr}/")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("third connection should be refused with 503, got {other:?}"),
    }
    // The held connections are unaffected, and a freed slot can be used again.
    send_text(&mut a, "still here").await;
    assert_eq!(next_text(&mut a).await, "Echo: still here");
    a.close(None).await.unwrap();
    let mut refused = 1.0;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .is_ok()
        {
            break;
        }
        // The slot frees once the agent has seen the close; until then it refuses.
        refused += 1.0;
        assert!(std::time::Instant::now() < deadline, "slot not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_connections_total{outcome="rejected_limit",service="edge"}"#
        ),
        refused
    );
}

/// Publishes 4 KiB messages in batches of 50 until the slow-consumer counter
/// moves (bounded). With `delivered`, each batch waits until a reading
/// subscriber has counted everything sent so far.
async fn flood_until_dropped(
    agent: &AgentProcess,
    publisher: &mut Client,
    delivered: Option<&AtomicUsize>,
) -> usize {
    let payload = "p".repeat(4000);
    for n in 0..5000 {
        send_text(
            publisher,
            json!({"type": "publish", "channel": "firehose", "data": payload}).to_string(),
        )
        .await;
        if n % 50 == 49 {
            // A round trip makes sure the agent has processed what was sent.
            let reply = request(
                publisher,
                json!({"type": "call", "id": n, "handler": "echo", "args": {"text": ""}}),
            )
            .await;
            assert_eq!(reply["type"], "result");
            if let Some(delivered) = delivered {
                let deadline = std::time::Instant::now() + WAIT;
                while delivered.load(Ordering::SeqCst) < n + 1 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the reading subscriber fell behind"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let dropped = metric_value(
                &agent.metrics().await,
                r#"edgewire_messages_dropped_total{reason="slow_consumer",service="edge"}"#,
            );
            if dropped > 0.0 {
                return n + 1;
            }
        }
    }
    panic!("the slow subscriber never overflowed its queue");
}

#[tokio::test]
async fn slow_consumer_is_disconnected_with_1008() {
    let agent = AgentProcess::start(&config(
        "{sendQueueMessages: 4, slowConsumer: disconnect, maxMessageBytes: 16384}",
    ))
    .await;
    let addr = agent.service_addr("edge").await;
    let mut slow = never_reading_subscriber(addr, "firehose").await;
    let mut publisher = connect(addr, "/relay").await;
    flood_until_dropped(&agent, &mut publisher, None).await;
    let frame = expect_close(&mut slow).await;
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    assert!(frame.reason.contains("slow consumer"), "{frame:?}");
    // The publisher was never held back and is still served.
    let reply = request(
        &mut publisher,
        json!({"type": "call", "id": 1, "handler": "echo", "args": {"text": "ok"}}),
    )
    .await;
    assert_eq!(reply["result"], "Echo: ok");
}

#[tokio::test]
async fn slow_consumer_under_drop_policy_keeps_its_connection() {
    let agent = AgentProcess::start(&config(
        "{sendQueueMessages: 64, slowConsumer: drop, maxMessageBytes: 16384}",
    ))
    .await;
    let addr = agent.service_addr("edge").await;
    let mut slow = never_reading_subscriber(addr, "firehose").await;
    let mut fast = connect(addr, "/relay").await;
    request(
        &mut fast,
        json!({"type": "subscribe", "channel": "firehose"}),
    )
    .await;
    let mut publisher = connect(addr, "/relay").await;
    // The fast subscriber reads as it goes, so it must get every message.
    let delivered = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&delivered);
    let reader = tokio::spawn(async move {
        loop {
            let msg = next_json(&mut fast).await;
            if msg["data"] == "stop" {
                return counter.load(Ordering::SeqCst);
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let sent = flood_until_dropped(&agent, &mut publisher, Some(&delivered)).await;
    send_text(
        &mut publisher,
        json!({"type": "publish", "channel": "firehose", "data": "stop"}).to_string(),
    )
    .await;
    assert_eq!(
        reader.await.unwrap(),
        sent,
        "the fast subscriber lost nothing"
    );
    // The slow one is still connected: once it reads, it gets what was queued
    // and then answers requests.
    let reply = request(
        &mut slow,
        json!({"type": "unsubscribe", "channel": "firehose", "id": "u"}),
    )
    .await;
    let mut reply = reply;
    for _ in 0..10_000 {
        if reply["type"] == "unsubscribed" {
            break;
        }
        reply = next_json(&mut slow).await;
    }
    assert_eq!(
        reply,
        json!({"type": "unsubscribed", "channel": "firehose", "id": "u"})
    );
}

#[tokio::test]
async fn silent_client_is_closed_after_the_idle_timeout() {
    let agent =
        AgentProcess::start(&config("{pingIntervalSeconds: 1, idleTimeoutSeconds: 2}")).await;
    let addr = agent.service_addr("edge").await;
    let mut silent = connect(addr, "/").await;
    let mut lively = connect(addr, "/").await;
    // Neither reads for 3.5 s; tungstenite answers pings only while reading, so
    // the silent client sends no pong. The lively one reads (and so pongs).
    let keep_reading = tokio::spawn(async move {
        let end = tokio::time::Instant::now() + Duration::from_millis(3500);
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout_at(end, futures_util::StreamExt::next(&mut lively)).await
        {}
        lively
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let frame = expect_close(&mut silent).await;
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::Normal, "idle timeout")
    );
    let mut lively = keep_reading.await.unwrap();
    send_text(&mut lively, "alive").await;
    assert_eq!(
        next_text(&mut lively).await,
        "Echo: alive",
        "pongs keep a connection open"
    );
}

#[tokio::test]
async fn a_connection_that_never_sends_its_handshake_is_dropped() {
    let agent = AgentProcess::start(&config("{handshakeTimeoutSeconds: 1}")).await;
    let addr = agent.service_addr("edge").await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 256];
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("the agent hangs up");
    // Closed without a byte (or reset), and only once the timeout ran out.
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "{read:?}: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        started.elapsed()
    );
    agent
        .wait_metric(
            r#"edgewire_connections_total{outcome="handshake_timeout",service="edge"}"#,
            1.0,
        )
        .await;
}
