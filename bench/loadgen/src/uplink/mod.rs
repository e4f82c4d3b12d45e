//! Uplink from edge nodes to a hub, edgewire beside NATS leaf nodes with
//! the same client process: publishers at every edge, one subscriber at
//! the hub. Three phases, each on servers the driver started fresh:
//!
//! - `throughput`: each publisher sends its messages as fast as its edge
//!   takes them; the figure is the hub's delivery rate between the 10th and
//!   the 90th percentile of arrivals (the steady state, without the ramp
//!   and the tail);
//! - `latency`: each publisher at a fixed rate; publish-to-hub latency;
//! - `outage`: each publisher at a fixed rate, the hub stopped for a while
//!   and started again (by the driver, see [`driver`]); how fast the edges'
//!   backlog drains once it is back, and that every message arrived once.

mod clients;
mod driver;
mod payload;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use self::clients::{Publisher, Subscription, System};
use self::payload::{Arrival, Payload, Tally};
use crate::workload::histogram;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Phase {
    Throughput,
    Latency,
    Outage,
}

#[derive(Args, Clone, Debug)]
pub struct UplinkRun {
    #[arg(long, value_enum)]
    pub system: System,
    #[arg(long, value_enum)]
    pub phase: Phase,
    /// Each edge node's client URL (ws://ip:port/relay or nats://ip:port);
    /// one publisher per edge. NATS leaf `i` is JetStream domain `edge<i>`.
    #[arg(long = "edge-url", required = true)]
    pub edge_urls: Vec<String>,
    /// The hub's client URL.
    #[arg(long)]
    pub hub_url: String,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// throughput: messages per publisher.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// latency and outage: messages per second per publisher.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// latency: seconds of publishing.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// outage: seconds of publishing with the hub up before it is stopped.
    #[arg(long, default_value_t = 5)]
    pub before_seconds: u64,
    /// outage: seconds the hub stays stopped while publishing goes on.
    #[arg(long, default_value_t = 60)]
    pub outage_seconds: u64,
    /// The run gives up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// A run ends when every message arrived, or after this long with nothing
/// new at the hub.
const QUIET: Duration = Duration::from_secs(20);
/// Measured messages a relay publisher feeds before a flush at saturation.
const FLUSH_EVERY: u64 = 64;

/// What the hub's subscriber has seen, shared with the run.
struct Observed {
    base: Instant,
    tally: Tally,
    warm: Vec<bool>,
    latencies: hdrhistogram::Histogram<u64>,
    /// Arrival of each new measured message, µs since `base`.
    arrivals: Vec<u64>,
    last_arrival: Instant,
    /// The last NATS stream sequence delivered, to resume after it.
    stream_seq: Option<u64>,
    errors: Vec<String>,
}

impl Observed {
    fn new(base: Instant, publishers: usize) -> Observed {
        Observed {
            base,
            tally: Tally::new(publishers),
            warm: vec![false; publishers],
            latencies: histogram(),
            arrivals: Vec::new(),
            last_arrival: Instant::now(),
            stream_seq: None,
            errors: Vec::new(),
        }
    }

