//! The decisions of leader election, as client-go's leader election makes
//! them, with no I/O and no clock of their own: the caller passes in what it
//! saw and when, by its own monotonic clock.
//!
//! A standby never compares the holder's `renewTime` with its own clock: it
//! counts the lease duration from the moment it saw the Lease last change
//! (a new resourceVersion). A holder whose clock is off can thus neither be
//! deposed early nor hold on late. The holder, for its part, stops leading a
//! renew deadline after it began its last successful renewal, which is
//! shorter than the lease duration, so it has stopped before any standby may
//! take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;

/// The three durations of leader election, named as in client-go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a standby waits, after it saw the Lease last change, before
    /// it takes the Lease over.
    pub lease_duration: Duration,
    /// How long the leader goes on leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews, and a standby tries to take over.
    pub retry_period: Duration,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the lease duration, renew deadline and retry period must all be at least a second")]
    TooShort,
    #[error(
        "the renew deadline ({renew:?}) must be shorter than the lease duration ({lease:?}), \
         so that a leader that cannot renew stops before a standby takes over"
    )]
    DeadlineNotBeforeExpiry { renew: Duration, lease: Duration },
    #[error(
        "the retry period ({retry:?}) must be shorter than the renew deadline ({renew:?}), \
         so that the leader can renew before its deadline"
    )]
    RetryNotBeforeDeadline { retry: Duration, renew: Duration },
}

