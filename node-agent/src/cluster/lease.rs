//! This node's Lease (`edgewire_api::node_lease`), renewed as the agent's
//! heartbeat. A renewal is one small update of a built-in object, where a
//! status report is a server-side apply of a custom resource that the API
//! server validates against its schema: a fleet renewing Leases costs the
//! API server a fraction of one reporting its status every interval.
//!
//! The `renewTime` is the agent's clock and only informative: the operator
//! judges freshness by when it saw the Lease change.

use std::collections::BTreeMap;
use std::time::Duration;

use edgewire_api::node_lease;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

pub struct NodeLease {
    api: Api<Lease>,
    name: String,
    node: String,
    /// What the Lease says it lasts: informative, as the operator has its
    /// own heartbeat timeout.
    duration_seconds: i32,
    /// The Lease as last written, to update without reading it first; none
    /// until it is read or created, and again after a failed write.
    current: Option<Lease>,
}

impl NodeLease {
    pub fn new(client: Client, namespace: &str, node: &str, interval: Duration) -> NodeLease {
        // Three missed renewals, as a kubelet's node Lease lasts four of its
        // ten-second renewals.
        let duration_seconds = i32::try_from((interval * 3).as_secs().max(1)).unwrap_or(i32::MAX);
        NodeLease {
            api: Api::namespaced(client, namespace),
            name: node_lease::name(node),
            node: node.to_string(),
            duration_seconds,
            current: None,
        }
    }

    /// Renews the Lease, creating it when there is none. After a failure
    /// (a conflict, a deleted Lease) the next renewal reads it afresh.
    pub async fn renew(&mut self) -> Result<(), kube::Error> {
        let lease = match self.current.take() {
            Some(lease) => lease,
            None => match self.api.get_opt(&self.name).await? {
                Some(lease) => lease,
                None => {
                    let created = self
                        .api
                        .create(&PostParams::default(), &self.fresh())
                        .await?;
                    self.current = Some(created);
                    return Ok(());
                }
            },
        };
        let mut renewed = lease;
        renewed.spec = Some(LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::now())),
            ..self.spec(renewed.spec.take())
        });
        let written = self
            .api
            .replace(&self.name, &PostParams::default(), &renewed)
            .await?;
        self.current = Some(written);
        Ok(())
    }

    fn fresh(&self) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(
                    node_lease::LABEL.to_string(),
                    "true".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                ..self.spec(None)
            }),
        }
    }

    /// The spec this agent keeps, on top of `old`.
    fn spec(&self, old: Option<LeaseSpec>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.node.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            ..old.unwrap_or_default()
        }
    }
}
