//! The relay's channel hub: who subscribes to which channel on this agent, and
//! fan-out of a publish to each subscriber's bounded send queue.
//!
//! Order per publisher holds because a publish (or a run of publishes read
//! together, see [`Hub::publish_run`]) is pushed into every queue before the
//! publisher's next message is read, and each queue is FIFO. A full
//! queue never blocks the publisher: the service's slow-consumer policy decides.
//! Only a mesh link delivering here waits, and only for a subscriber that is
//! behind (more than half full, or over [`MESH_PACE_BYTES`]) and still
//! draining ([`Subscriber::room`]).
//! Queues are bounded in messages and in bytes (`budget`); a frame is encoded
//! once and every queue holds a reference to the same bytes.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use edgewire_api::SlowConsumerPolicy;
use foldhash::HashMap;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::budget::{Budget, Charge, Exceeded, Pace, Pacer};
use crate::metrics::DeliveryPath;

pub type ConnId = u64;

/// One delivery waiting in a connection's send queue: one message, or a
/// run of messages that one publisher sent on one channel back to back.
#[derive(Debug)]
pub struct Delivery {
    pub frames: Frames,
    /// When the (first) message was published.
    pub published_at: Instant,
    /// Published here, or at a peer agent and carried over the mesh.
    pub path: DeliveryPath,
    /// The bytes and messages this delivery holds of its queue's budget,
    /// and its bytes of the agent's.
    pub charge: Charge,
}

/// The messages of a delivery, in publish order. A run is shared by every
/// subscriber it is queued for.
#[derive(Clone, Debug)]
pub enum Frames {
    One(Utf8Bytes),
    Run(Arc<[Utf8Bytes]>),
}

impl Frames {
    pub fn as_slice(&self) -> &[Utf8Bytes] {
        match self {
            Frames::One(frame) => std::slice::from_ref(frame),
            Frames::Run(frames) => frames,
        }
    }

    /// The messages' bytes together.
    fn bytes(&self) -> usize {
        self.as_slice().iter().map(|frame| frame.len()).sum()
    }
}

/// What a subscribe or unsubscribe changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The subscription was added (or removed); false when it already was.
    pub changed: bool,
    /// The channel went from no local subscriber to one (or back): the
    /// moment the mesh's peers must learn of this agent's interest.
    pub edge: bool,
}

/// A subscriber that has written nothing for this long paces no mesh link.
pub const SUBSCRIBER_STALL: Duration = Duration::from_millis(500);

/// The most a subscriber holds queued (bytes, each delivery's entry overhead
/// included) before a mesh link delivering to it waits. Far below a send
/// queue's default budget: under a burst from a peer, what waits here waits
/// in front of every later message, so a publish's delay is this over the
/// subscriber's drain rate, and a small queue (a few hundred small messages)
/// still keeps the writer busy while the link is read on.
pub const MESH_PACE_BYTES: usize = 32 * 1024;

/// A subscriber's handle: its queue, and a way to tell it to go.
#[derive(Clone, Debug)]
pub struct Subscriber {
    pub queue: mpsc::Sender<Delivery>,
    /// The bytes and the messages its queue may hold (a run of messages
    /// takes one slot of `queue`, so `queue` alone does not count them).
    pub budget: Arc<Budget>,
    /// Signalled (once) when the subscriber must be disconnected as a slow consumer.
    pub evict: mpsc::Sender<()>,
    /// Mesh links waiting for this subscriber to catch up.
    pub pacer: Arc<Pacer>,
}

impl Subscriber {
    /// A subscriber whose queue holds at most `capacity` messages and
    /// `bytes` bytes, with the receiving ends of its queue and of its
    /// eviction signal.
    pub fn new(
        capacity: usize,
        bytes: usize,
    ) -> (Subscriber, mpsc::Receiver<Delivery>, mpsc::Receiver<()>) {
        let (queue, rx) = mpsc::channel(capacity);
        let (evict, evict_rx) = mpsc::channel(1);
        let budget = Budget::with_messages(bytes, capacity);
        (
            Subscriber {
                queue,
                budget,
                evict,
                pacer: Arc::new(Pacer::new(SUBSCRIBER_STALL)),
            },
            rx,
            evict_rx,
        )
    }

