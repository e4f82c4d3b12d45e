//! What waits to go out on one outbound mesh link: publishes in a FIFO
//! bounded in bytes (the link's budget and the agent's), and interest changes
//! on a lane of their own that data cannot fill.
//!
//! Interest is not queued as notices. A change marks the channel, and the
//! link, when it next writes, sends the channel's state *at that moment*. So a
//! burst of data never loses an interest change, a storm of changes on one
//! channel costs one frame, and two changes that race (a last unsubscribe and
//! a first subscribe) can never reach the peer in the wrong order: whatever is
//! sent last was read after the last change. The lane is bounded by the
//! number of channels the services declare.
//!
//! Publishers are paced by the link, as nats-server paces a client that
//! outruns its routes: once the queue holds more than its pacing threshold,
//! the publisher waits for the link to drain to half of it before its next
//! message is read ([`Outbox::room`]), so TCP pushes back on the publisher
//! instead of a burst waiting here. (Half, so that a publisher goes on for a
//! run of messages rather than one at a time.) A link that writes nothing for
//! [`STALL`] is stuck (a frozen or black-holed peer): it paces no one until
//! it writes again, and what does not fit its byte budget meanwhile is
//! dropped, so a dead peer never holds up publishers for its other peers
//! and local subscribers for longer than that.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

pub use crate::budget::Pace;
use crate::budget::{Budget, Charge, Exceeded, Pacer};

/// One publish waiting for the link. The frame is encoded once and shared
/// by every link it goes to; each link charges it to its own budget.
#[derive(Debug)]
pub struct Queued {
    pub service: Arc<str>,
    pub frame: Bytes,
    _charge: Charge,
}

/// Why a publish was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The link is not up.
    Down,
    /// The link's queue is at its byte budget.
    Full,
    /// The agent's global queue budget is spent.
    OverBudget,
}

/// Interest to send, taken from the lane in one go.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InterestWork {
    /// Services whose whole interest set is to be sent again.
    pub snapshots: BTreeSet<String>,
    /// (service, channel) whose state changed since it was last sent.
    pub channels: BTreeSet<(String, String)>,
}

impl InterestWork {
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty() && self.channels.is_empty()
    }
}

/// The most a link holds queued before it paces its publishers: a few
/// milliseconds of link throughput, so a message waits little behind it.
/// One link under a burst, same hour: at 16 KiB 127k messages/s (0.72×
/// nats-server's routes) with a p50 of 2.5 ms, at 64 KiB 175k (0.96×) with
/// 2.8 ms. A smaller queue most likely leaves the writer idle while a paced
/// publisher is woken and read again.
pub const PACE_BYTES: usize = 64 * 1024;
/// A link over its pacing threshold that writes nothing for this long is
/// stuck and paces no one until it writes again.
pub const STALL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Outbox {
    budget: Arc<Budget>,
    global: Arc<Budget>,
    /// Queued bytes above which publishers wait.
    pace_bytes: usize,
    state: Mutex<State>,
    wake: Notify,
    /// Publishers waiting for the writer to drain the queue.
    pacer: Pacer,
}

#[derive(Debug, Default)]
struct State {
    up: bool,
    frames: VecDeque<Queued>,
    interest: InterestWork,
}

impl Outbox {
    /// An outbox whose queue may hold `max_bytes`, within `global`.
    pub fn new(max_bytes: usize, global: &Arc<Budget>) -> Outbox {
        Outbox {
            budget: Budget::new(max_bytes),
            global: Arc::clone(global),
            pace_bytes: PACE_BYTES.min(max_bytes / 2),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            pacer: Pacer::new(STALL),
        }
    }

    /// Whether the queue holds more than the pacing threshold.
    pub fn over_pace(&self) -> bool {
        self.budget.used() > self.pace_bytes
    }

    /// Whether a waiting publisher may go on: the queue is down to half
    /// the pacing threshold.
    fn drained(&self) -> bool {
        self.budget.used() <= self.pace_bytes / 2
    }

    /// Waits until the queue is down to half its pacing threshold, the link
    /// is down, or the link is stuck (has written nothing for [`STALL`]).
    pub async fn room(&self) -> Pace {
        self.pacer.wait(|| !self.is_up() || self.drained()).await
    }

