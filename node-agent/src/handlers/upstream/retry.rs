//! When a failed attempt is tried again: only a request that may be
//! repeated safely (an idempotent method, or any method when the handler
//! says the upstream tolerates repeats), only after a failure (see
//! [`Outcome::is_failure`]; a timeout spent the deadline), and only while
//! the backoff's next delay fits in what is left of the deadline. The
//! delays are `backon`'s exponential backoff with full jitter.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hyper::Method;

use super::outcome::Outcome;

/// The first retry waits up to this long (jittered), each next one twice as
/// long, never more than `MAX_DELAY`.
const MIN_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// RFC 9110 §9.2.2: methods whose repetition has the effect of one request.
pub fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// The delays between attempts for a handler with `retries` retries.
pub fn backoff(retries: u32) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(retries as usize)
        .build()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    RetryAfter(Duration),
    Stop,
}

/// What follows an attempt that ended with `outcome`. `delay` is the
/// backoff's next delay (`None` when the retries are spent), `remaining`
/// what is left of the deadline.
pub fn next(
    outcome: Outcome,
    repeatable: bool,
    delay: Option<Duration>,
    remaining: Duration,
) -> Next {
    if !repeatable || !outcome.is_failure() || outcome == Outcome::Timeout {
        return Next::Stop;
    }
    match delay {
        Some(delay) if delay < remaining => Next::RetryAfter(delay),
        _ => Next::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOTS: Duration = Duration::from_secs(60);

    #[test]
    fn idempotent_methods_only() {
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&method), "{method}");
        }
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }

    #[test]
    fn retries_failures_of_repeatable_requests_within_the_deadline() {
        let wait = Duration::from_millis(100);
        let d = Some(wait);
        assert_eq!(
            next(Outcome::ConnectFailed, true, d, LOTS),
            Next::RetryAfter(wait)
        );
        assert_eq!(
            next(Outcome::Answered(503), true, d, LOTS),
            Next::RetryAfter(wait)
        );
        assert_eq!(
            next(Outcome::ConnectFailed, false, d, LOTS),
            Next::Stop,
            "a POST"
        );
        assert_eq!(next(Outcome::Answered(200), true, d, LOTS), Next::Stop);
        assert_eq!(next(Outcome::Answered(500), true, d, LOTS), Next::Stop);
        assert_eq!(next(Outcome::Timeout, true, d, LOTS), Next::Stop);
        assert_eq!(
            next(Outcome::ConnectFailed, true, None, LOTS),
            Next::Stop,
            "spent"
        );
        assert_eq!(
            next(Outcome::ConnectFailed, true, d, Duration::from_millis(99)),
            Next::Stop,
            "the wait would outlast the deadline"
        );
    }

    #[test]
    fn the_backoff_is_bounded_in_count_and_delay() {
        let delays: Vec<Duration> = backoff(4).collect();
        assert_eq!(delays.len(), 4);
        assert!(delays.iter().all(|d| *d <= MAX_DELAY * 2), "{delays:?}");
        assert_eq!(backoff(0).count(), 0);
    }
}
