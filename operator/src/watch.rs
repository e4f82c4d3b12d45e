//! How the operator's watches ride out an API server outage.
//!
//! kube's default watch backoff grows to 30 s and only resets after two
//! quiet minutes, and a watch that comes back to a restarted API server
//! first gets `410 Expired` and pays one more backoff before it relists: the
//! operator could be blind for a minute after the API returns. Its decisions
//! rest on heartbeat freshness, so it backs off briefly instead, and it
//! makes no staleness decisions from an EdgeNode cache it knows is behind.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::utils::Backoff;
use kube::runtime::watcher;

const FIRST: Duration = Duration::from_millis(250);
const MAX: Duration = Duration::from_secs(5);

/// 250 ms doubling to 5 s; reset by the watch's next success. One operator
/// replica keeps a handful of watches, so retrying every 5 s at most is
/// cheap for the API server.
#[derive(Debug, Default)]
pub struct WatchBackoff {
    failures: u32,
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = FIRST.saturating_mul(1 << self.failures.min(8)).min(MAX);
        self.failures = self.failures.saturating_add(1);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Whether a cache fed by a watch is known to be behind: its last event was
/// an error, and it has not delivered since. Once `grace` passes after the
/// last error with the watch quiet, the cache is trusted again: a resumed
/// watch with nothing to deliver looks the same as a healthy idle one.
pub fn behind(
    last_ok: Option<Instant>,
    last_error: Option<Instant>,
    now: Instant,
    grace: Duration,
) -> bool {
    match (last_ok, last_error) {
        (_, None) => false,
        (Some(ok), Some(err)) if ok >= err => false,
        (_, Some(err)) => now.saturating_duration_since(err) < grace,
    }
}

/// What a watch's events say about the health of the cache it fills.
#[derive(Debug, Default)]
pub struct ViewHealth {
    last: Mutex<(Option<Instant>, Option<Instant>)>,
}

impl ViewHealth {
    pub fn observe<K>(&self, event: &Result<watcher::Event<K>, watcher::Error>) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            // A relist replaces the cache only when it is done.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => last.0 = Some(now),
            Err(_) => last.1 = Some(now),
        }
    }

    pub fn behind(&self, grace: Duration) -> bool {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        behind(last.0, last.1, Instant::now(), grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_short_and_resets() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (&mut b).take(7).collect();
        assert_eq!(delays[0], Duration::from_millis(250));
        assert_eq!(delays[1], Duration::from_millis(500));
        assert_eq!(delays[4], Duration::from_secs(4));
        assert_eq!(delays[5], MAX);
        assert_eq!(delays[6], MAX);
        b.reset();
        assert_eq!(b.next(), Some(FIRST));
    }

    #[test]
    fn a_cache_is_behind_from_an_error_until_it_delivers_or_the_grace_ends() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let grace = Duration::from_secs(30);
        // Never failed, or delivered since the last error: current.
        assert!(!behind(None, None, t0, grace));
        assert!(!behind(Some(t0), None, t0, grace));
        assert!(!behind(Some(t0 + 2 * s), Some(t0 + s), t0 + 3 * s, grace));
        // Failed and has not delivered since: behind, until the grace ends.
        assert!(behind(Some(t0), Some(t0 + s), t0 + 2 * s, grace));
        assert!(behind(None, Some(t0), t0 + 29 * s, grace));
        assert!(!behind(Some(t0), Some(t0 + s), t0 + 31 * s, grace));
    }

    #[test]
    fn events_move_the_health() {
        let view = ViewHealth::default();
        let grace = Duration::from_secs(30);
        assert!(!view.behind(grace));
        view.observe::<()>(&Err(watcher::Error::NoResourceVersion));
        assert!(view.behind(grace));
        // Relisting: not current until the list is complete.
        view.observe::<()>(&Ok(watcher::Event::Init));
        view.observe::<()>(&Ok(watcher::Event::InitApply(())));
        assert!(view.behind(grace));
        view.observe::<()>(&Ok(watcher::Event::InitDone));
        assert!(!view.behind(grace));
    }
}