    /// The writer wrote a publish (or has nothing left to write): the link
    /// is not stuck, and waiting publishers go on once it has drained.
    pub fn wrote(&self) {
        self.pacer.took(self.drained());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a publish of `service`, unless the link is down or a budget
    /// is spent.
    pub fn push(&self, service: &Arc<str>, frame: Bytes) -> Result<(), Refused> {
        let mut state = self.lock();
        if !state.up {
            return Err(Refused::Down);
        }
        let idle = self.budget.used() == 0;
        let charge =
            Charge::take(frame.len(), &self.budget, &self.global).map_err(|e| match e {
                Exceeded::Queue => Refused::Full,
                Exceeded::Global => Refused::OverBudget,
            })?;
        if idle {
            // The writer had nothing to do until now: it is not stuck.
            self.pacer.progressed();
        }
        state.frames.push_back(Queued {
            service: Arc::clone(service),
            frame,
            _charge: charge,
        });
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Notes that this agent's interest in `channel` of `service` changed.
    pub fn interest_changed(&self, service: &str, channel: &str) {
        self.lock()
            .interest
            .channels
            .insert((service.to_string(), channel.to_string()));
        self.wake.notify_one();
    }

    /// Asks for the whole interest set of `service` to be sent again.
    pub fn resync(&self, service: &str) {
        self.lock().interest.snapshots.insert(service.to_string());
        self.wake.notify_one();
    }

    /// The interest to send now; empty when there is none.
    pub fn take_interest(&self) -> InterestWork {
        std::mem::take(&mut self.lock().interest)
    }

    /// Up to `max_frames` publishes, and more only while under `max_bytes`.
    pub fn take_batch(&self, max_frames: usize, max_bytes: usize) -> Vec<Queued> {
        let mut state = self.lock();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < max_frames && (batch.is_empty() || bytes < max_bytes) {
            let Some(queued) = state.frames.pop_front() else {
                break;
            };
            bytes += queued.frame.len();
            batch.push(queued);
        }
        batch
    }

    /// The link came up: publishes are taken from now on. Pending interest
    /// is cleared, because the link sends a full snapshot first and any
    /// change after this call is marked again.
    pub fn open(&self) {
        let mut state = self.lock();
        state.up = true;
        state.interest = InterestWork::default();
        self.pacer.progressed();
    }

    /// The link went down: no more publishes are taken, and those still
    /// queued are handed back, so the caller can count them as dropped.
    pub fn close(&self) -> Vec<Queued> {
        let mut state = self.lock();
        state.up = false;
        let left = state.frames.drain(..).collect();
        drop(state);
        self.pacer.release();
        left
    }

    pub fn is_up(&self) -> bool {
        self.lock().up
    }

    /// Waits until something was queued or marked since the last wait.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ENTRY_OVERHEAD;
    use tokio::time::Instant;

    fn svc() -> Arc<str> {
        Arc::from("svc")
    }

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![b'x'; len])
    }

    #[test]
    fn publishes_wait_only_while_the_link_is_up_and_are_handed_back_on_close() {
        let global = Budget::new(1 << 20);
        let outbox = Outbox::new(2 * (100 + ENTRY_OVERHEAD), &global);
        assert_eq!(outbox.push(&svc(), frame(100)).unwrap_err(), Refused::Down);
        outbox.open();
        outbox.push(&svc(), frame(100)).unwrap();
        outbox.push(&svc(), frame(100)).unwrap();
        assert_eq!(outbox.push(&svc(), frame(1)).unwrap_err(), Refused::Full);
        assert_eq!(global.used(), 2 * (100 + ENTRY_OVERHEAD));
        let left = outbox.close();
        assert_eq!(left.len(), 2);
        drop(left);
        assert_eq!(global.used(), 0, "bytes come back with the frames");
        assert_eq!(outbox.push(&svc(), frame(1)).unwrap_err(), Refused::Down);
        outbox.open();
        assert!(outbox.take_batch(10, 1 << 20).is_empty(), "nothing stale");
    }

    #[test]
    fn the_global_budget_bounds_every_link_together() {
        let global = Budget::new(3 * (100 + ENTRY_OVERHEAD));
        let a = Outbox::new(1 << 20, &global);
        let b = Outbox::new(1 << 20, &global);
        a.open();
        b.open();
        let shared = frame(100);
        a.push(&svc(), shared.clone()).unwrap();
        b.push(&svc(), shared.clone()).unwrap();
        a.push(&svc(), shared.clone()).unwrap();
        assert_eq!(
            b.push(&svc(), shared.clone()).unwrap_err(),
            Refused::OverBudget
        );
        drop(a.take_batch(1, 1 << 20));
        b.push(&svc(), shared.clone()).unwrap();
    }

