//! Memory budgets in bytes for what waits to be written: each queued
//! message is charged to its queue's budget (a connection's send queue, a
//! mesh link) and to the agent's global budget, and gives the bytes back when
//! it is written or dropped. A message that does not fit is refused at once,
//! so no slow reader, however slow, grows the agent past its budget.
//!
//! A queue that is behind may also pace what feeds it ([`Pacer`]): the
//! producer waits while the queue drains, but never for a reader that has
//! stopped, so a stalled reader holds no one up for longer than a stall.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// What a queued entry costs besides its bytes (queue slot, timestamps,
/// reference counts), so that a flood of tiny messages is bounded too.
pub const ENTRY_OVERHEAD: usize = 64;

#[derive(Debug)]
pub struct Budget {
    bytes: Counter,
    /// A queue bounded in messages too counts them here (beside its bytes,
    /// so one charge touches one allocation).
    messages: Option<Counter>,
}

#[derive(Debug)]
struct Counter {
    limit: usize,
    used: AtomicUsize,
}

impl Counter {
    fn new(limit: usize) -> Counter {
        Counter {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            bytes: Counter::new(limit),
            messages: None,
        })
    }

    /// A queue's budget of `limit` bytes and at most `messages` messages.
    pub fn with_messages(limit: usize, messages: usize) -> Arc<Budget> {
        Arc::new(Budget {
            bytes: Counter::new(limit),
            messages: Some(Counter::new(messages)),
        })
    }

    pub fn used(&self) -> usize {
        self.bytes.used()
    }

    pub fn limit(&self) -> usize {
        self.bytes.limit
    }

    /// Messages held, and the most it may hold; `(0, usize::MAX)` for a
    /// budget of bytes alone.
    pub fn messages(&self) -> (usize, usize) {
        self.messages
            .as_ref()
            .map_or((0, usize::MAX), |m| (m.used(), m.limit))
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.bytes.try_take(bytes)
    }

    fn give_back(&self, bytes: usize) {
        self.bytes.give_back(bytes);
    }

    fn try_take_messages(&self, n: usize) -> bool {
        self.messages.as_ref().is_none_or(|m| m.try_take(n))
    }

    fn give_back_messages(&self, n: usize) {
        if let Some(m) = &self.messages {
            m.give_back(n);
        }
    }
}

/// Which budget refused a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// The queue's own budget: this reader is behind.
    Queue,
    /// The agent's global budget: everything queued together is at the limit.
    Global,
}

/// Bytes (and messages) held against a queue's budget and the global one,
/// given back on drop.
#[derive(Debug)]
pub struct Charge {
    bytes: usize,
    messages: usize,
    queue: Arc<Budget>,
    global: Arc<Budget>,
}

impl Charge {
    /// Charges one message of `bytes` (plus [`ENTRY_OVERHEAD`]) to both
    /// budgets, or to neither.
    pub fn take(
        bytes: usize,
        queue: &Arc<Budget>,
        global: &Arc<Budget>,
    ) -> Result<Charge, Exceeded> {
        Charge::take_run(bytes, 1, queue, global)
    }

    /// Charges `messages` messages of `bytes` together (plus
    /// [`ENTRY_OVERHEAD`] each) to both budgets, or nothing.
    pub fn take_run(
        bytes: usize,
        messages: usize,
        queue: &Arc<Budget>,
        global: &Arc<Budget>,
    ) -> Result<Charge, Exceeded> {
        let bytes = bytes + messages * ENTRY_OVERHEAD;
        if !queue.try_take(bytes) {
            return Err(Exceeded::Queue);
        }
        if !queue.try_take_messages(messages) {
            queue.give_back(bytes);
            return Err(Exceeded::Queue);
        }
        if !global.try_take(bytes) {
            queue.give_back(bytes);
            queue.give_back_messages(messages);
            return Err(Exceeded::Global);
        }
        Ok(Charge {
            bytes,
            messages,
            queue: Arc::clone(queue),
            global: Arc::clone(global),
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.queue.give_back(self.bytes);
        self.queue.give_back_messages(self.messages);
        self.global.give_back(self.bytes);
    }
}

/// What a producer found when it waited for a queue that is behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// The queue drained (or its reader is gone): nothing to wait for.
    Room,
    /// The reader has taken nothing for the stall time; the producer goes on.
    Stuck,
}

/// How a producer waits for a queue's reader: while the reader keeps taking
/// from the queue, for as long as the queue is behind; not at all once the
/// reader has taken nothing for `stall` (counted from when it last took
/// something or last had nothing to take).
#[derive(Debug)]
pub struct Pacer {
    stall: Duration,
    room: Notify,
    /// Producers waiting, so the reader signals only when needed.
    waiting: AtomicUsize,
    /// When the reader last made progress: microseconds since `epoch`.
    progress_us: AtomicU64,
    epoch: Instant,
}

impl Pacer {
    pub fn new(stall: Duration) -> Pacer {
        Pacer {
            stall,
            room: Notify::new(),
            waiting: AtomicUsize::new(0),
            progress_us: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The reader took something, or had nothing to take (it is not stuck).
    pub fn progressed(&self) {
        let now = self.epoch.elapsed().as_micros() as u64;
        self.progress_us.store(now, Ordering::Release);
    }

    /// The reader took something; `drained` says whether the queue is now
    /// low enough for waiting producers to go on.
    pub fn took(&self, drained: bool) {
        self.progressed();
        if drained && self.waiting.load(Ordering::Acquire) > 0 {
            self.room.notify_waiters();
        }
    }

    /// Wakes every waiting producer to look again (the reader went away).
    pub fn release(&self) {
        self.room.notify_waiters();
    }

    /// Waits until `go_on()` holds or the reader is stuck.
    pub async fn wait(&self, go_on: impl Fn() -> bool) -> Pace {
        // Counted before the first look, so a reader that drains the queue
        // right after it always signals.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if go_on() {
                return Pace::Room;
            }
            let stuck_at = self.epoch
                + Duration::from_micros(self.progress_us.load(Ordering::Acquire))
                + self.stall;
            if Instant::now() >= stuck_at {
                return Pace::Stuck;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(stuck_at) => {}
            }
        }
    }
}

/// One producer in [`Pacer::wait`], for as long as it waits there.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_both_budgets_or_neither_and_come_back_on_drop() {
        let global = Budget::new(1000);
        let a = Budget::new(600);
        let b = Budget::new(600);
        let first = Charge::take(436, &a, &global).unwrap();
        assert_eq!((a.used(), global.used()), (500, 500));
        assert_eq!(Charge::take(100, &a, &global).unwrap_err(), Exceeded::Queue);
        let second = Charge::take(436, &b, &global).unwrap();
        assert_eq!(
            Charge::take(10, &b, &global).unwrap_err(),
            Exceeded::Global,
            "74 more bytes would fit b (500 of 600) but not the global budget (1000 of 1000)"
        );
        assert_eq!(b.used(), 500, "a refused charge leaves nothing behind");
        drop(first);
        drop(second);
        assert_eq!((a.used(), b.used(), global.used()), (0, 0, 0));
    }
}