    /// More than half of its queue (in messages or bytes) is taken, or
    /// more than [`MESH_PACE_BYTES`].
    pub fn behind(&self) -> bool {
        let used = self.budget.used();
        used * 2 > self.budget.limit()
            || used > MESH_PACE_BYTES
            || self.messages_used() * 2 > self.messages_limit()
    }

    /// At most a quarter of its queue is taken, and at most half of
    /// [`MESH_PACE_BYTES`]: whoever waited may go on.
    pub fn caught_up(&self) -> bool {
        let used = self.budget.used();
        used * 4 <= self.budget.limit()
            && used * 2 <= MESH_PACE_BYTES
            && self.messages_used() * 4 <= self.messages_limit()
    }

    fn messages_used(&self) -> usize {
        self.budget.messages().0
    }

    fn messages_limit(&self) -> usize {
        self.budget.messages().1
    }

    /// Waits until the subscriber has caught up, has gone, or has written
    /// nothing for [`SUBSCRIBER_STALL`].
    pub async fn room(&self) -> Pace {
        self.pacer
            .wait(|| self.caught_up() || self.queue.is_closed())
            .await
    }
}

/// What one publish did, for the caller's metrics.
#[derive(Debug, Default)]
pub struct FanOut {
    pub queued: usize,
    /// Deliveries that did not fit a full queue (in messages or bytes).
    pub dropped: usize,
    /// Deliveries refused because the agent's global budget was spent; the
    /// subscriber is not at fault, so no policy applies.
    pub over_budget: usize,
    /// Subscribers told to disconnect under [`SlowConsumerPolicy::Disconnect`].
    pub evicted: usize,
    /// For a publish from the mesh: subscribers it left behind.
    pub behind: Vec<Subscriber>,
}

#[derive(Debug, Default)]
pub struct Hub {
    channels: RwLock<HashMap<String, HashMap<ConnId, Subscriber>>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Adds a subscription.
    pub fn subscribe(&self, channel: &str, id: ConnId, subscriber: Subscriber) -> Change {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let subscribers = channels.entry(channel.to_string()).or_default();
        let first = subscribers.is_empty();
        let changed = subscribers.insert(id, subscriber).is_none();
        Change {
            changed,
            edge: first && changed,
        }
    }

    /// Removes a subscription.
    pub fn unsubscribe(&self, channel: &str, id: ConnId) -> Change {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = channels.get_mut(channel) else {
            return Change {
                changed: false,
                edge: false,
            };
        };
        let changed = subscribers.remove(&id).is_some();
        let edge = changed && subscribers.is_empty();
        if subscribers.is_empty() {
            channels.remove(channel);
        }
        Change { changed, edge }
    }

    /// Removes every subscription of a connection that went away; returns
    /// the channels left without a local subscriber.
    pub fn remove_connection<'a>(
        &self,
        channels: impl IntoIterator<Item = &'a String>,
        id: ConnId,
    ) -> Vec<String> {
        channels
            .into_iter()
            .filter(|channel| self.unsubscribe(channel, id).edge)
            .cloned()
            .collect()
    }

    /// Channels with at least one local subscriber.
    pub fn active_channels(&self) -> Vec<String> {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.keys().cloned().collect()
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.get(channel).map_or(0, HashMap::len)
    }

    /// Queues `frame` for every subscriber of `channel`, each delivery
    /// charged to the subscriber's budget and to `global`. For a publish
    /// from the mesh, the report names the subscribers it left behind (the
    /// link waits for them).
    pub fn publish(
        &self,
        channel: &str,
        frame: &Utf8Bytes,
        published_at: Instant,
        path: DeliveryPath,
        policy: SlowConsumerPolicy,
        global: &Arc<Budget>,
    ) -> FanOut {
        self.each_subscriber(channel, |report, subscriber| {
            let one = Frames::One(frame.clone());
            report.offer(subscriber, one, published_at, path, policy, global);
        })
    }

    /// Queues a run of messages published back to back on `channel` (in
    /// order) for every subscriber: one queue entry, one wake of its writer
    /// and one charge per subscriber for the whole run, where a message at
    /// a time costs each of those per message. A subscriber that cannot
    /// take the whole run gets what fits, message by message, as
    /// [`Hub::publish`] would have given it.
    pub fn publish_run(
        &self,
        channel: &str,
        frames: &Arc<[Utf8Bytes]>,
        published_at: Instant,
        path: DeliveryPath,
        policy: SlowConsumerPolicy,
        global: &Arc<Budget>,
    ) -> FanOut {
        self.each_subscriber(channel, |report, subscriber| {
            let run = Frames::Run(Arc::clone(frames));
            if !report.offer_whole(subscriber, run, published_at, path, global) {
                for frame in frames.iter() {
                    let one = Frames::One(frame.clone());
                    report.offer(subscriber, one, published_at, path, policy, global);
                }
            }
        })
    }

    /// Runs `offer` for each subscriber of `channel` under the read lock,
    /// collecting what they did.
    fn each_subscriber(
        &self,
        channel: &str,
        mut offer: impl FnMut(&mut FanOut, &Subscriber),
    ) -> FanOut {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let mut report = FanOut::default();
        for subscriber in channels.get(channel).into_iter().flat_map(HashMap::values) {
            offer(&mut report, subscriber);
        }
        report
    }
}