    #[test]
    fn a_full_data_queue_never_holds_back_interest() {
        let outbox = Outbox::new(100 + ENTRY_OVERHEAD, &Budget::new(1 << 20));
        outbox.open();
        outbox.push(&svc(), frame(100)).unwrap();
        assert!(outbox.push(&svc(), frame(100)).is_err());
        outbox.interest_changed("svc", "news");
        outbox.interest_changed("svc", "news");
        outbox.interest_changed("svc", "other");
        outbox.resync("svc");
        let work = outbox.take_interest();
        assert_eq!(
            work.channels.into_iter().collect::<Vec<_>>(),
            [
                ("svc".to_string(), "news".to_string()),
                ("svc".to_string(), "other".to_string())
            ],
            "one entry per channel however often it changed"
        );
        assert_eq!(work.snapshots.into_iter().collect::<Vec<_>>(), ["svc"]);
        assert!(outbox.take_interest().is_empty());
    }

    #[test]
    fn opening_clears_interest_the_snapshot_covers() {
        let outbox = Outbox::new(1 << 20, &Budget::new(1 << 20));
        outbox.interest_changed("svc", "news");
        outbox.open();
        assert!(outbox.take_interest().is_empty());
        outbox.interest_changed("svc", "news");
        assert!(!outbox.take_interest().is_empty());
    }

    fn over_pace(outbox: &Outbox) {
        while !outbox.over_pace() {
            outbox.push(&svc(), frame(1000)).unwrap();
        }
    }

    /// An open link over its pacing threshold, and a publisher waiting on it.
    async fn waiting_publisher() -> (Arc<Outbox>, tokio::task::JoinHandle<Pace>) {
        let outbox = Arc::new(Outbox::new(1 << 20, &Budget::new(1 << 30)));
        outbox.open();
        over_pace(&outbox);
        let waiter = tokio::spawn({
            let outbox = Arc::clone(&outbox);
            async move { outbox.room().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "waits while over the threshold");
        (outbox, waiter)
    }

    #[test]
    fn the_pacing_threshold_fits_inside_the_link_budget() {
        let global = Budget::new(1 << 30);
        assert_eq!(Outbox::new(64 << 20, &global).pace_bytes, PACE_BYTES);
        assert_eq!(Outbox::new(20_000, &global).pace_bytes, 10_000);
    }

    #[tokio::test]
    async fn a_publisher_waits_for_room_until_the_writer_drains_the_link() {
        let (outbox, waiter) = waiting_publisher().await;
        for queued in outbox.take_batch(usize::MAX, usize::MAX) {
            drop(queued);
            outbox.wrote();
        }
        let pace = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken once drained")
            .unwrap();
        assert_eq!(pace, Pace::Room);
    }

    #[tokio::test]
    async fn a_link_that_goes_down_releases_its_publishers() {
        let (outbox, waiter) = waiting_publisher().await;
        drop(outbox.close());
        let pace = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the close")
            .unwrap();
        assert_eq!(pace, Pace::Room);
    }

    #[tokio::test]
    async fn a_link_that_writes_nothing_paces_no_one_after_the_stall() {
        let outbox = Outbox::new(1 << 20, &Budget::new(1 << 30));
        outbox.open();
        over_pace(&outbox);
        let started = Instant::now();
        assert_eq!(outbox.room().await, Pace::Stuck);
        assert!(started.elapsed() >= STALL - Duration::from_millis(50));
        // Still stuck: later publishers do not wait again.
        let again = Instant::now();
        assert_eq!(outbox.room().await, Pace::Stuck);
        assert!(again.elapsed() < STALL / 2);
        // Once it writes again, it paces again.
        outbox.wrote();
        let paced = tokio::time::timeout(Duration::from_millis(200), outbox.room()).await;
        assert!(paced.is_err(), "waits again once the link makes progress");
    }

    #[test]
    fn batches_are_bounded_in_frames_and_bytes() {
        let outbox = Outbox::new(1 << 20, &Budget::new(1 << 20));
        outbox.open();
        for _ in 0..10 {
            outbox.push(&svc(), frame(100)).unwrap();
        }
        assert_eq!(outbox.take_batch(3, 1 << 20).len(), 3);
        assert_eq!(outbox.take_batch(100, 250).len(), 3, "stops once over");
        assert_eq!(outbox.take_batch(100, 1).len(), 1, "always at least one");
        assert_eq!(outbox.take_batch(100, 1 << 20).len(), 3);
    }
}
