//! How the operator's watches ride out an API server outage.
//!
//! kube's default watch backoff grows to 30 s and only resets after two
//! quiet minutes, and a watch that comes back to a restarted API server
//! first gets `410 Expired` and pays one more backoff before it relists: the
//! operator could be blind for a minute after the API returns. Its decisions
//! rest on heartbeat freshness, so it backs off briefly instead (and judges
//! no staleness while its view is behind: see `freshness`).

use std::time::Duration;

use kube::runtime::utils::Backoff;

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
}
