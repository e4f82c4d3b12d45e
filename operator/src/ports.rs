//! Which host ports an EdgeService may make its agents bind. A root agent
//! with host networking binds whatever port an EdgeService names: without a
//! limit that is a hostPort outside Pod Security. The chart's admission
//! policy refuses such EdgeServices; this is the operator's own check, for
//! objects admitted before the policy existed or without it.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use edgewire_api::crd::EdgeServiceStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The reason on `Placed` and `Degraded` of a refused EdgeService.
pub const PORT_NOT_ALLOWED: &str = "PortNotAllowed";

/// The host ports EdgeServices may use, and the namespaces that may go below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    pub range: PortRange,
    /// Namespaces whose EdgeServices may also use ports below the range.
    pub privileged_namespaces: BTreeSet<String>,
}

impl Default for PortPolicy {
    fn default() -> PortPolicy {
        PortPolicy {
            range: PortRange {
                min: 1024,
                max: 65535,
            },
            privileged_namespaces: BTreeSet::new(),
        }
    }
}

/// An inclusive range of ports, written `MIN-MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a port range is MIN-MAX with 1 <= MIN <= MAX <= 65535, not {0:?}")]
pub struct BadRange(String);

impl FromStr for PortRange {
    type Err = BadRange;

    fn from_str(s: &str) -> Result<PortRange, BadRange> {
        let bad = || BadRange(s.to_string());
        let (min, max) = s.trim().split_once('-').ok_or_else(bad)?;
        let min: u16 = min.trim().parse().map_err(|_| bad())?;
        let max: u16 = max.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(PortRange { min, max })
    }
}

/// Why an EdgeService's port is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "port {port} is below {min}; only EdgeServices in the namespaces the chart lists (hostPorts.privilegedNamespaces) may use it"
    )]
    Privileged { port: i32, min: u16 },
    #[error("port {port} is outside the host ports EdgeServices may use ({range})")]
    OutOfRange { port: i32, range: PortRange },
}

impl PortPolicy {
    /// Whether an EdgeService in `namespace` may use `port`.
    pub fn check(&self, namespace: &str, port: i32) -> Result<(), Refusal> {
        let PortRange { min, max } = self.range;
        if port > i32::from(max) || port < 1 {
            return Err(Refusal::OutOfRange {
                port,
                range: self.range,
            });
        }
        if port < i32::from(min) && !self.privileged_namespaces.contains(namespace) {
            return Err(Refusal::Privileged { port, min });
        }
        Ok(())
    }
}

fn condition(
    old: &[Condition],
    type_: &str,
    status: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: PORT_NOT_ALLOWED.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Marks a status (computed with no placement) as refused: `Placed=False`
/// and `Degraded=True`, both with reason `PortNotAllowed` and the refusal.
pub fn mark_refused(
    status: &mut EdgeServiceStatus,
    refusal: &Refusal,
    old: Option<&EdgeServiceStatus>,
    now: &Time,
) {
    let old = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = status.observed_generation;
    let message = refusal.to_string();
    for c in &mut status.conditions {
        match c.type_.as_str() {
            "Placed" => *c = condition(old, "Placed", "False", &message, generation, now),
            "Degraded" => *c = condition(old, "Degraded", "True", &message, generation, now),
            _ => {}
        }
    }
}

/// Whether `status` newly says the port is refused (for one Warning Event).
pub fn newly_refused(old: Option<&EdgeServiceStatus>, new: &EdgeServiceStatus) -> Option<String> {
    let refused = |s: &EdgeServiceStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.reason == PORT_NOT_ALLOWED)
            .map(|c| c.message.clone())
    };
    let now = refused(new)?;
    (old.and_then(refused).as_ref() != Some(&now)).then_some(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(range: &str, privileged: &[&str]) -> PortPolicy {
        PortPolicy {
            range: range.parse().unwrap(),
            privileged_namespaces: privileged.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_default_allows_unprivileged_ports_only() {
        let p = PortPolicy::default();
        assert_eq!(p.check("demo", 8765), Ok(()));
        assert_eq!(p.check("demo", 1024), Ok(()));
        assert_eq!(p.check("demo", 65535), Ok(()));
        assert_eq!(
            p.check("demo", 80),
            Err(Refusal::Privileged {
                port: 80,
                min: 1024
            })
        );
        assert!(p.check("demo", 0).is_err());
        assert!(p.check("demo", 70000).is_err());
    }

    #[test]
    fn listed_namespaces_may_go_below_the_range_but_not_above() {
        let p = policy("2000-3000", &["ingress"]);
        assert_eq!(p.check("ingress", 443), Ok(()));
        assert!(p.check("demo", 443).is_err());
        assert_eq!(
            p.check("ingress", 3001),
            Err(Refusal::OutOfRange {
                port: 3001,
                range: PortRange {
                    min: 2000,
                    max: 3000
                }
            })
        );
    }

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!(
            "1024-65535".parse::<PortRange>(),
            Ok(PortRange {
                min: 1024,
                max: 65535
            })
        );
        for bad in ["", "1024", "0-10", "20-10", "1-65536", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_refused_status_says_why_and_is_evented_once() {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let ok = |type_: &str| Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: "Placed".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: now.clone(),
        };
        let mut status = EdgeServiceStatus {
            observed_generation: Some(1),
            conditions: vec![ok("Ready"), ok("Placed"), ok("Degraded")],
            ..EdgeServiceStatus::default()
        };
        let refusal = PortPolicy::default().check("demo", 22).unwrap_err();
        mark_refused(&mut status, &refusal, None, &now);
        let get = |t: &str| status.conditions.iter().find(|c| c.type_ == t).unwrap();
        assert_eq!(get("Placed").status, "False");
        assert_eq!(get("Placed").reason, PORT_NOT_ALLOWED);
        assert_eq!(get("Degraded").status, "True");
        assert!(get("Degraded").message.contains("port 22 is below 1024"));
        assert!(newly_refused(None, &status).is_some());
        assert!(newly_refused(Some(&status), &status).is_none());
    }
}