impl FanOut {
    /// Queues `frames` for `subscriber` if all of them fit; false (and
    /// nothing queued or counted) if not.
    fn offer_whole(
        &mut self,
        subscriber: &Subscriber,
        frames: Frames,
        published_at: Instant,
        path: DeliveryPath,
        global: &Arc<Budget>,
    ) -> bool {
        let count = frames.as_slice().len();
        let bytes = frames.bytes();
        let Ok(charge) = Charge::take_run(bytes, count, &subscriber.budget, global) else {
            return false;
        };
        let delivery = Delivery {
            frames,
            published_at,
            path,
            charge,
        };
        // Its writer had nothing to do until now: it is not stuck.
        let idle = subscriber.messages_used() == count;
        match subscriber.queue.try_send(delivery) {
            Ok(()) => {
                if idle {
                    subscriber.pacer.progressed();
                }
                self.queued += count;
                if path == DeliveryPath::Mesh && subscriber.behind() {
                    self.behind.push(subscriber.clone());
                }
                true
            }
            // The subscriber is between closing and unsubscribing: nothing
            // to deliver to, nothing to drop.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    }

    /// Queues one message for `subscriber`, or drops it under `policy`.
    fn offer(
        &mut self,
        subscriber: &Subscriber,
        frame: Frames,
        published_at: Instant,
        path: DeliveryPath,
        policy: SlowConsumerPolicy,
        global: &Arc<Budget>,
    ) {
        if subscriber.messages_used() == 0 {
            // Its writer had nothing to do until now: it is not stuck.
            subscriber.pacer.progressed();
        }
        let bytes = frame.bytes();
        let full = match Charge::take(bytes, &subscriber.budget, global) {
            Ok(charge) => {
                let delivery = Delivery {
                    frames: frame,
                    published_at,
                    path,
                    charge,
                };
                match subscriber.queue.try_send(delivery) {
                    Ok(()) => false,
                    Err(mpsc::error::TrySendError::Full(_)) => true,
                    // The subscriber is between closing and unsubscribing.
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Err(Exceeded::Queue) => true,
            Err(Exceeded::Global) => {
                self.over_budget += 1;
                return;
            }
        };
        if !full {
            self.queued += 1;
            if path == DeliveryPath::Mesh && subscriber.behind() {
                self.behind.push(subscriber.clone());
            }
            return;
        }
        self.dropped += 1;
        if policy == SlowConsumerPolicy::Disconnect && subscriber.evict.try_send(()).is_ok() {
            self.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(capacity: usize) -> (Subscriber, mpsc::Receiver<Delivery>, mpsc::Receiver<()>) {
        subscriber_with(capacity, 1 << 20)
    }

    fn subscriber_with(
        capacity: usize,
        bytes: usize,
    ) -> (Subscriber, mpsc::Receiver<Delivery>, mpsc::Receiver<()>) {
        Subscriber::new(capacity, bytes)
    }

    /// Adds up what several publishes did.
    fn add(total: &mut FanOut, r: FanOut) {
        total.queued += r.queued;
        total.dropped += r.dropped;
        total.evicted += r.evicted;
    }

    fn global() -> Arc<Budget> {
        Budget::new(1 << 30)
    }

    #[test]
    fn publish_reaches_each_subscriber_once_in_order() {
        let hub = Hub::new();
        let (a, mut a_rx, _) = subscriber(8);
        let (b, mut b_rx, _) = subscriber(8);
        assert_eq!(
            hub.subscribe("chat", 1, a.clone()),
            Change {
                changed: true,
                edge: true
            }
        );
        assert_eq!(
            hub.subscribe("chat", 1, a),
            Change {
                changed: false,
                edge: false
            },
            "not new"
        );
        assert_eq!(
            hub.subscribe("chat", 2, b),
            Change {
                changed: true,
                edge: false
            }
        );
        for i in 0..5 {
            let report = hub.publish(
                "chat",
                &Utf8Bytes::from(format!("m{i}")),
                Instant::now(),
                DeliveryPath::Local,
                SlowConsumerPolicy::Disconnect,
                &global(),
            );
            assert_eq!(report.queued, 2);
        }
        for rx in [&mut a_rx, &mut b_rx] {
            let got: Vec<String> = (0..5)
                .map(|_| rx.try_recv().unwrap().frames.as_slice()[0].to_string())
                .collect();
            assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
            assert!(rx.try_recv().is_err(), "no duplicates");
        }
    }

    #[test]
    fn other_channels_and_unsubscribed_see_nothing() {
        let hub = Hub::new();
        let (a, mut a_rx, _) = subscriber(8);
        hub.subscribe("chat", 1, a.clone());
        hub.subscribe("news", 1, a);
        assert_eq!(
            hub.unsubscribe("chat", 1),
            Change {
                changed: true,
                edge: true
            }
        );
        assert_eq!(
            hub.unsubscribe("chat", 1),
            Change {
                changed: false,
                edge: false
            }
        );
        let frame = Utf8Bytes::from_static("x");
        let policy = SlowConsumerPolicy::Drop;
        assert_eq!(
            hub.publish(
                "chat",
                &frame,
                Instant::now(),
                DeliveryPath::Local,
                policy,
                &global()
            )
            .queued,
            0
        );
        assert!(a_rx.try_recv().is_err());
        assert_eq!(hub.active_channels(), ["news"]);
        assert_eq!(hub.remove_connection(&["news".to_string()], 1), ["news"]);
        assert_eq!(hub.subscriber_count("news"), 0);
    }

    #[test]
    fn slow_consumer_policies() {
        let frame = Utf8Bytes::from_static("x");
        for (policy, evicted) in [
            (SlowConsumerPolicy::Drop, 0),
            (SlowConsumerPolicy::Disconnect, 1),
        ] {
            let hub = Hub::new();
            let (slow, _rx, mut evict_rx) = subscriber(1);
            let (fast, mut fast_rx, _) = subscriber(8);
            hub.subscribe("c", 1, slow);
            hub.subscribe("c", 2, fast);
            let mut total = FanOut::default();
            for _ in 0..3 {
                let r = hub.publish(
                    "c",
                    &frame,
                    Instant::now(),
                    DeliveryPath::Local,
                    policy,
                    &global(),
                );
                add(&mut total, r);
            }
            assert_eq!(
                total.queued, 4,
                "{policy:?}: 1 to the slow one, 3 to the fast one"
            );
            assert_eq!(total.dropped, 2, "{policy:?}");
            assert_eq!(
                total.evicted, evicted,
                "{policy:?}: evicted once, not per drop"
            );
            assert_eq!(evict_rx.try_recv().is_ok(), evicted == 1);
            for _ in 0..3 {
                assert!(
                    fast_rx.try_recv().is_ok(),
                    "the fast subscriber is not held back"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_mesh_publish_names_subscribers_more_than_half_full_until_they_catch_up() {
        let hub = Hub::new();
        let (sub, mut rx, _) = subscriber(8);
        hub.subscribe("c", 1, sub.clone());
        let frame = Utf8Bytes::from_static("x");
        let publish = |path| {
            hub.publish(
                "c",
                &frame,
                Instant::now(),
                path,
                SlowConsumerPolicy::Drop,
                &global(),
            )
        };
        for _ in 0..4 {
            let report = publish(DeliveryPath::Mesh);
            assert!(report.behind.is_empty(), "half full is not behind");
        }
        assert_eq!(
            publish(DeliveryPath::Mesh).behind.len(),
            1,
            "5 of 8 is behind"
        );
        assert!(
            publish(DeliveryPath::Local).behind.is_empty(),
            "a local publisher never waits"
        );
        let waiter = tokio::spawn({
            let sub = sub.clone();
            async move { sub.room().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "waits while the subscriber is behind"
        );
        // The subscriber's writer takes 4 of 6: 2 left, a quarter.
        for _ in 0..4 {
            drop(rx.try_recv().unwrap());
        }
        sub.pacer.took(sub.caught_up());
        let pace = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("released once caught up")
            .unwrap();
        assert_eq!(pace, Pace::Room);
    }

    #[test]
    fn a_large_queue_holds_back_the_mesh_at_a_fixed_size_not_at_half() {
        // The default send queue: 4,096 messages, 8 MiB.
        let hub = Hub::new();
        let (sub, mut rx, _) = subscriber_with(4096, 8 << 20);
        hub.subscribe("c", 1, sub.clone());
        let frame = Utf8Bytes::from("x".repeat(100));
        let entry = frame.len() + crate::budget::ENTRY_OVERHEAD;
        let mut queued = 0;
        while hub
            .publish(
                "c",
                &frame,
                Instant::now(),
                DeliveryPath::Mesh,
                SlowConsumerPolicy::Drop,
                &global(),
            )
            .behind
            .is_empty()
        {
            queued += 1;
            assert!(queued < 2048, "behind long before half of the queue");
        }
        assert_eq!(queued + 1, MESH_PACE_BYTES / entry + 1);
        // Caught up only once down to half of the threshold.
        while sub.budget.used() * 2 > MESH_PACE_BYTES {
            assert!(!sub.caught_up());
            drop(rx.try_recv().unwrap());
        }
        assert!(sub.caught_up());
    }

    #[test]
    fn queues_are_bounded_in_bytes_and_give_them_back() {
        let global = Budget::new(1 << 20);
        let frame = Utf8Bytes::from("x".repeat(1000));
        let hub = Hub::new();
        // Room for 3 deliveries of 1000 bytes (plus overhead) by bytes, 100 by count.
        let (slow, mut slow_rx, _) = subscriber_with(100, 3 * 1100);
        let (fast, mut fast_rx, _) = subscriber(100);
        hub.subscribe("c", 1, slow);
        hub.subscribe("c", 2, fast);
        let mut dropped = 0;
        for _ in 0..5 {
            let r = hub.publish(
                "c",
                &frame,
                Instant::now(),
                DeliveryPath::Local,
                SlowConsumerPolicy::Drop,
                &global,
            );
            dropped += r.dropped;
        }
        assert_eq!(dropped, 2, "the slow queue holds 3 by bytes");
        assert_eq!(global.used(), 8 * (1000 + crate::budget::ENTRY_OVERHEAD));
        drop(slow_rx.try_recv().unwrap());
        while fast_rx.try_recv().is_ok() {}
        assert_eq!(global.used(), 2 * (1000 + crate::budget::ENTRY_OVERHEAD));
        // A spent global budget refuses without blaming the subscriber.
        let tight = Budget::new(500);
        let r = hub.publish(
            "c",
            &frame,
            Instant::now(),
            DeliveryPath::Local,
            SlowConsumerPolicy::Disconnect,
            &tight,
        );
        assert_eq!(
            (r.queued, r.dropped, r.over_budget, r.evicted),
            (0, 0, 2, 0)
        );
    }

    fn run_of(n: usize, bytes: usize) -> Arc<[Utf8Bytes]> {
        (0..n)
            .map(|i| Utf8Bytes::from(format!("{i}{}", "x".repeat(bytes - 1))))
            .collect()
    }

    /// A run published on channel `c` at this agent.
    fn local_run(
        hub: &Hub,
        run: Arc<[Utf8Bytes]>,
        policy: SlowConsumerPolicy,
        global: &Arc<Budget>,
    ) -> FanOut {
        let now = Instant::now();
        hub.publish_run("c", &run, now, DeliveryPath::Local, policy, global)
    }

    fn texts(delivery: &Delivery) -> Vec<String> {
        delivery
            .frames
            .as_slice()
            .iter()
            .map(|f| f[..1].to_string())
            .collect()
    }

    #[test]
    fn a_run_is_one_delivery_per_subscriber_charged_per_message() {
        let global = global();
        let hub = Hub::new();
        let (a, mut a_rx, _) = subscriber(8);
        let (b, mut b_rx, _) = subscriber(8);
        hub.subscribe("c", 1, a.clone());
        hub.subscribe("c", 2, b);
        let r = local_run(&hub, run_of(5, 10), SlowConsumerPolicy::Drop, &global);
        assert_eq!((r.queued, r.dropped), (10, 0));
        assert_eq!(a.budget.messages(), (5, 8), "counted in messages");
        assert_eq!(a.budget.used(), 5 * (10 + crate::budget::ENTRY_OVERHEAD));
        for rx in [&mut a_rx, &mut b_rx] {
            let delivery = rx.try_recv().unwrap();
            assert_eq!(texts(&delivery), ["0", "1", "2", "3", "4"]);
            assert!(rx.try_recv().is_err(), "one delivery for the run");
        }
        assert_eq!(a.budget.messages(), (0, 8), "given back once taken");
        assert_eq!(global.used(), 0);
    }

    #[test]
    fn a_run_that_does_not_fit_whole_gets_what_fits_message_by_message() {
        for (policy, evicted) in [
            (SlowConsumerPolicy::Drop, 0),
            (SlowConsumerPolicy::Disconnect, 1),
        ] {
            let hub = Hub::new();
            // Room for 7 messages by count, and 4 more after a run of 3.
            let (slow, mut slow_rx, mut evict_rx) = subscriber(7);
            let (fast, mut fast_rx, _) = subscriber(64);
            hub.subscribe("c", 1, slow);
            hub.subscribe("c", 2, fast);
            let mut total = FanOut::default();
            for run in [run_of(3, 10), run_of(6, 10)] {
                let r = local_run(&hub, run, policy, &global());
                add(&mut total, r);
            }
            assert_eq!(total.queued, 3 + 4 + 9, "{policy:?}");
            assert_eq!(
                total.dropped, 2,
                "{policy:?}: the last two of the second run"
            );
            assert_eq!(total.evicted, evicted, "{policy:?}");
            assert_eq!(evict_rx.try_recv().is_ok(), evicted == 1);
            let got: Vec<String> = std::iter::from_fn(|| slow_rx.try_recv().ok())
                .flat_map(|d| texts(&d))
                .collect();
            assert_eq!(
                got,
                ["0", "1", "2", "0", "1", "2", "3"],
                "in order, a prefix"
            );
            let got: Vec<String> = std::iter::from_fn(|| fast_rx.try_recv().ok())
                .flat_map(|d| texts(&d))
                .collect();
            assert_eq!(got.len(), 9, "the fast subscriber is not held back");
        }
    }

    #[test]
    fn a_run_is_bounded_in_bytes_like_its_messages() {
        let hub = Hub::new();
        // Room for 3 messages of 1000 bytes (plus overhead) by bytes.
        let (slow, mut slow_rx, _) = subscriber_with(100, 3 * 1100);
        hub.subscribe("c", 1, slow);
        let r = local_run(&hub, run_of(5, 1000), SlowConsumerPolicy::Drop, &global());
        assert_eq!((r.queued, r.dropped), (3, 2));
        let got: Vec<String> = std::iter::from_fn(|| slow_rx.try_recv().ok())
            .flat_map(|d| texts(&d))
            .collect();
        assert_eq!(got, ["0", "1", "2"]);
    }
}
