//! The relay's channel hub: who subscribes to which channel on this agent, and
//! fan-out of a publish to each subscriber's bounded send queue.
//!
//! Order per publisher holds because a publish is pushed into every queue
//! before the publisher's next message is read, and each queue is FIFO. A full
//! queue never blocks the publisher: the service's slow-consumer policy decides.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Instant;

use edgewire_api::SlowConsumerPolicy;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub type ConnId = u64;

/// One delivery waiting in a connection's send queue.
#[derive(Debug)]
pub struct Delivery {
    pub frame: Utf8Bytes,
    pub published_at: Instant,
}

/// A subscriber's handle: its queue, and a way to tell it to go.
#[derive(Clone, Debug)]
pub struct Subscriber {
    pub queue: mpsc::Sender<Delivery>,
    /// Signalled (once) when the subscriber must be disconnected as a slow consumer.
    pub evict: mpsc::Sender<()>,
}

/// What one publish did, for the caller's metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FanOut {
    pub queued: usize,
    /// Deliveries that did not fit a full queue.
    pub dropped: usize,
    /// Subscribers told to disconnect under [`SlowConsumerPolicy::Disconnect`].
    pub evicted: usize,
}

#[derive(Debug, Default)]
pub struct Hub {
    channels: RwLock<HashMap<String, HashMap<ConnId, Subscriber>>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Adds a subscription; true when it is new.
    pub fn subscribe(&self, channel: &str, id: ConnId, subscriber: Subscriber) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(channel.to_string())
            .or_default()
            .insert(id, subscriber)
            .is_none()
    }

    /// Removes a subscription; true when there was one.
    pub fn unsubscribe(&self, channel: &str, id: ConnId) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = channels.get_mut(channel) else {
            return false;
        };
        let removed = subscribers.remove(&id).is_some();
        if subscribers.is_empty() {
            channels.remove(channel);
        }
        removed
    }

    /// Removes every subscription of a connection that went away.
    pub fn remove_connection<'a>(
        &self,
        channels: impl IntoIterator<Item = &'a String>,
        id: ConnId,
    ) {
        for channel in channels {
            self.unsubscribe(channel, id);
        }
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        channels.get(channel).map_or(0, HashMap::len)
    }

    /// Queues `frame` for every subscriber of `channel`.
    pub fn publish(
        &self,
        channel: &str,
        frame: &Utf8Bytes,
        published_at: Instant,
        policy: SlowConsumerPolicy,
    ) -> FanOut {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let mut report = FanOut::default();
        let Some(subscribers) = channels.get(channel) else {
            return report;
        };
        for subscriber in subscribers.values() {
            let delivery = Delivery {
                frame: frame.clone(),
                published_at,
            };
            match subscriber.queue.try_send(delivery) {
                Ok(()) => report.queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    report.dropped += 1;
                    if policy == SlowConsumerPolicy::Disconnect
                        && subscriber.evict.try_send(()).is_ok()
                    {
                        report.evicted += 1;
                    }
                }
                // The subscriber is between closing and unsubscribing.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(capacity: usize) -> (Subscriber, mpsc::Receiver<Delivery>, mpsc::Receiver<()>) {
        let (queue, rx) = mpsc::channel(capacity);
        let (evict, evict_rx) = mpsc::channel(1);
        (Subscriber { queue, evict }, rx, evict_rx)
    }

    #[test]
    fn publish_reaches_each_subscriber_once_in_order() {
        let hub = Hub::new();
        let (a, mut a_rx, _) = subscriber(8);
        let (b, mut b_rx, _) = subscriber(8);
        assert!(hub.subscribe("chat", 1, a.clone()));
        assert!(!hub.subscribe("chat", 1, a), "second subscribe is not new");
        hub.subscribe("chat", 2, b);
        for i in 0..5 {
            let report = hub.publish(
                "chat",
                &Utf8Bytes::from(format!("m{i}")),
                Instant::now(),
                SlowConsumerPolicy::Disconnect,
            );
            assert_eq!(report.queued, 2);
        }
        for rx in [&mut a_rx, &mut b_rx] {
            let got: Vec<String> = (0..5)
                .map(|_| rx.try_recv().unwrap().frame.to_string())
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
        assert!(hub.unsubscribe("chat", 1));
        assert!(!hub.unsubscribe("chat", 1));
        let frame = Utf8Bytes::from_static("x");
        let policy = SlowConsumerPolicy::Drop;
        assert_eq!(
            hub.publish("chat", &frame, Instant::now(), policy).queued,
            0
        );
        assert!(a_rx.try_recv().is_err());
        hub.remove_connection(&["news".to_string()], 1);
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
                let r = hub.publish("c", &frame, Instant::now(), policy);
                total.queued += r.queued;
                total.dropped += r.dropped;
                total.evicted += r.evicted;
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
}