    fn take(&mut self, deliveries: Vec<clients::Delivery>) {
        let now = Instant::now();
        let now_us = now.duration_since(self.base).as_micros() as u64;
        for delivery in deliveries {
            if delivery.stream_seq.is_some() {
                self.stream_seq = delivery.stream_seq;
            }
            match payload::parse(&delivery.payload) {
                Some(Payload::Warm { publisher }) => {
                    if let Some(w) = self.warm.get_mut(publisher) {
                        *w = true;
                    }
                }
                Some(Payload::Measured {
                    publisher,
                    seq,
                    sent_us,
                }) => {
                    if self.tally.record(publisher, seq) == Arrival::New {
                        self.latencies.record(now_us.saturating_sub(sent_us)).ok();
                        self.arrivals.push(now_us);
                        self.last_arrival = now;
                    }
                }
                None => self.tally.foreign += 1,
            }
        }
    }
}

/// What the run tells the subscriber.
enum Command {
    /// The hub is going away: drop the subscription.
    Down,
    /// The hub is back: subscribe again; answered once subscribed.
    Up(oneshot::Sender<anyhow::Result<()>>),
}

enum Step {
    Command(Option<Command>),
    Batch(anyhow::Result<Vec<clients::Delivery>>),
}

/// The hub's subscriber: takes every delivery into `observed`; on a
/// receive error it waits, unsubscribed, for the run to say the hub is up.
async fn subscriber(
    system: System,
    hub_url: String,
    mut subscription: Option<Subscription>,
    observed: Arc<Mutex<Observed>>,
    mut commands: mpsc::Receiver<Command>,
) {
    loop {
        let step = match subscription.as_mut() {
            Some(sub) => tokio::select! {
                command = commands.recv() => Step::Command(command),
                batch = sub.next() => Step::Batch(batch),
            },
            None => Step::Command(commands.recv().await),
        };
        let command = match step {
            Step::Batch(batch) => {
                let mut seen = observed.lock().unwrap_or_else(|e| e.into_inner());
                match batch {
                    Ok(deliveries) => seen.take(deliveries),
                    Err(err) => {
                        let at = seen.base.elapsed().as_secs_f64();
                        seen.errors.push(format!("{at:.1} s: {err:#}"));
                        subscription = None;
                    }
                }
                continue;
            }
            Step::Command(command) => command,
        };
        match command {
            None => return,
            Some(Command::Down) => subscription = None,
            Some(Command::Up(done)) => {
                subscription = None;
                let deadline = Instant::now() + Duration::from_secs(60);
                let result = loop {
                    let after = observed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .stream_seq;
                    match Subscription::open(system, &hub_url, after).await {
                        Ok(sub) => break Ok(sub),
                        Err(err) if Instant::now() >= deadline => {
                            break Err(err.context("resubscribing at the hub for 60 s"));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                let reply = match result {
                    Ok(sub) => {
                        subscription = Some(sub);
                        Ok(())
                    }
                    Err(err) => Err(err),
                };
                let _ = done.send(reply);
            }
        }
    }
}

/// How a publisher sends its measured messages.
#[derive(Clone, Copy)]
enum Pace {
    /// `count` messages as fast as the edge takes them.
    Saturate { count: u64 },
    /// `rate` a second until told to stop.
    Rate { rate: u64 },
}

/// Publishes warm-up messages until the subscriber has seen one from every
/// publisher (bounded), then its measured messages; returns how many, for
/// how long, and its connection, which the run keeps open until every
/// message had its chance to arrive (a close right after the last publish
/// could race it).
async fn publisher(
    index: usize,
    mut conn: Publisher,
    run: Arc<RunShared>,
    pace: Pace,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(Published, Publisher)> {
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    while !run.all_warm() {
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "publisher {index}: the hub did not see every edge's warm-up within 60 s"
        );
        conn.send(payload::warm(index), true).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.started.wait().await;
    let base = run.base;
    let started = Instant::now();
    let mut seq = 0;
    match pace {
        Pace::Saturate { count } => {
            while seq < count {
                let sent = base.elapsed().as_micros() as u64;
                let flush = (seq + 1) % FLUSH_EVERY == 0 || seq + 1 == count;
                conn.send(payload::measured(index, seq, sent, run.size), flush)
                    .await?;
                seq += 1;
            }
        }
        Pace::Rate { rate } => {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            // Behind schedule (a busy machine), catch up: the offered rate holds.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                let sent = base.elapsed().as_micros() as u64;
                conn.send(payload::measured(index, seq, sent, run.size), true)
                    .await?;
                seq += 1;
            }
        }
    }
    conn.flush().await?;
    let published = Published {
        count: seq,
        seconds: started.elapsed().as_secs_f64(),
        each: vec![seq],
    };
    Ok((published, conn))
}

/// What the publishers sent: messages (each publisher's, in order, when
/// joined), and the longest any took to send its share.
struct Published {
    count: u64,
    seconds: f64,
    each: Vec<u64>,
}

type PublisherTask = tokio::task::JoinHandle<anyhow::Result<(Published, Publisher)>>;

async fn join(tasks: Vec<PublisherTask>, open: &mut Vec<Publisher>) -> anyhow::Result<Published> {
    let mut all = Published {
        count: 0,
        seconds: 0.0,
        each: Vec::new(),
    };
    for task in tasks {
        let (one, conn) = task.await??;
        open.push(conn);
        all.count += one.count;
        all.seconds = all.seconds.max(one.seconds);
        all.each.push(one.count);
    }
    Ok(all)
}

/// What every publisher shares.
struct RunShared {
    base: Instant,
    size: usize,
    observed: Arc<Mutex<Observed>>,
    /// Opened once every publisher's warm-up arrived.
    started: tokio::sync::Barrier,
}

impl RunShared {
    fn all_warm(&self) -> bool {
        let seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        seen.warm.iter().all(|w| *w)
    }
}

/// Waits until `expected` messages arrived or nothing new came for
/// [`QUIET`] since the wait began or the latest arrival (after an outage
/// the latest arrival may be a minute old); `true` when all arrived.
async fn wait_delivered(observed: &Mutex<Observed>, expected: u64, deadline: Instant) -> bool {
    let began = Instant::now();
    loop {
        {
            let seen = observed.lock().unwrap_or_else(|e| e.into_inner());
            if seen.tally.unique >= expected {
                return true;
            }
            if quiet_since(began, seen.last_arrival) >= QUIET || Instant::now() >= deadline {
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long nothing has arrived, counting from `began` at the earliest.
fn quiet_since(began: Instant, last_arrival: Instant) -> Duration {
    began.max(last_arrival).elapsed()
}

/// The p-th fraction of a sorted list.
fn at_fraction(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

/// Delivered messages a second between the 10th and 90th percentile of
/// arrivals.
fn steady_rate(arrivals: &[u64]) -> Option<f64> {
    let mut sorted = arrivals.to_vec();
    sorted.sort_unstable();
    let (from, to) = (at_fraction(&sorted, 0.1)?, at_fraction(&sorted, 0.9)?);
    let span = (to.checked_sub(from)?) as f64 / 1e6;
    let between = sorted.iter().filter(|&&a| a >= from && a <= to).count();
    (span > 0.0).then(|| between as f64 / span)
}

pub async fn uplink(run: UplinkRun) -> anyhow::Result<Value> {
    let publishers = run.edge_urls.len();
    if run.system == System::Nats {
        clients::nats_streams(&run.edge_urls, &run.hub_url).await?;
    }
    let base = Instant::now();
    let observed = Arc::new(Mutex::new(Observed::new(base, publishers)));
    let first = Subscription::open(run.system, &run.hub_url, None).await?;
    let (commands, command_rx) = mpsc::channel(4);
    let sub_task = tokio::spawn(subscriber(
        run.system,
        run.hub_url.clone(),
        Some(first),
        Arc::clone(&observed),
        command_rx,
    ));
    let shared = Arc::new(RunShared {
        base,
        size: run.size,
        observed: Arc::clone(&observed),
        started: tokio::sync::Barrier::new(publishers + 1),
    });
    let pace = match run.phase {
        Phase::Throughput => Pace::Saturate {
            count: run.messages,
        },
        Phase::Latency | Phase::Outage => Pace::Rate { rate: run.rate },
    };
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (i, url) in run.edge_urls.iter().enumerate() {
        let conn = Publisher::connect(run.system, url, i).await?;
        tasks.push(tokio::spawn(publisher(
            i,
            conn,
            Arc::clone(&shared),
            pace,
            stop_rx.clone(),
        )));
    }
    let warm_deadline = Instant::now() + Duration::from_secs(70);
    while !shared.all_warm() {
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "the hub did not see every edge's warm-up within 70 s: {:?}",
            observed.lock().unwrap_or_else(|e| e.into_inner()).errors
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the last warm-ups drain before the measured run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(30), shared.started.wait())
        .await
        .map_err(|_| anyhow::anyhow!("a publisher failed before the measured run"))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(run.timeout.saturating_sub(30));

    let mut outage = json!(null);
    let mut open = Vec::new();
    let published = match run.phase {
        Phase::Throughput => {
            let published = join(tasks, &mut open).await?;
            wait_delivered(&observed, published.count, deadline).await;
            published
        }
        Phase::Latency => {
            tokio::time::sleep(Duration::from_secs(run.seconds)).await;
            stop.send_replace(true);
            let published = join(tasks, &mut open).await?;
            wait_delivered(&observed, published.count, deadline).await;
            published
        }
        Phase::Outage => {
            tokio::time::sleep(Duration::from_secs(run.before_seconds)).await;
            driver::step("stop-hub").await?;
            let down = Instant::now();
            commands.send(Command::Down).await?;
            let before = observed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tally
                .unique;
            tokio::time::sleep(Duration::from_secs(run.outage_seconds)).await;
            // Publishing stops before the hub returns, so the backlog is
            // known when it does.
            stop.send_replace(true);
            let published = join(tasks, &mut open).await?;
            driver::step("start-hub").await?;
            let (done, subscribed) = oneshot::channel();
            commands.send(Command::Up(done)).await?;
            subscribed.await??;
            driver::step("resume-edges").await?;
            let back = Instant::now();
            let at_return = observed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tally
                .unique;
            let all = wait_delivered(&observed, published.count, deadline).await;
            let seen = observed.lock().unwrap_or_else(|e| e.into_inner());
            let back_us = back.duration_since(base).as_micros() as u64;
            let after: Vec<u64> = seen
                .arrivals
                .iter()
                .copied()
                .filter(|&a| a >= back_us)
                .collect();
            let first_after = after.iter().min().map(|&a| (a - back_us) as f64 / 1e6);
            let last_after = after.iter().max().map(|&a| (a - back_us) as f64 / 1e6);
            outage = json!({
                "delivered_before_stop": before,
                "hub_down_seconds": back.duration_since(down).as_secs_f64(),
                "backlog_at_return": published.count.saturating_sub(at_return),
                "delivered_after_return": after.len(),
                "all_delivered": all,
                "first_after_return_seconds": first_after,
                "drained_after_seconds": last_after,
                "drain_per_second": last_after.filter(|s| *s > 0.0).map(|s| after.len() as f64 / s),
                "drain_per_second_from_first": match (first_after, last_after) {
                    (Some(f), Some(l)) if l > f => Some(after.len() as f64 / (l - f)),
                    _ => None,
                },
            });
            published
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    drop(open);
    drop(commands);
    let _ = sub_task.await;
    let seen = observed.lock().unwrap_or_else(|e| e.into_inner());
    let first_arrival = seen.arrivals.iter().min().copied();
    let last_arrival = seen.arrivals.iter().max().copied();
    Ok(json!({
        "system": format!("{:?}", run.system).to_lowercase(),
        "phase": format!("{:?}", run.phase).to_lowercase(),
        "edges": publishers,
        "size": run.size,
        "published": published.count,
        "publish_seconds": published.seconds,
        "publish_per_second": published.count as f64 / published.seconds.max(1e-6),
        "delivered": seen.tally.unique,
        "lost": published.count.saturating_sub(seen.tally.unique),
        "missing_first": seen.tally.missing(&published.each, 10),
        "duplicates": seen.tally.duplicates,
        "reordered": seen.tally.reordered,
        "foreign": seen.tally.foreign,
        "seconds": seconds,
        "steady_per_second": steady_rate(&seen.arrivals),
        "first_to_last_arrival_seconds": match (first_arrival, last_arrival) {
            (Some(f), Some(l)) => Some((l - f) as f64 / 1e6),
            _ => None,
        },
        "p50_us": seen.latencies.value_at_quantile(0.5),
        "p99_us": seen.latencies.value_at_quantile(0.99),
        "p999_us": seen.latencies.value_at_quantile(0.999),
        "outage": outage,
        "subscriber_errors": seen.errors,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_spell_counts_from_the_wait_at_the_earliest() {
        let long_ago = Instant::now() - Duration::from_secs(60);
        assert!(quiet_since(Instant::now(), long_ago) < Duration::from_secs(1));
        let began = Instant::now() - Duration::from_secs(30);
        assert!(quiet_since(began, long_ago) >= Duration::from_secs(30));
    }

    #[test]
    fn the_steady_rate_leaves_out_the_ramp_and_the_tail() {
        // 1,000 arrivals a second for a second, then a tail of 10 spread
        // over 10 s: the steady rate is that of the first second.
        let mut arrivals: Vec<u64> = (0..1000).map(|i| i * 1000).collect();
        arrivals.extend((1..=10).map(|i| 1_000_000 + i * 1_000_000));
        let rate = steady_rate(&arrivals).expect("a rate");
        assert!((900.0..1100.0).contains(&rate), "{rate}");
        assert_eq!(steady_rate(&[]), None);
    }
}
