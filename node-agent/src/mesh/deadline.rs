//! A deadline that progress pushes back, with one timer for a link's life.
//!
//! A busy link reads or writes tens of thousands of frames a second; a new
//! timer for each (`tokio::time::timeout`) registers and removes a timer
//! wheel entry every time. Here progress only notes the time, and the timer,
//! when it fires, is moved to where the deadline now is: it fires at most
//! once per period of the deadline, whatever the traffic.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct Deadline {
    after: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    /// A deadline `after` from now.
    pub fn new(after: Duration) -> Deadline {
        let last = Instant::now();
        Deadline {
            after,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + after)),
        }
    }

    /// Something happened: the deadline is `after` from now.
    pub fn progressed(&mut self) {
        self.last = Instant::now();
    }

    /// Resolves once nothing progressed for `after`. Cancel-safe: dropping
    /// it loses nothing, so it can race each read or write in a `select!`.
    pub async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            let due = self.last + self.after;
            if due <= Instant::now() {
                return;
            }
            self.timer.as_mut().reset(due);
        }
    }

    /// Runs `work` with the whole deadline from now; None if it passed first.
    pub async fn within<F: Future>(&mut self, work: F) -> Option<F::Output> {
        self.progressed();
        tokio::select! {
            biased;
            done = work => Some(done),
            _ = self.expired() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn progress_pushes_the_deadline_back_and_silence_ends_it() {
        let started = Instant::now();
        let mut deadline = Deadline::new(AFTER);
        for _ in 0..4 {
            tokio::time::sleep(AFTER / 3).await;
            deadline.progressed();
        }
        let quiet_from = Instant::now();
        deadline.expired().await;
        assert!(started.elapsed() >= AFTER * 4 / 3 + AFTER, "pushed back");
        assert!(quiet_from.elapsed() >= AFTER, "a whole period of silence");
    }

    #[tokio::test]
    async fn work_within_the_deadline_finishes_and_work_past_it_is_cut() {
        let mut deadline = Deadline::new(AFTER);
        tokio::time::sleep(AFTER * 2).await;
        // The deadline had passed, but a new piece of work gets a whole one.
        assert_eq!(deadline.within(async { 7 }).await, Some(7));
        let cut = deadline.within(tokio::time::sleep(AFTER * 10)).await;
        assert_eq!(cut, None);
    }
}
