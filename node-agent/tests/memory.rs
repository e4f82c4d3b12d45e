//! Memory is bounded in bytes: a subscriber that never reads, flooded with
//! large messages, costs the agent at most its send queue budget, under
//! either slow-consumer policy; the other clients are served throughout and
//! every message the slow one misses is counted.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The default per-connection send queue budget (`sendQueueBytes`).
const SEND_QUEUE_BUDGET: u64 = 8 * 1024 * 1024;
/// What the agent needs besides queued messages: code, runtime, buffers of
/// the clients in flight, the allocator's slack. Generous for a debug build.
const FIXED_OVERHEAD: u64 = 56 * 1024 * 1024;
const PUBLISHES: usize = 10_000;
const PAYLOAD: usize = 60 * 1024;

fn config(policy: &str) -> String {
    format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: echo, kind: echo, path: /}}
    channels:
      - {{name: firehose}}
    # Long enough that the flood never idles out the silent subscriber.
    limits: {{slowConsumer: {policy}, idleTimeoutSeconds: 600}}
"#
    )
}

fn slow_drops(metrics: &str) -> f64 {
    metric_value(
        metrics,
        r#"edgewire_messages_dropped_total{reason="slow_consumer",service="edge"}"#,
    )
}

/// Floods the channel with `PUBLISHES` messages of `PAYLOAD` bytes while a
/// reading subscriber keeps up (each batch waits for it) and a never-reading
/// one falls behind. Returns the agent, the slow client and the peak RSS.
async fn flood(policy: &str) -> (AgentProcess, Client, u64) {
    let agent = AgentProcess::start(&config(policy)).await;
    let addr = agent.service_addr("edge").await;
    let slow = never_reading_subscriber(addr, "firehose").await;
    let mut fast = connect(addr, "/relay").await;
    request(
        &mut fast,
        json!({"type": "subscribe", "channel": "firehose"}),
    )
    .await;
    let delivered = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&delivered);
    let reader = tokio::spawn(async move {
        for n in 0..PUBLISHES {
            let msg = next_json(&mut fast).await;
            assert_eq!(
                msg["data"]["n"], n,
                "the reading subscriber lost or reordered"
            );
            counter.fetch_add(1, Ordering::SeqCst);
        }
        fast
    });
    let (_, start_peak) = agent.rss();
    let mut publisher = connect(addr, "/relay").await;
    let pad = "p".repeat(PAYLOAD);
    for n in 0..PUBLISHES {
        send_text(
            &mut publisher,
            json!({"type": "publish", "channel": "firehose", "data": {"n": n, "pad": pad}})
                .to_string(),
        )
        .await;
        if n % 100 == 99 {
            let deadline = std::time::Instant::now() + WAIT;
            while delivered.load(Ordering::SeqCst) < n + 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{policy}: the reading subscriber stalled at {} of {}",
                    delivered.load(Ordering::SeqCst),
                    n + 1
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    let mut fast = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the reading subscriber got everything")
        .unwrap();
    // Still served promptly: a call answers.
    let reply = request(
        &mut fast,
        json!({"type": "call", "id": 1, "handler": "echo", "args": {"text": "still here"}}),
    )
    .await;
    assert_eq!(reply["result"], "Echo: still here");
    let (_, peak) = agent.rss();
    eprintln!(
        "{policy}: peak RSS {} MiB, at start {} MiB",
        peak >> 20,
        start_peak >> 20
    );
    assert!(
        peak <= SEND_QUEUE_BUDGET + FIXED_OVERHEAD,
        "{policy}: peak RSS {} MiB (at start {} MiB) is over the {} MiB send queue budget plus {} MiB",
        peak >> 20,
        start_peak >> 20,
        SEND_QUEUE_BUDGET >> 20,
        FIXED_OVERHEAD >> 20
    );
    (agent, slow, peak)
}

#[tokio::test]
async fn a_subscriber_that_never_reads_costs_its_budget_under_drop() {
    let (agent, mut slow, _) = flood("drop").await;
    // The slow subscriber reads at last: it gets what was queued for it, and
    // everything else it missed was counted.
    let mut received = 0usize;
    let mut last = None;
    // Until it has been quiet for a while: everything queued has arrived.
    while let Ok(msg) = tokio::time::timeout(Duration::from_secs(3), next_json(&mut slow)).await {
        let n = msg["data"]["n"].as_u64().expect("a flood message") as usize;
        assert!(last.is_none_or(|l| n > l), "in order");
        last = Some(n);
        received += 1;
        assert!(received <= PUBLISHES);
    }
    assert!(received < PUBLISHES, "the slow subscriber fell behind");
    assert_eq!(
        slow_drops(&agent.metrics().await),
        (PUBLISHES - received) as f64,
        "every message the slow subscriber missed is counted"
    );
}

#[tokio::test]
async fn a_subscriber_that_never_reads_costs_its_budget_under_disconnect() {
    let (agent, mut slow, _) = flood("disconnect").await;
    // Cut off: with 1008 when the close frame still fits through its full
    // socket, else the agent gives up on the close handshake and resets.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(remaining, futures_util::StreamExt::next(&mut slow)).await {
            Err(_) => panic!("the slow subscriber was never disconnected"),
            Ok(Some(Ok(Message::Close(frame)))) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Policy));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => break,
        }
    }
    assert!(
        slow_drops(&agent.metrics().await) >= 1.0,
        "the drop is counted"
    );
    // The test still holds the slow client: the agent has let it go.
    let deadline = std::time::Instant::now() + WAIT;
    while metric_value(
        &agent.metrics().await,
        r#"edgewire_connections{service="edge"}"#,
    ) != 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
