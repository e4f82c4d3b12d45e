//! The EdgeNode controller: writes each EdgeNode's `Ready` condition from its
//! heartbeat's freshness (as the shared `HeartbeatClock` judges it), only
//! when it changes, and comes back when it will.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewire_api::crd::EdgeNode;
use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::desired::MANAGER;
use crate::freshness::HeartbeatClock;
use crate::metrics::Metrics;
use crate::placement::Freshness;
use crate::watch::WatchBackoff;

struct Ctx {
    client: Client,
    metrics: Metrics,
    clock: Arc<HeartbeatClock>,
}

/// The Ready condition an EdgeNode should carry now, given how fresh its
/// heartbeat is, keeping the transition time of an unchanged status.
pub fn ready_condition(node: &EdgeNode, fresh: Freshness, now: Timestamp) -> Condition {
    let (status, reason, message) = match (
        fresh,
        node.status.as_ref().and_then(|s| s.last_heartbeat.as_ref()),
    ) {
        (Freshness::Fresh, _) => ("True", "HeartbeatFresh", "the agent reports in time"),
        (_, None) => ("False", "NeverReported", "the agent has not reported yet"),
        _ => (
            "False",
            "HeartbeatStale",
            "the agent has not reported within the heartbeat timeout",
        ),
    };
    let old = node.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == status)
    });
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: node.metadata.generation,
        last_transition_time: old.map_or(Time(now), |c| c.last_transition_time.clone()),
    }
}

async fn reconcile(node: Arc<EdgeNode>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    let started = Instant::now();
    // While the EdgeNode watch is failing, no heartbeat can be seen: judge
    // nothing until it delivers again.
    if ctx.clock.behind() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let (fresh, changes_in) = ctx.clock.freshness(&node);
    let condition = ready_condition(&node, fresh, Timestamp::now());
    let current = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let mut result = Ok(());
    if current != Some(&condition) {
        let api: Api<EdgeNode> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": EdgeNode::api_version(&()),
            "kind": EdgeNode::kind(&()),
            "status": {"conditions": [condition]},
        });
        result = api
            .patch_status(
                &node.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ctx.metrics.write("edgenode_status"));
    }
    ctx.metrics
        .reconciled("edgenode", started.elapsed(), result.is_err());
    result?;
    Ok(changes_in.map_or_else(Action::await_change, |d| {
        Action::requeue(d + Duration::from_millis(200))
    }))
}

fn error_policy(_node: Arc<EdgeNode>, err: &kube::Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "edgenode reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

pub async fn run(
    client: Client,
    metrics: Metrics,
    clock: Arc<HeartbeatClock>,
    selector: Option<String>,
    stop: CancellationToken,
) {
    let mut wc = watcher::Config::default();
    if let Some(selector) = &selector {
        wc = wc.labels(selector);
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        metrics,
        clock,
    });
    Controller::new(Api::<EdgeNode>::all(client), wc)
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
