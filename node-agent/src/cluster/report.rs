//! When the EdgeNode's status is written. With a working node Lease the
//! Lease is the heartbeat, and the status is written when what it reports
//! changes: at once for a service starting, failing or stopping, and for
//! connection counts alone at most every connections interval (they move
//! all the time, and the relay's metrics have them live). Without one (no
//! Role for Leases, say), every heartbeat writes the status, as before.

use std::time::{Duration, Instant};

use serde_json::Value;

/// The status last written, and when.
#[derive(Debug)]
pub struct Written {
    report: Value,
    at: Instant,
}

/// Even unchanged, the status is written this often, as a kubelet reports
/// its Node's: a deleted EdgeNode is written again, and the status says
/// when the agent last reported.
pub const REFRESH: Duration = Duration::from_secs(300);

/// What decides the next write.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub connections_interval: Duration,
}

impl Policy {
    /// Whether `report` (the status without its `lastHeartbeat`) is to be
    /// written at `now`, after `last`, with the Lease renewed or not.
    pub fn due(
        &self,
        last: Option<&Written>,
        report: &Value,
        lease_renewed: bool,
        now: Instant,
    ) -> bool {
        let Some(last) = last else { return true };
        let since = now.saturating_duration_since(last.at);
        if !lease_renewed || since >= REFRESH {
            return true;
        }
        if last.report == *report {
            return false;
        }
        without_connections(&last.report) != without_connections(report)
            || since >= self.connections_interval
    }
}

impl Written {
    pub fn new(report: Value, at: Instant) -> Written {
        Written { report, at }
    }
}

/// The report with every connection count zeroed.
fn without_connections(report: &Value) -> Value {
    let mut report = report.clone();
    if let Some(count) = report.get_mut("connections") {
        *count = Value::from(0);
    }
    for service in report
        .get_mut("services")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(count) = service.get_mut("connections") {
            *count = Value::from(0);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const S: Duration = Duration::from_secs(1);
    const POLICY: Policy = Policy {
        connections_interval: Duration::from_secs(60),
    };

    fn report(listening: bool, connections: i64) -> Value {
        json!({
            "connections": connections,
            "services": [{"namespace": "ns", "name": "svc", "listening": listening, "connections": connections}],
        })
    }

    #[test]
    fn the_first_report_is_written() {
        assert!(POLICY.due(None, &report(true, 1), true, Instant::now()));
    }

    #[test]
    fn with_a_lease_an_unchanged_report_is_not_written_again() {
        let t0 = Instant::now();
        let last = Written::new(report(true, 3), t0);
        assert!(!POLICY.due(Some(&last), &report(true, 3), true, t0 + 299 * S));
        // But refreshed now and then, as a kubelet refreshes its Node's.
        assert!(POLICY.due(Some(&last), &report(true, 3), true, t0 + REFRESH));
    }

    #[test]
    fn without_a_lease_every_heartbeat_writes_the_status() {
        let t0 = Instant::now();
        let last = Written::new(report(true, 3), t0);
        assert!(POLICY.due(Some(&last), &report(true, 3), false, t0 + S));
    }

    #[test]
    fn a_service_change_is_written_at_once() {
        let t0 = Instant::now();
        let last = Written::new(report(true, 3), t0);
        assert!(POLICY.due(Some(&last), &report(false, 3), true, t0 + S));
        assert!(POLICY.due(Some(&last), &report(false, 0), true, t0 + S));
    }

    #[test]
    fn connection_counts_alone_wait_for_the_connections_interval() {
        let t0 = Instant::now();
        let last = Written::new(report(true, 3), t0);
        assert!(!POLICY.due(Some(&last), &report(true, 4), true, t0 + 59 * S));
        assert!(POLICY.due(Some(&last), &report(true, 4), true, t0 + 60 * S));
    }
}
