//! The single-server workloads: echo round trips, fan-out, handshakes and
//! idle connections. Each returns one JSON object of figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::dial::{Dial, next_deliveries, publish_frame, subscribe};

pub fn histogram() -> Histogram<u64> {
    // Three significant figures over the default range: cannot fail.
    Histogram::<u64>::new(3).expect("histogram bounds")
}

/// Round-trip latency: each client sends a message and waits for its answer.
/// Relay and NATS echo is a publish to one's own private channel.
pub async fn echo(
    dial: Dial,
    url: String,
    clients: usize,
    messages: usize,
) -> anyhow::Result<Value> {
    let mut conns = Vec::with_capacity(clients);
    for n in 0..clients {
        let mut ws = dial.connect(&url, n).await?;
        subscribe(&mut ws, dial.dialect, &format!("echo.{n}")).await?;
        conns.push(ws);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, mut ws) in conns.into_iter().enumerate() {
        let dialect = dial.dialect;
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let topic = format!("echo.{n}");
            for i in 0..messages {
                let frame = publish_frame(dialect, &topic, &format!("m{i}"));
                let sent = Instant::now();
                ws.send(Message::text(frame)).await?;
                next_deliveries(&mut ws, dialect).await?;
                hist.record(sent.elapsed().as_micros() as u64).ok();
            }
            let _ = ws.close(None).await;
            anyhow::Ok(hist)
        }));
    }
    let mut all = histogram();
    for task in tasks {
        all.add(task.await??).ok();
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "round_trips": all.len(),
        "seconds": seconds,
        "p50_us": all.value_at_quantile(0.5),
        "p99_us": all.value_at_quantile(0.99),
        "p999_us": all.value_at_quantile(0.999),
        "per_second": all.len() as f64 / seconds,
    }))
}

/// One publisher, many subscribers: deliveries per second.
pub async fn fanout(
    dial: Dial,
    url: String,
    subscribers: usize,
    messages: usize,
) -> anyhow::Result<Value> {
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..subscribers {
        let mut ws = dial.connect(&url, n + 1).await?;
        subscribe(&mut ws, dial.dialect, "fan").await?;
        let received = Arc::clone(&received);
        let dialect = dial.dialect;
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                let batch = next_deliveries(&mut ws, dialect).await?.len();
                got += batch;
                received.fetch_add(batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let mut publisher = dial.connect(&url, 0).await?;
    // Let the last subscriptions settle on servers that apply them async.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for i in 0..messages {
        publisher
            .send(Message::text(publish_frame(
                dial.dialect,
                "fan",
                &format!("m{i}"),
            )))
            .await?;
    }
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let delivered = received.load(Ordering::Relaxed);
    Ok(json!({
        "delivered": delivered,
        "seconds": seconds,
        "deliveries_per_second": delivered as f64 / seconds,
    }))
}

/// Opening handshakes per second (connect, upgrade, close), `concurrency` at
/// a time.
pub async fn handshakes(
    dial: Dial,
    url: String,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Value> {
    let (dial, url) = (Arc::new(dial), Arc::new(url));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (dial, url, next) = (Arc::clone(&dial), Arc::clone(&url), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= count {
                    return anyhow::Ok(());
                }
                let mut ws = dial.connect(&url, n).await?;
                let _ = ws.close(None).await;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({"handshakes": count, "seconds": seconds, "per_second": count as f64 / seconds}))
}

/// Opens idle connections, prints a line when they are all open (so a driver
/// can read the server's memory), and holds them for `hold` seconds,
/// answering pings.
pub async fn idle(dial: Dial, url: String, connections: usize, hold: u64) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(connections);
    for n in 0..connections {
        conns.push(
            dial.connect(&url, n)
                .await
                .with_context(|| format!("connection {n}"))?,
        );
        if (n + 1) % 10_000 == 0 {
            eprintln!("{} connections open", n + 1);
        }
    }
    let opened = started.elapsed().as_secs_f64();
    println!("{}", json!({"open": connections, "seconds": opened}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(hold);
    let mut readers = Vec::new();
    for mut ws in conns {
        readers.push(tokio::spawn(async move {
            while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
            ws
        }));
    }
    let mut held = 0;
    for r in readers {
        if r.await.is_ok() {
            held += 1;
        }
    }
    Ok(json!({"held": held, "hold_seconds": hold}))
}
