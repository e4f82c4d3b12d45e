//! A coalescing queue of reconcile requests between the cache tasks and the
//! controller. The caches are filled by tasks of their own, so they stay
//! current however far the controller is behind; what they learn reaches the
//! controller through this queue, where a request already waiting absorbs
//! every later one for the same object. Its size is bounded by the number of
//! objects, never by the number of events.
//!
//! A request waits a batch period from its first arrival, as the
//! EndpointSlice controller batches Pod changes: the changes that come
//! meanwhile join it. Later ones never push it back, so a stream of changes
//! (a relabelled fleet, neighbours on the same port placing) delays a
//! reconcile by one period at most. A debounce that restarts on every change
//! would hold it back for as long as the changes keep coming.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::Notify;
use tokio::time::Instant;

struct Pending<T> {
    /// Requests with the time each is due. One delay for all keeps this in
    /// order of due time.
    order: VecDeque<(T, Instant)>,
    queued: HashSet<T>,
}

pub struct CoalescingQueue<T> {
    pending: Mutex<Pending<T>>,
    ready: Notify,
    batch_period: Duration,
}

impl<T: Clone + Eq + Hash> CoalescingQueue<T> {
    /// A queue whose requests are released `batch_period` after their first
    /// arrival.
    pub fn new(batch_period: Duration) -> Arc<CoalescingQueue<T>> {
        Arc::new(CoalescingQueue {
            pending: Mutex::new(Pending {
                order: VecDeque::new(),
                queued: HashSet::new(),
            }),
            ready: Notify::new(),
            batch_period,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<T>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` unless it is already waiting.
    pub fn push(&self, item: T) {
        let mut pending = self.lock();
        if pending.queued.insert(item.clone()) {
            let due = Instant::now() + self.batch_period;
            pending.order.push_back((item, due));
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

    /// The oldest request if it is due, else when it will be (None: empty).
    fn pop(&self) -> Result<T, Option<Instant>> {
        let mut pending = self.lock();
        if let Some((_, due)) = pending.order.front()
            && *due > Instant::now()
        {
            return Err(Some(*due));
        }
        let (item, _) = pending.order.pop_front().ok_or(None)?;
        pending.queued.remove(&item);
        Ok(item)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// The queued items, oldest first, each once it is due; waits when
    /// none is. Meant for one consumer.
    pub fn stream(self: Arc<Self>) -> impl Stream<Item = T> + Send + 'static
    where
        T: Send + 'static,
    {
        futures_util::stream::unfold(self, |queue| async move {
            loop {
                match queue.pop() {
                    Ok(item) => return Some((item, queue)),
                    // A push only queues behind the oldest request, so
                    // nothing becomes due before it.
                    Err(Some(due)) => tokio::time::sleep_until(due).await,
                    Err(None) => queue.ready.notified().await,
                }
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
        let queue = CoalescingQueue::new(Duration::ZERO);
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
        let queue = CoalescingQueue::new(Duration::ZERO);
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

    /// Requests for one object every 100 ms, for 3 s: it is released one
    /// batch period after the first, and again one period after the first
    /// that came once it was taken; never held back while they keep coming.
    #[tokio::test(start_paused = true)]
    async fn a_stream_of_requests_waits_one_batch_period_at_most() {
        let period = Duration::from_millis(500);
        let queue = CoalescingQueue::new(period);
        let mut stream = Box::pin(Arc::clone(&queue).stream());
        let pusher = Arc::clone(&queue);
        let start = Instant::now();
        let task = tokio::spawn(async move {
            for _ in 0..30 {
                pusher.push("busy");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut released = Vec::new();
        while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(2), stream.next()).await
        {
            assert_eq!(item, "busy");
            released.push(start.elapsed());
        }
        task.await.ok();
        // Due at 0.5 s; then pushed again at 0.5 s (after the take at the
        // same instant, or just before it: then at 0.6 s), and so on.
        assert!(released.len() >= 5, "{released:?}");
        assert_eq!(released[0], period);
        for pair in released.windows(2) {
            assert!(
                pair[1] - pair[0] <= period + Duration::from_millis(100),
                "{released:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_waits_from_its_own_first_arrival() {
        let queue = CoalescingQueue::new(Duration::from_millis(500));
        let mut stream = Box::pin(Arc::clone(&queue).stream());
        let start = Instant::now();
        queue.push("a");
        tokio::time::sleep(Duration::from_millis(300)).await;
        queue.push("b");
        queue.push("a");
        assert_eq!(stream.next().await, Some("a"));
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        assert_eq!(stream.next().await, Some("b"));
        assert_eq!(start.elapsed(), Duration::from_millis(800));
    }
}
