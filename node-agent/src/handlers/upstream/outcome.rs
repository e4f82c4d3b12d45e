//! How one attempt at an upstream ended (the `outcome` label of
//! `edgewire_upstream_duration_seconds`), and why a forward got no answer
//! from the upstream: the status and short JSON reason a client sees, and
//! the `reason` label of `edgewire_upstream_errors_total`.

use std::time::Duration;

/// One attempt's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Answered(u16),
    /// No connection: refused, no route, name not resolved.
    ConnectFailed,
    /// The TLS handshake failed (an untrusted or mismatched certificate).
    Tls,
    /// The connection closed or reset before the whole answer came.
    ConnectionLost,
    /// The forward's deadline passed during the attempt.
    Timeout,
    /// The answer's body was larger than the handler takes.
    ResponseTooLarge,
}

impl Outcome {
    /// Every label value, for showing the series at zero.
    pub const LABELS: [&'static str; 7] = [
        "ok",
        "error_status",
        "connect_failed",
        "tls",
        "connection_lost",
        "timeout",
        "response_too_large",
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered(status) if status >= 500 => "error_status",
            Outcome::Answered(_) => "ok",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::Tls => "tls",
            Outcome::ConnectionLost => "connection_lost",
            Outcome::Timeout => "timeout",
            Outcome::ResponseTooLarge => "response_too_large",
        }
    }

    /// Whether the attempt counts against the upstream's health (the
    /// breaker) and may be tried again: the upstream could not be reached
    /// or said it is unavailable (502, 503, 504). Another answer, 500
    /// included, is the upstream's own word on this request.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Answered(status) => matches!(status, 502..=504),
            Outcome::ConnectFailed | Outcome::Tls | Outcome::ConnectionLost | Outcome::Timeout => {
                true
            }
            Outcome::ResponseTooLarge => false,
        }
    }
}

/// Why a forward has no answer from the upstream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    ConnectFailed(String),
    #[error("upstream TLS handshake failed: {0}")]
    Tls(String),
    #[error("upstream connection lost: {0}")]
    ConnectionLost(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream circuit breaker open after repeated failures")]
    BreakerOpen,
    #[error("upstream busy: all {0} concurrent forwards in use")]
    Concurrency(u32),
    #[error("request body larger than {0} bytes")]
    RequestTooLarge(usize),
    #[error("upstream response body larger than {0} bytes")]
    ResponseTooLarge(usize),
    /// The handler cannot forward at all (its CA file is unusable, ...).
    #[error("upstream handler unavailable: {0}")]
    Unavailable(String),
}

impl UpstreamError {
    /// Every label value, for showing the series at zero.
    pub const REASONS: [&'static str; 9] = [
        "connect_failed",
        "tls",
        "connection_lost",
        "timeout",
        "breaker_open",
        "concurrency",
        "request_too_large",
        "response_too_large",
        "unavailable",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::ConnectFailed(_) => "connect_failed",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::ConnectionLost(_) => "connection_lost",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::BreakerOpen => "breaker_open",
            UpstreamError::Concurrency(_) => "concurrency",
            UpstreamError::RequestTooLarge(_) => "request_too_large",
            UpstreamError::ResponseTooLarge(_) => "response_too_large",
            UpstreamError::Unavailable(_) => "unavailable",
        }
    }

    /// The HTTP status a client gets: 502 when the upstream could not be
    /// reached or gave an unusable answer, 504 when it was too slow, 503
    /// when the agent refused to try (breaker, concurrency), 413 for a
    /// request over the cap.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::ConnectFailed(_)
            | UpstreamError::Tls(_)
            | UpstreamError::ConnectionLost(_)
            | UpstreamError::ResponseTooLarge(_) => 502,
            UpstreamError::Timeout(_) => 504,
            UpstreamError::BreakerOpen
            | UpstreamError::Concurrency(_)
            | UpstreamError::Unavailable(_) => 503,
            UpstreamError::RequestTooLarge(_) => 413,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_errors_and_transport_failures_are_failures() {
        for failure in [
            Outcome::Answered(502),
            Outcome::Answered(503),
            Outcome::Answered(504),
            Outcome::ConnectFailed,
            Outcome::Tls,
            Outcome::ConnectionLost,
            Outcome::Timeout,
        ] {
            assert!(failure.is_failure(), "{failure:?}");
        }
        for answer in [200, 201, 404, 429, 500] {
            assert!(!Outcome::Answered(answer).is_failure(), "{answer}");
        }
        assert!(!Outcome::ResponseTooLarge.is_failure());
    }

    #[test]
    fn each_error_has_its_status_and_a_known_reason() {
        let cases = [
            (UpstreamError::ConnectFailed("refused".into()), 502),
            (UpstreamError::ConnectionLost("reset".into()), 502),
            (UpstreamError::Timeout(Duration::from_secs(1)), 504),
            (UpstreamError::BreakerOpen, 503),
            (UpstreamError::Concurrency(4), 503),
            (UpstreamError::RequestTooLarge(10), 413),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err}");
            assert!(UpstreamError::REASONS.contains(&err.reason()));
        }
        for outcome in [Outcome::Answered(200), Outcome::Answered(503)] {
            assert!(Outcome::LABELS.contains(&outcome.label()));
        }
    }
}
