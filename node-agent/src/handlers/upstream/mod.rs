//! `upstream` handlers: a forward to an HTTP(S) service in the cloud or
//! beside the agent. `forward` decides what passes, `client` makes one
//! attempt, `retry` and `breaker` decide whether to make another (pure
//! functions and a pure state machine), `outcome` names how it ended; this
//! module ties them to one configured handler with its concurrency cap and
//! metrics.
//!
//! Time in the upstream (each attempt) is T_cloud, observed in
//! `edgewire_upstream_duration_seconds`; the handler's own time, the rest,
//! is T_edge in `edgewire_handler_duration_seconds`, so the two add up to
//! the time a client waited.

mod breaker;
mod client;
mod forward;
mod outcome;
mod retry;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgewire_api::{HandlerSpec, UpstreamSpec};
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Uri};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::reloading::Reloading;
use breaker::{Admission, Breaker};
pub use client::Answer;
use client::HttpClient;
pub use forward::response_headers;
pub use outcome::{Outcome, UpstreamError};

pub struct UpstreamHandler {
    name: String,
    service: Arc<str>,
    spec: UpstreamSpec,
    /// The client, or why the handler cannot forward (an unusable CA file),
    /// built again when the CA file changes (a rotated Secret, or one that
    /// arrived after the handler started); a change that does not build
    /// keeps what was there.
    client: Reloading<Result<HttpClient, String>>,
    slots: Semaphore,
    breaker: Mutex<Breaker>,
    /// The service checks client tokens: they are not passed upstream.
    strip_credentials: bool,
    metrics: Metrics,
}