impl Timing {
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Timing, TimingError> {
        let second = Duration::from_secs(1);
        if lease_duration < second || renew_deadline < second || retry_period < second {
            return Err(TimingError::TooShort);
        }
        if renew_deadline >= lease_duration {
            return Err(TimingError::DeadlineNotBeforeExpiry {
                renew: renew_deadline,
                lease: lease_duration,
            });
        }
        if retry_period >= renew_deadline {
            return Err(TimingError::RetryNotBeforeDeadline {
                retry: retry_period,
                renew: renew_deadline,
            });
        }
        Ok(Timing {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

/// What this process last saw of the Lease: its resourceVersion, and when
/// (by this process's monotonic clock) it first saw that version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub version: Option<String>,
    pub since: Instant,
}

/// The observation after seeing the Lease at `version` at `now`: unchanged
/// when the version is the one seen before, else a change seen `now`.
pub fn observe(previous: Option<&Observed>, version: Option<&str>, now: Instant) -> Observed {
    match previous {
        Some(seen) if version.is_some() && seen.version.as_deref() == version => seen.clone(),
        _ => Observed {
            version: version.map(str::to_string),
            since: now,
        },
    }
}

/// Who holds the Lease, as far as `identity` may act on it.
#[derive(Debug, PartialEq, Eq)]
pub enum Standing {
    /// Nobody: never held, or released.
    Free,
    /// This replica: renew it.
    Ours,
    /// Another replica, which has not changed it for its whole duration
    /// since this process saw it change: take it over.
    Expired(String),
    /// Another replica, which changed it within its duration: stand by.
    Held(String),
}

/// Where `identity` stands with the Lease `spec`, observed as `observed`.
/// The duration is the holder's (`leaseDurationSeconds`), `default` when
/// it has none.
pub fn standing(
    spec: Option<&LeaseSpec>,
    identity: &str,
    observed: &Observed,
    default: Duration,
    now: Instant,
) -> Standing {
    let holder = spec.and_then(|s| s.holder_identity.as_deref());
    match holder {
        None | Some("") => Standing::Free,
        Some(holder) if holder == identity => Standing::Ours,
        Some(holder) => {
            let duration = spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map_or(default, Duration::from_secs);
            if now.saturating_duration_since(observed.since) >= duration {
                Standing::Expired(holder.to_string())
            } else {
                Standing::Held(holder.to_string())
            }
        }
    }
}

/// The Lease spec that claims (or renews) it for `identity`. The times in it
/// are this replica's wall clock, for people and other tools to read; no
/// decision here is taken from them.
pub fn claim(
    previous: Option<&LeaseSpec>,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let renewing = previous.and_then(|s| s.holder_identity.as_deref()) == Some(identity);
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(
            i32::try_from(lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
        ),
        acquire_time: if renewing {
            previous.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        // As client-go counts them: every change of holder, a release included.
        lease_transitions: Some(match previous {
            Some(_) if !renewing => transitions + 1,
            _ => transitions,
        }),
        ..LeaseSpec::default()
    }
}

/// The Lease spec once `previous`'s holder gave it up: no holder, so any
/// standby takes it at its next try.
pub fn released(previous: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        ..previous.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn spec(holder: Option<&str>, renewed: Option<i64>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).unwrap())),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn timing_like_client_go_is_valid_and_the_margins_are_enforced() {
        assert!(Timing::new(secs(15), secs(10), secs(2)).is_ok());
        assert_eq!(
            Timing::new(secs(15), secs(15), secs(2)),
            Err(TimingError::DeadlineNotBeforeExpiry {
                renew: secs(15),
                lease: secs(15)
            })
        );
        assert!(matches!(
            Timing::new(secs(6), secs(10), secs(2)),
            Err(TimingError::DeadlineNotBeforeExpiry { .. })
        ));
        assert!(matches!(
            Timing::new(secs(15), secs(10), secs(10)),
            Err(TimingError::RetryNotBeforeDeadline { .. })
        ));
        assert_eq!(
            Timing::new(secs(15), secs(10), Duration::ZERO),
            Err(TimingError::TooShort)
        );
    }

    #[test]
    fn an_observation_lasts_as_long_as_the_version() {
        let t0 = Instant::now();
        let first = observe(None, Some("10"), t0);
        assert_eq!(first.since, t0);
        let same = observe(Some(&first), Some("10"), t0 + secs(7));
        assert_eq!(same.since, t0, "no change seen: the clock keeps running");
        let changed = observe(Some(&same), Some("11"), t0 + secs(8));
        assert_eq!(changed.since, t0 + secs(8), "a change restarts it");
        let unversioned = observe(Some(&changed), None, t0 + secs(9));
        assert_eq!(unversioned.since, t0 + secs(9), "unknown counts as changed");
    }

    #[test]
    fn free_or_our_own_lease_is_taken_at_once() {
        let now = Instant::now();
        let seen = observe(None, Some("1"), now);
        assert_eq!(standing(None, "a", &seen, LEASE, now), Standing::Free);
        assert_eq!(
            standing(Some(&spec(None, Some(1))), "a", &seen, LEASE, now),
            Standing::Free
        );
        assert_eq!(
            standing(Some(&spec(Some(""), Some(1))), "a", &seen, LEASE, now),
            Standing::Free
        );
        assert_eq!(
            standing(Some(&spec(Some("a"), Some(1))), "a", &seen, LEASE, now),
            Standing::Ours
        );
    }

    #[test]
    fn another_holder_expires_a_lease_duration_after_its_last_change_was_seen() {
        let t0 = Instant::now();
        let seen = observe(None, Some("1"), t0);
        let held = spec(Some("b"), Some(1_000));
        assert_eq!(
            standing(Some(&held), "a", &seen, LEASE, t0 + secs(14)),
            Standing::Held("b".into())
        );
        assert_eq!(
            standing(Some(&held), "a", &seen, LEASE, t0 + secs(15)),
            Standing::Expired("b".into())
        );
    }

    #[test]
    fn the_holders_renew_time_is_never_compared_with_our_clock() {
        let t0 = Instant::now();
        // The holder's clock is an hour behind ours: its renewTime looks
        // long expired, but it keeps changing the Lease, so it holds.
        let mut seen = observe(None, Some("1"), t0);
        for (i, version) in ["2", "3", "4"].iter().enumerate() {
            let now = t0 + secs(10 * (i as u64 + 1));
            seen = observe(Some(&seen), Some(version), now);
            let behind = spec(Some("b"), Some(Timestamp::now().as_second() - 3_600));
            assert_eq!(
                standing(Some(&behind), "a", &seen, LEASE, now),
                Standing::Held("b".into())
            );
        }
        // An hour ahead: its renewTime looks fresh for an hour, but it has
        // not changed for the lease duration, so it is taken over.
        let ahead = spec(Some("b"), Some(Timestamp::now().as_second() + 3_600));
        let later = seen.since + secs(16);
        assert_eq!(
            standing(Some(&ahead), "a", &seen, LEASE, later),
            Standing::Expired("b".into())
        );
    }

    #[test]
    fn the_holders_own_duration_counts() {
        let t0 = Instant::now();
        let seen = observe(None, Some("1"), t0);
        let mut long = spec(Some("b"), Some(1));
        long.lease_duration_seconds = Some(60);
        assert_eq!(
            standing(Some(&long), "a", &seen, LEASE, t0 + secs(30)),
            Standing::Held("b".into())
        );
        long.lease_duration_seconds = None;
        assert_eq!(
            standing(Some(&long), "a", &seen, LEASE, t0 + secs(30)),
            Standing::Expired("b".into()),
            "ours when the holder gave none"
        );
    }

    #[test]
    fn claiming_counts_transitions_and_keeps_the_acquire_time_on_renewal() {
        let now = Timestamp::from_second(2_000).unwrap();
        let taken = claim(Some(&spec(Some("b"), Some(1_000))), "a", LEASE, now);
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(taken.lease_duration_seconds, Some(15));

        let later = Timestamp::from_second(2_002).unwrap();
        let renewed = claim(Some(&taken), "a", LEASE, later);
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));

        let new = claim(None, "a", LEASE, now);
        assert_eq!(new.lease_transitions, Some(0), "a new Lease: no transition");
    }

    #[test]
    fn a_released_lease_has_no_holder() {
        let now = Timestamp::from_second(3_000).unwrap();
        let given_up = released(&spec(Some("a"), Some(2_999)), now);
        assert_eq!(given_up.holder_identity, None);
        assert_eq!(given_up.lease_transitions, Some(3));
        let seen = observe(None, Some("9"), Instant::now());
        assert_eq!(
            standing(Some(&given_up), "b", &seen, LEASE, seen.since),
            Standing::Free
        );
    }
}
