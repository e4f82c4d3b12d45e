//! A coalescing queue of reconcile requests between the cache tasks and the
//! controller. The caches are filled by tasks of their own, so they stay
//! current however far the controller is behind; what they learn reaches the
//! controller through this queue, where a request already waiting absorbs
//! every later one for the same object. Its size is bounded by the number of
//! objects, never by the number of events.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use tokio::sync::Notify;

struct Pending<T> {
    order: VecDeque<T>,
    queued: HashSet<T>,
}

pub struct CoalescingQueue<T> {
    pending: Mutex<Pending<T>>,
    ready: Notify,
}

impl<T: Clone + Eq + Hash> CoalescingQueue<T> {
    pub fn new() -> Arc<CoalescingQueue<T>> {
        Arc::new(CoalescingQueue {
            pending: Mutex::new(Pending {
                order: VecDeque::new(),
                queued: HashSet::new(),
            }),
            ready: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<T>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` unless it is already waiting.
    pub fn push(&self, item: T) {
        let mut pending = self.lock();
        if pending.queued.insert(item.clone()) {
            pending.order.push_back(item);
            drop(pending);
            // A stored permit when nobody waits: no wake-up is lost.
            self.ready.notify_one();
        }
    }

    pub fn extend(&self, items: impl IntoIterator<Item = T>) {
        for item in items {
            self.push(item);
        }
    }

    fn pop(&self) -> Option<T> {
        let mut pending = self.lock();
        let item = pending.order.pop_front()?;
        pending.queued.remove(&item);
        Some(item)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// The queued items, oldest first; waits when empty. Meant for one consumer.
    pub fn stream(self: Arc<Self>) -> impl Stream<Item = T> + Send + 'static
    where
        T: Send + 'static,
    {
        futures_util::stream::unfold(self, |queue| async move {
            loop {
                if let Some(item) = queue.pop() {
                    return Some((item, queue));
                }
                queue.ready.notified().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn repeated_requests_coalesce_and_order_holds() {
        let queue = CoalescingQueue::new();
        for item in ["a", "b", "a", "c", "b", "a"] {
            queue.push(item);
        }
        assert_eq!(queue.len(), 3);
        let mut stream = Box::pin(Arc::clone(&queue).stream());
        assert_eq!(stream.next().await, Some("a"));
        // Once taken, a request may be queued again.
        queue.push("a");
        let rest: Vec<&str> = stream.take(3).collect().await;
        assert_eq!(rest, ["b", "c", "a"]);
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_push() {
        let queue = CoalescingQueue::new();
        let mut stream = Box::pin(Arc::clone(&queue).stream());
        let pusher = Arc::clone(&queue);
        let task = tokio::spawn(async move {
            tokio::task::yield_now().await;
            pusher.push(7);
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next()).await;
        assert_eq!(got.ok().flatten(), Some(7));
        task.await.ok();
    }
}