/// What one forward sends, for every attempt.
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl UpstreamHandler {
    /// Builds the handler's client. Never fails: a handler whose client
    /// cannot be built answers 503 and logs why.
    pub fn start(
        spec: &HandlerSpec,
        service: &str,
        metrics: &Metrics,
        service_has_auth: bool,
    ) -> Arc<UpstreamHandler> {
        let upstream = spec
            .upstream
            .clone()
            .unwrap_or_else(|| UpstreamSpec::to("http://0.0.0.0/"));
        let client = if spec.upstream.is_some() {
            client::build(&upstream)
        } else {
            Err("the handler has no upstream.url".into())
        };
        if let Err(err) = &client {
            tracing::warn!(service, handler = %spec.name, %err, "upstream handler unusable; it answers 503");
        }
        let ca_files = upstream.ca_file.iter().map(PathBuf::from).collect();
        let Ok(client) = Reloading::load(ca_files, || Ok::<_, Infallible>(client));
        metrics.init_upstream(
            service,
            &spec.name,
            &Outcome::LABELS,
            &UpstreamError::REASONS,
        );
        metrics.init_handler(service, &spec.name, &[]);
        Arc::new(UpstreamHandler {
            name: spec.name.clone(),
            service: Arc::from(service),
            slots: Semaphore::new(upstream.max_concurrent as usize),
            breaker: Mutex::new(Breaker::new(
                upstream.breaker.failures,
                Duration::from_millis(upstream.breaker.cooldown_ms.into()),
            )),
            spec: upstream,
            client,
            strip_credentials: service_has_auth,
            metrics: metrics.clone(),
        })
    }

    pub fn max_request_bytes(&self) -> usize {
        self.spec.max_request_bytes as usize
    }

    /// The whole forward's deadline: reading the request body, the attempts
    /// and the waits between them.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.spec.timeout_ms.into())
    }

    /// An HTTP request passed through: the client's method, headers (less
    /// hop-by-hop ones), query and body. `started` is when the request
    /// arrived: reading its body counts against the deadline too.
    pub async fn forward(
        &self,
        started: Instant,
        method: Method,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let outgoing = forward::target(&self.spec.url, query, self.strip_credentials)
            .map_err(UpstreamError::Unavailable)
            .map(|uri| Outgoing {
                method,
                uri,
                headers: forward::request_headers(headers, self.strip_credentials),
                body,
            });
        let sent = match outgoing {
            Ok(outgoing) => self.send(outgoing, started + self.timeout()).await,
            Err(err) => (Err(err), Duration::ZERO),
        };
        self.finish(started, sent)
    }

    /// A relay `call`: `args` as the JSON body of a POST to the url.
    pub async fn call_json(&self, args: &serde_json::Value) -> Result<Answer, UpstreamError> {
        let started = Instant::now();
        let mut headers = HeaderMap::new();
        let json = HeaderValue::from_static("application/json");
        headers.insert(header::CONTENT_TYPE, json.clone());
        headers.insert(header::ACCEPT, json);
        let sent = match forward::target(&self.spec.url, None, false) {
            Ok(uri) => {
                let outgoing = Outgoing {
                    method: Method::POST,
                    uri,
                    headers,
                    body: Bytes::from(args.to_string()),
                };
                self.send(outgoing, started + self.timeout()).await
            }
            Err(err) => (Err(UpstreamError::Unavailable(err)), Duration::ZERO),
        };
        self.finish(started, sent)
    }

    /// Counts the forward: the edge's share of its time (all but `cloud`,
    /// the time in attempts), and its error.
    fn finish(
        &self,
        started: Instant,
        (result, cloud): (Result<Answer, UpstreamError>, Duration),
    ) -> Result<Answer, UpstreamError> {
        self.count(started, cloud, result.as_ref().err());
        result
    }

    /// A request refused before a forward (its body too large or too
    /// slow), counted as a failed forward.
    pub fn refused(&self, started: Instant, err: UpstreamError) -> UpstreamError {
        self.count(started, Duration::ZERO, Some(&err));
        err
    }

    fn count(&self, started: Instant, cloud: Duration, failed: Option<&UpstreamError>) {
        self.metrics
            .handler_duration
            .with_label_values(&[&*self.service, &self.name])
            .observe(started.elapsed().saturating_sub(cloud).as_secs_f64());
        if let Some(err) = failed {
            self.metrics
                .upstream_error(&self.service, &self.name, err.reason());
            tracing::debug!(service = %self.service, handler = %self.name, %err, "upstream forward failed");
        }
    }

    /// Attempts until an answer, a failure not worth repeating, or the
    /// deadline; with the time spent in the upstream's attempts.
    async fn send(
        &self,
        outgoing: Outgoing,
        deadline: Instant,
    ) -> (Result<Answer, UpstreamError>, Duration) {
        let current = self.client.current(|| client::build(&self.spec).map(Ok));
        let client = match current.as_ref() {
            Ok(client) => client,
            Err(err) => return (Err(UpstreamError::Unavailable(err.clone())), Duration::ZERO),
        };
        if outgoing.body.len() > self.max_request_bytes() {
            let refused = UpstreamError::RequestTooLarge(self.max_request_bytes());
            return (Err(refused), Duration::ZERO);
        }
        let Ok(_slot) = self.slots.try_acquire() else {
            let refused = UpstreamError::Concurrency(self.spec.max_concurrent);
            return (Err(refused), Duration::ZERO);
        };
        let repeatable = self.spec.idempotent || retry::is_idempotent(&outgoing.method);
        let mut delays = retry::backoff(self.spec.retries);
        let mut cloud = Duration::ZERO;
        // A retry the breaker refuses (the failures so far opened it) ends
        // with what the last attempt got: the client learns the cause.
        let mut last = None;
        loop {
            let time = deadline.saturating_duration_since(Instant::now());
            if time.is_zero() {
                // Spent before an attempt (reading the client's body): not
                // the upstream's failure, so the breaker does not hear of it.
                return (Err(UpstreamError::Timeout(self.timeout())), cloud);
            }
            let admission = self.admit();
            if admission == Admission::Refuse {
                return match last {
                    Some(result) => (self.settle(result), cloud),
                    None => (Err(UpstreamError::BreakerOpen), cloud),
                };
            }
            let verdict = Verdict::pending(self, admission);
            let mut request = hyper::Request::new(Full::new(outgoing.body.clone()));
            *request.method_mut() = outgoing.method.clone();
            *request.uri_mut() = outgoing.uri.clone();
            *request.headers_mut() = outgoing.headers.clone();
            self.metrics
                .upstream_bytes(&self.service, &self.name, "sent", outgoing.body.len());
            let began = Instant::now();
            let result =
                client::attempt(client, request, time, self.spec.max_response_bytes as usize).await;
            let took = began.elapsed();
            cloud += took;
            let outcome = match &result {
                Ok(answer) => {
                    self.metrics.upstream_bytes(
                        &self.service,
                        &self.name,
                        "received",
                        answer.body.len(),
                    );
                    Outcome::Answered(answer.status)
                }
                Err((outcome, _)) => *outcome,
            };
            self.metrics.upstream_attempt(
                &self.service,
                &self.name,
                outcome.label(),
                took.as_secs_f64(),
            );
            verdict.record(outcome.is_failure());
            let delay = if repeatable && outcome.is_failure() {
                delays.next()
            } else {
                None
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            match retry::next(outcome, repeatable, delay, remaining) {
                retry::Next::RetryAfter(delay) => {
                    last = Some(result);
                    tracing::debug!(service = %self.service, handler = %self.name, outcome = outcome.label(), ?delay, "retrying upstream");
                    tokio::time::sleep(delay).await;
                }
                retry::Next::Stop => return (self.settle(result), cloud),
            }
        }
    }

    /// The forward's end from its last attempt's.
    fn settle(&self, result: Result<Answer, (Outcome, String)>) -> Result<Answer, UpstreamError> {
        let (outcome, why) = match result {
            Ok(answer) => return Ok(answer),
            Err(failed) => failed,
        };
        Err(match outcome {
            Outcome::Tls => UpstreamError::Tls(why),
            Outcome::ConnectionLost => UpstreamError::ConnectionLost(why),
            Outcome::Timeout => UpstreamError::Timeout(self.timeout()),
            Outcome::ResponseTooLarge => {
                UpstreamError::ResponseTooLarge(self.spec.max_response_bytes as usize)
            }
            Outcome::ConnectFailed | Outcome::Answered(_) => UpstreamError::ConnectFailed(why),
        })
    }

    fn admit(&self) -> Admission {
        self.with_breaker(|breaker| breaker.admit(Instant::now()))
            .unwrap_or(Admission::Pass)
    }

    /// Runs `f` on the breaker and shows its state, logging a change.
    fn with_breaker<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> Option<T> {
        let mut breaker = self.breaker.lock().ok()?;
        let before = breaker.state();
        let out = f(&mut breaker);
        let after = breaker.state();
        drop(breaker);
        if before != after {
            tracing::warn!(service = %self.service, handler = %self.name, state = ?after, "upstream circuit breaker changed state");
            self.metrics
                .upstream_breaker(&self.service, &self.name, after.gauge());
        }
        Some(out)
    }
}

/// An attempt's verdict for the breaker, given once; an attempt dropped
/// before it (its client went away) lets the next attempt probe.
struct Verdict<'a> {
    handler: &'a UpstreamHandler,
    admission: Admission,
    given: bool,
}

impl<'a> Verdict<'a> {
    fn pending(handler: &'a UpstreamHandler, admission: Admission) -> Verdict<'a> {
        Verdict {
            handler,
            admission,
            given: false,
        }
    }

    fn record(mut self, failed: bool) {
        self.given = true;
        let admission = self.admission;
        self.handler
            .with_breaker(|b| b.record(Instant::now(), admission, failed));
    }
}

impl Drop for Verdict<'_> {
    fn drop(&mut self) {
        if !self.given {
            let admission = self.admission;
            self.handler
                .with_breaker(|b| b.abandon(Instant::now(), admission));
        }
    }
}
