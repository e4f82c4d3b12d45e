//! This node's Lease (`edgewire_api::node_lease`), renewed as the agent's
//! heartbeat. A renewal is one small update of a built-in object, where a
//! status report is a server-side apply of a custom resource that the API
//! server validates against its schema: a fleet renewing Leases costs the
//! API server a fraction of one reporting its status every interval.
//!
//! The `renewTime` is the agent's clock and only informative: the operator
//! judges freshness by when it saw the Lease change.

use std::time::Duration;

use edgewire_api::node_lease;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

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
        NodeLease {
            api: Api::namespaced(client, namespace),
            name: node_lease::name(node),
            node: node.to_string(),
            duration_seconds: node_lease::duration_seconds(interval),
            current: None,
        }
    }

    /// Renews the Lease, creating it when there is none. After a failure
    /// (a conflict, a deleted Lease) the next renewal reads it afresh.
    pub async fn renew(&mut self) -> Result<(), kube::Error> {
        let previous = match self.current.take() {
            Some(lease) => lease,
            None => match self.api.get_opt(&self.name).await? {
                Some(lease) => lease,
                None => {
                    let fresh = self.renewed(None);
                    self.current = Some(self.api.create(&PostParams::default(), &fresh).await?);
                    return Ok(());
                }
            },
        };
        let renewed = self.renewed(Some(previous));
        let written = self
            .api
            .replace(&self.name, &PostParams::default(), &renewed)
            .await?;
        self.current = Some(written);
        Ok(())
    }

    fn renewed(&self, previous: Option<Lease>) -> Lease {
        node_lease::renewed(
            &self.node,
            Timestamp::now(),
            Some(self.duration_seconds),
            previous,
        )
    }
}
