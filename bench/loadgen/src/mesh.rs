//! Across servers: one publisher at one node, subscribers at other nodes.
//! Each payload carries its sequence number and send time, so a subscriber
//! measures publish-to-delivery latency and checks that nothing is lost,
//! duplicated or reordered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::dial::{Dial, each_delivery, publish_frame, subscribe};
use crate::workload::histogram;

const CHANNEL: &str = "mesh";
const QUIET: Duration = Duration::from_secs(5);

pub struct MeshRun {
    pub publish_url: String,
    pub subscribe_urls: Vec<String>,
    /// Subscribers at each subscribe URL.
    pub subscribers: usize,
    pub messages: u64,
    /// Messages per second; 0 publishes as fast as the link takes them.
    pub rate: u64,
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    latencies: Vec<u64>,
    duplicates_or_reordered: u64,
    /// Why the server ended this subscriber's connection before the run's
    /// last message (e.g. cut as a slow consumer), if it did.
    cut: Option<String>,
}

fn payload(seq: u64, base: Instant) -> String {
    format!("{seq}:{}", base.elapsed().as_micros())
}

/// `(seq, sent_us)` of a measured payload; warm-up payloads have none.
fn parse(payload: &str) -> Option<(u64, u64)> {
    let (seq, sent) = payload.split_once(':')?;
    Some((seq.parse().ok()?, sent.parse().ok()?))
}

pub async fn mesh(dial: Dial, run: MeshRun) -> anyhow::Result<Value> {
    let base = Instant::now();
    let warmed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut n = 1;
    for url in &run.subscribe_urls {
        for _ in 0..run.subscribers {
            let mut ws = dial.connect(url, n).await?;
            n += 1;
            subscribe(&mut ws, dial.dialect, CHANNEL).await?;
            let (dialect, messages, warmed) = (dial.dialect, run.messages, Arc::clone(&warmed));
            tasks.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut warm = false;
                let mut next = 0;
                while next < messages {
                    // A lost message must not hang the run: after a quiet
                    // spell the subscriber reports what it saw.
                    let read = each_delivery(&mut ws, dialect, |p| {
                        let Some((seq, sent)) = parse(p) else {
                            if !warm {
                                warm = true;
                                warmed.fetch_add(1, Ordering::Relaxed);
                            }
                            return;
                        };
                        let now = base.elapsed().as_micros() as u64;
                        seen.latencies.push(now.saturating_sub(sent));
                        if seq != next {
                            seen.duplicates_or_reordered += 1;
                        }
                        next = seq + 1;
                    });
                    let Ok(read) = tokio::time::timeout(QUIET, read).await else {
                        break;
                    };
                    // A server that ends a subscriber mid-run is a result,
                    // not a failure of the run: say what got through.
                    if let Err(err) = read {
                        seen.cut = Some(format!("{err:#}"));
                        break;
                    }
                }
                anyhow::Ok(seen)
            }));
        }
    }
    let expected_subscribers = (run.subscribe_urls.len() * run.subscribers) as u64;
    let mut publisher = dial.connect(&run.publish_url, 0).await?;

    // Interest travels across the mesh asynchronously: publish warm-up
    // messages until every subscriber has seen one (bounded).
    let warm_deadline = Instant::now() + Duration::from_secs(30);
    while warmed.load(Ordering::Relaxed) < expected_subscribers {
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "only {} of {expected_subscribers} subscribers reachable after 30 s",
            warmed.load(Ordering::Relaxed)
        );
        publisher
            .send(Message::text(publish_frame(dial.dialect, CHANNEL, "warm")))
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the last warm-ups drain before the measured run.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let mut ticker = (run.rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / run.rate as f64));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    for seq in 0..run.messages {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let frame = publish_frame(dial.dialect, CHANNEL, &payload(seq, base));
        publisher.send(Message::text(frame)).await?;
    }
    let published = started.elapsed().as_secs_f64();

    let mut all = histogram();
    let mut delivered = 0u64;
    let mut disordered = 0u64;
    let mut cut = Vec::new();
    for task in tasks {
        let seen = task.await??;
        delivered += seen.latencies.len() as u64;
        disordered += seen.duplicates_or_reordered;
        cut.extend(seen.cut);
        for l in seen.latencies {
            all.record(l).ok();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "subscribers": expected_subscribers,
        "published": run.messages,
        "publish_seconds": published,
        "delivered": delivered,
        "expected": run.messages * expected_subscribers,
        "duplicates_or_reordered": disordered,
        "subscribers_cut": cut.len(),
        "cut_because": cut.first(),
        "seconds": seconds,
        "deliveries_per_second": delivered as f64 / seconds,
        "p50_us": all.value_at_quantile(0.5),
        "p99_us": all.value_at_quantile(0.99),
        "p999_us": all.value_at_quantile(0.999),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let base = Instant::now();
        let (seq, _) = parse(&payload(42, base)).expect("measured payload");
        assert_eq!(seq, 42);
        assert_eq!(parse("warm"), None);
    }
}
