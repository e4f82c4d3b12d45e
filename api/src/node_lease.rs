//! The Lease an agent renews as its heartbeat, the way a kubelet renews its
//! node Lease: a small, fixed-size write the API server handles cheaply,
//! while the EdgeNode's status is written only when what it reports changes.
//! The operator judges a node's freshness by when it *saw* either change.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

/// Label on every agent's node Lease; the operator watches by it.
pub const LABEL: &str = "edgewire.dev/node-lease";

const PREFIX: &str = "edgewire-node-";

/// The name of `node`'s Lease.
pub fn name(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// The node a Lease of that name is the heartbeat of.
pub fn node(lease_name: &str) -> Option<&str> {
    lease_name.strip_prefix(PREFIX).filter(|n| !n.is_empty())
}

/// What a Lease renewed every `interval` says it lasts: three missed
/// renewals, as a kubelet's node Lease lasts four of its ten-second
/// renewals. Informative: the operator has its own heartbeat timeout.
pub fn duration_seconds(interval: Duration) -> i32 {
    i32::try_from((interval * 3).as_secs().max(1)).unwrap_or(i32::MAX)
}

/// `node`'s Lease as its agent writes it, renewed at `now`: held by the
/// node, labelled for the operator's watch (the label is put back if it was
/// taken off). `now` is the agent's clock, so only informative. `previous`,
/// the Lease as last read, keeps what the agent does not set (its
/// resourceVersion above all, for an update); with none, the Lease is to be
/// created, acquired at `now`. A Lease some other holder had is acquired
/// anew too.
pub fn renewed(
    node: &str,
    now: Timestamp,
    duration_seconds: Option<i32>,
    previous: Option<Lease>,
) -> Lease {
    let now = MicroTime(now);
    let (metadata, mut spec) = match previous {
        Some(lease) => (lease.metadata, lease.spec.unwrap_or_default()),
        None => (ObjectMeta::default(), LeaseSpec::default()),
    };
    if spec.holder_identity.as_deref() != Some(node) {
        spec.acquire_time = Some(now.clone());
    }
    let mut labels = metadata.labels.unwrap_or_default();
    labels.insert(LABEL.to_string(), "true".to_string());
    Lease {
        metadata: ObjectMeta {
            name: Some(name(node)),
            labels: Some(labels),
            ..metadata
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_string()),
            renew_time: Some(now),
            lease_duration_seconds: duration_seconds.or(spec.lease_duration_seconds),
            ..spec
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_lease_lasts_three_renewals_and_at_least_a_second() {
        assert_eq!(duration_seconds(Duration::from_secs(10)), 30);
        assert_eq!(duration_seconds(Duration::from_millis(200)), 1);
        assert_eq!(
            duration_seconds(Duration::from_secs(u64::MAX / 4)),
            i32::MAX
        );
    }

    #[test]
    fn a_renewal_keeps_what_the_agent_does_not_set() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(1_020).unwrap();
        let first = renewed("edge-1", t0, Some(60), None);
        assert_eq!(first.metadata.name.as_deref(), Some("edgewire-node-edge-1"));
        let spec = first.spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("edge-1"));
        assert_eq!(spec.acquire_time, Some(MicroTime(t0)));
        assert_eq!(spec.renew_time, Some(MicroTime(t0)));
        assert_eq!(
            first.metadata.labels.as_ref().and_then(|l| l.get(LABEL)),
            Some(&"true".to_string())
        );

        let mut read = first;
        read.metadata.resource_version = Some("7".into());
        read.metadata.labels = Some(BTreeMap::from([("team".into(), "a".into())]));
        let second = renewed("edge-1", t1, None, Some(read));
        assert_eq!(second.metadata.resource_version.as_deref(), Some("7"));
        let labels = second.metadata.labels.unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        assert!(labels.contains_key(LABEL));
        let spec = second.spec.unwrap();
        assert_eq!(spec.acquire_time, Some(MicroTime(t0)));
        assert_eq!(spec.renew_time, Some(MicroTime(t1)));
        assert_eq!(spec.lease_duration_seconds, Some(60));

        let mut taken = renewed("edge-1", t0, Some(60), None);
        if let Some(spec) = taken.spec.as_mut() {
            spec.holder_identity = Some("edge-2".into());
        }
        let back = renewed("edge-1", t1, None, Some(taken)).spec.unwrap();
        assert_eq!(back.holder_identity.as_deref(), Some("edge-1"));
        assert_eq!(back.acquire_time, Some(MicroTime(t1)), "acquired anew");
    }

    #[test]
    fn a_node_and_its_lease_name_map_both_ways() {
        assert_eq!(name("edge-1"), "edgewire-node-edge-1");
        assert_eq!(node(&name("edge-1")), Some("edge-1"));
        assert_eq!(node("edgewire-operator"), None);
        assert_eq!(node("edgewire-node-"), None);
    }
}
