//! The write fence: the controllers' API client sends no write once this
//! replica's leadership may have lapsed.
//!
//! On losing the Lease the controllers are aborted, but that alone is not
//! enough: a process that was frozen (SIGSTOP, a stalled VM or host) runs
//! its ready tasks in any order when it resumes, and
//! a reconcile may send a write before the task that notices the lapsed
//! Lease runs. So every write is checked, as it is sent, against the renew
//! deadline by the monotonic clock; reads (and watches) always pass.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tower::BoxError;
use tower::filter::Predicate;

/// Until when this replica may write; closed (nothing may be written) until
/// it first leads.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    until: Arc<Mutex<Option<Instant>>>,
}

/// A write the fence kept from being sent.
#[derive(Debug, thiserror::Error)]
#[error("not sent: {method} {path}: this replica is not (or no longer surely) the leader")]
pub struct NotLeading {
    method: http::Method,
    path: String,
}

/// Whether a request changes anything (reads and watches do not).
pub fn is_write(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

impl Fence {
    fn with<T>(&self, f: impl FnOnce(&mut Option<Instant>) -> T) -> T {
        f(&mut self.until.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Writes may be sent until `until`.
    pub fn open_until(&self, until: Instant) {
        self.with(|u| *u = Some(until));
    }

    /// No more writes.
    pub fn close(&self) {
        self.with(|u| *u = None);
    }

    /// How long writes may still be sent after `now`; None when closed.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.with(|u| u.and_then(|until| until.checked_duration_since(now)))
            .filter(|left| !left.is_zero())
    }

    pub fn admits(&self, method: &http::Method, now: Instant) -> bool {
        !is_write(method) || self.remaining(now).is_some()
    }
}

impl<B> Predicate<http::Request<B>> for Fence {
    type Request = http::Request<B>;

    fn check(&mut self, request: http::Request<B>) -> Result<Self::Request, BoxError> {
        if self.admits(request.method(), Instant::now()) {
            Ok(request)
        } else {
            Err(Box::new(NotLeading {
                method: request.method().clone(),
                path: request.uri().path().to_string(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn closed_until_opened_and_only_until_the_deadline() {
        let fence = Fence::default();
        let now = Instant::now();
        assert!(!fence.admits(&Method::PATCH, now));
        assert!(fence.admits(&Method::GET, now), "reads always pass");

        fence.open_until(now + Duration::from_secs(10));
        for write in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(fence.admits(&write, now + Duration::from_secs(9)));
            assert!(!fence.admits(&write, now + Duration::from_secs(10)));
        }
        assert_eq!(fence.remaining(now), Some(Duration::from_secs(10)));
        assert_eq!(fence.remaining(now + Duration::from_secs(11)), None);

        let clone = fence.clone();
        fence.close();
        assert!(!clone.admits(&Method::PATCH, now), "one fence, shared");
        assert!(clone.admits(&Method::HEAD, now));
    }

    #[test]
    fn a_refused_write_is_not_passed_on() {
        let mut fence = Fence::default();
        let write = http::Request::patch("/api/v1/namespaces/a/services/b")
            .body(())
            .unwrap();
        let err = fence.check(write).unwrap_err();
        assert!(
            err.to_string()
                .contains("PATCH /api/v1/namespaces/a/services/b")
        );
        let read = http::Request::get("/api/v1/services").body(()).unwrap();
        assert!(fence.check(read).is_ok());
    }
}
