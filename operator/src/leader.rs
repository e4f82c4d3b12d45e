//! Leader election over a coordination.k8s.io Lease, with client-go's
//! semantics, so that two or more replicas can run and at most one writes.
//!
//! `rules` decides (who may take the Lease, judged by when this process saw
//! it change, never by the holder's clock); `fence` keeps the controllers'
//! client from writing once leadership may have lapsed; `Elector` is the
//! thin shell that talks to the API server, every call bounded in time.
//! Optimistic concurrency (resourceVersion) makes take-over races safe: one
//! write wins, the other gets 409.

pub mod fence;
pub mod rules;

use std::fmt;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

pub use fence::Fence;
pub use rules::Timing;
use rules::{Observed, Standing};

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("Lease API: {0}")]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

/// The outcome of one try to take or renew the Lease.
enum Attempt {
    Ours,
    HeldBy(String),
    /// Another replica wrote the Lease between our read and our write.
    Conflict,
}

/// Why this replica stopped leading.
#[derive(Debug)]
pub enum Ended {
    /// `stop` fired (a clean shutdown): the Lease is still ours to release.
    Stopped,
    /// No renewal succeeded within the renew deadline.
    DeadlinePassed,
    /// Another replica holds the Lease.
    TakenBy(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Stopped => write!(f, "shutting down"),
            Ended::DeadlinePassed => write!(f, "no renewal within the renew deadline"),
            Ended::TakenBy(holder) => write!(f, "{holder} holds the Lease"),
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Option<Observed>,
}

/// 409: the Lease changed since we read it, or was created meanwhile.
fn conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

impl Elector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: None,
        }
    }

    /// Records having seen `lease` at `now`; what is known of it since.
    fn seen(&mut self, lease: &Lease, now: Instant) -> Observed {
        let observed = rules::observe(
            self.observed.as_ref(),
            lease.metadata.resource_version.as_deref(),
            now,
        );
        self.observed = Some(observed.clone());
        observed
    }

    /// One read of the Lease and, when it is free, expired or ours, one
    /// write that claims or renews it.
    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(rules::claim(
                    None,
                    &self.identity,
                    self.timing.lease_duration,
                    Timestamp::now(),
                )),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.seen(&created, Instant::now());
                    Ok(Attempt::Ours)
                }
                Err(err) if conflict(&err) => Ok(Attempt::Conflict),
                Err(err) => Err(err),
            };
        };
        let now = Instant::now();
        let observed = self.seen(&lease, now);
        match rules::standing(
            lease.spec.as_ref(),
            &self.identity,
            &observed,
            self.timing.lease_duration,
            now,
        ) {
            Standing::Held(holder) => return Ok(Attempt::HeldBy(holder)),
            Standing::Expired(holder) => {
                tracing::info!(lease = %self.name, %holder, "the Lease was not renewed for its duration; taking it over");
            }
            Standing::Free | Standing::Ours => {}
        }
        let previous = lease.spec.clone();
        let mut next = lease;
        next.spec = Some(rules::claim(
            previous.as_ref(),
            &self.identity,
            self.timing.lease_duration,
            Timestamp::now(),
        ));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.seen(&written, Instant::now());
                Ok(Attempt::Ours)
            }
            Err(err) if conflict(&err) => Ok(Attempt::Conflict),
            Err(err) => Err(err),
        }
    }

    async fn bounded(&mut self, budget: Duration) -> Result<Attempt, ElectionError> {
        match tokio::time::timeout(budget, self.attempt()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ElectionError::Timeout(budget)),
        }
    }

    /// Waits until this replica holds the Lease and returns when it began
    /// the try that won it (its leadership counts from there), or None once
    /// `stop` fires.
    pub async fn acquire(&mut self, stop: &CancellationToken) -> Option<Instant> {
        let mut reported: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let started = Instant::now();
            match self.bounded(self.timing.renew_deadline).await {
                Ok(Attempt::Ours) => return Some(started),
                Ok(Attempt::HeldBy(holder)) => {
                    if reported.as_deref() != Some(holder.as_str()) {
                        tracing::info!(lease = %self.name, %holder, "another replica leads; standing by");
                        reported = Some(holder);
                    }
                }
                Ok(Attempt::Conflict) => {
                    tracing::debug!(lease = %self.name, "another replica wrote the Lease first");
                }
                Err(err) => tracing::warn!(%err, "leader election failed; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(self.timing.retry_period) => {}
            }
        }
    }

    /// Renews the Lease every retry period while leading, opening `fence`
    /// until a renew deadline after the start of each renewal that
    /// succeeds. Returns when `stop` fires, when another replica holds the
    /// Lease, or when the renew deadline passed without a renewal (then the
    /// fence has already shut by itself).
    pub async fn hold(&mut self, fence: &Fence, stop: &CancellationToken) -> Ended {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ended::Stopped,
                _ = tokio::time::sleep(self.timing.retry_period) => {}
            }
            let started = Instant::now();
            // After a freeze this is already past: give up without asking.
            let Some(left) = fence.remaining(started) else {
                return Ended::DeadlinePassed;
            };
            match self.bounded(left).await {
                Ok(Attempt::Ours) => fence.open_until(started + self.timing.renew_deadline),
                Ok(Attempt::HeldBy(holder)) => return Ended::TakenBy(holder),
                Ok(Attempt::Conflict) => {
                    tracing::warn!(lease = %self.name, "another replica wrote the Lease; retrying");
                }
                Err(ElectionError::Timeout(_)) => return Ended::DeadlinePassed,
                Err(err) => {
                    tracing::warn!(%err, ?left, "renewing the Lease failed; retrying until the renew deadline");
                }
            }
        }
    }

    /// Gives the Lease up on a clean shutdown, so a standby takes over at
    /// its next try. Only once the controllers have stopped.
    pub async fn release(&mut self) {
        let budget = self.timing.renew_deadline;
        let result = tokio::time::timeout(budget, async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_ref() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            lease.spec = Some(rules::released(spec, Timestamp::now()));
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "releasing the Lease failed"),
            Err(_) => tracing::warn!(?budget, "releasing the Lease timed out"),
        }
    }
}
