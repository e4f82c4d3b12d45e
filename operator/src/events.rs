//! Events, for what a user should see in `kubectl describe`.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};

use crate::metrics::Metrics;

/// Publishes `event` about `regarding` and counts it as a write. A failure
/// is logged and goes no further: what an Event tells is in the object's
/// status conditions too.
pub async fn publish(
    recorder: &Recorder,
    metrics: &Metrics,
    event: &Event,
    regarding: &ObjectReference,
) {
    match recorder.publish(event, regarding).await {
        Ok(()) => metrics.write("event"),
        Err(err) => tracing::warn!(%err, reason = %event.reason, "could not publish an event"),
    }
}
