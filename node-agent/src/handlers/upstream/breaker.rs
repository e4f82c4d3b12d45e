//! The circuit breaker as a pure state machine, time passed in. Closed, it
//! counts consecutive failed attempts; at the threshold it opens and refuses
//! every attempt for the cool-down; the first attempt after the cool-down is
//! a probe (half-open; others are still refused while it runs), and the
//! probe's success closes the breaker, its failure opens it again.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    /// The value of `edgewire_upstream_breaker_state`: the higher, the less
    /// traffic goes through.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// What the breaker says to one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Pass,
    /// The one attempt that tests a recovered upstream.
    Probe,
    /// Open, or a probe is already running: answer 503 without trying.
    Refuse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    Probing,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    phase: Phase,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            phase: Phase::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> State {
        match self.phase {
            Phase::Closed { .. } => State::Closed,
            Phase::Probing => State::HalfOpen,
            Phase::Open { .. } => State::Open,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.phase {
            Phase::Closed { .. } => Admission::Pass,
            Phase::Open { until } if now >= until => {
                self.phase = Phase::Probing;
                Admission::Probe
            }
            Phase::Open { .. } | Phase::Probing => Admission::Refuse,
        }
    }

    /// The end of an attempt that `admission` let through. Only the probe
    /// decides a half-open breaker; an attempt let through while closed that
    /// ends after the breaker opened changes nothing.
    pub fn record(&mut self, now: Instant, admission: Admission, failed: bool) {
        match (self.phase, admission) {
            (Phase::Probing, Admission::Probe) => {
                self.phase = if failed {
                    Phase::Open {
                        until: now + self.cooldown,
                    }
                } else {
                    Phase::Closed { failures: 0 }
                };
            }
            (Phase::Closed { failures }, Admission::Pass) => {
                self.phase = if !failed {
                    Phase::Closed { failures: 0 }
                } else if failures + 1 >= self.threshold {
                    Phase::Open {
                        until: now + self.cooldown,
                    }
                } else {
                    Phase::Closed {
                        failures: failures + 1,
                    }
                };
            }
            _ => {}
        }
    }

    /// A probe that ended without a verdict (its client went away): the
    /// next attempt probes instead.
    pub fn abandon(&mut self, now: Instant, admission: Admission) {
        if admission == Admission::Probe && self.phase == Phase::Probing {
            self.phase = Phase::Open { until: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    fn fail(b: &mut Breaker, now: Instant) {
        let admission = b.admit(now);
        b.record(now, admission, true);
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut b = Breaker::new(3, COOL);
        fail(&mut b, t);
        fail(&mut b, t);
        let a = b.admit(t);
        b.record(t, a, false);
        assert_eq!(b.state(), State::Closed, "a success resets the count");
        fail(&mut b, t);
        fail(&mut b, t);
        assert_eq!(b.state(), State::Closed);
        fail(&mut b, t);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t + COOL / 2), Admission::Refuse);
    }

    #[test]
    fn one_probe_after_the_cooldown_closes_on_success() {
        let t = Instant::now();
        let mut b = Breaker::new(1, COOL);
        fail(&mut b, t);
        assert_eq!(
            b.admit(t + COOL - Duration::from_millis(1)),
            Admission::Refuse
        );
        let later = t + COOL;
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(later), Admission::Refuse, "one probe at a time");
        b.record(later, Admission::Probe, false);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(later), Admission::Pass);
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_cooldown() {
        let t = Instant::now();
        let mut b = Breaker::new(2, COOL);
        fail(&mut b, t);
        fail(&mut b, t);
        let probe_at = t + COOL;
        assert_eq!(b.admit(probe_at), Admission::Probe);
        b.record(probe_at, Admission::Probe, true);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(probe_at + COOL / 2), Admission::Refuse);
        assert_eq!(b.admit(probe_at + COOL), Admission::Probe);
    }

    #[test]
    fn late_results_of_earlier_attempts_do_not_decide() {
        let t = Instant::now();
        let mut b = Breaker::new(1, COOL);
        let early = b.admit(t);
        fail(&mut b, t);
        assert_eq!(b.state(), State::Open);
        b.record(t, early, false);
        assert_eq!(b.state(), State::Open, "a slow success from before");
        assert_eq!(b.admit(t + COOL), Admission::Probe);
        b.record(t + COOL, early, false);
        assert_eq!(b.state(), State::HalfOpen, "only the probe decides");
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_attempt_probe() {
        let t = Instant::now();
        let mut b = Breaker::new(1, COOL);
        fail(&mut b, t);
        assert_eq!(b.admit(t + COOL), Admission::Probe);
        b.abandon(t + COOL, Admission::Probe);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t + COOL), Admission::Probe);
    }
}
