//! The Events an EdgeService reconcile tells, decided from the status and
//! placement before and after it; `kubectl describe es` shows them.

use std::collections::BTreeMap;

use edgewire_api::crd::{EdgeServiceStatus, NodePlacement, PlacementState};
use kube::runtime::events::EventType;

use crate::placement::Decision;
use crate::status;

/// One Event to publish for an EdgeService.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

/// The Events for a reconcile that took an EdgeService (on `port`) from
/// `old` status and `placed_before` to `new` status and `placed_now`.
pub fn service_events(
    port: i32,
    (old, placed_before): (Option<&EdgeServiceStatus>, &[NodePlacement]),
    (new, placed_now): (&EdgeServiceStatus, &[NodePlacement]),
    decision: &Decision,
    foreign: Option<&str>,
) -> Vec<ServiceEvent> {
    let state_of = |placement: &[NodePlacement]| -> BTreeMap<String, PlacementState> {
        placement
            .iter()
            .map(|p| (p.node.clone(), p.state))
            .collect()
    };
    let before = state_of(placed_before);
    let after = state_of(placed_now);
    let mut events = Vec::new();
    let added: Vec<&str> = after
        .keys()
        .filter(|n| !before.contains_key(*n))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = before
        .keys()
        .filter(|n| !after.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !added.is_empty() {
        events.push((
            EventType::Normal,
            "Placed",
            format!("placed on {}", added.join(", ")),
        ));
    }
    if !removed.is_empty() {
        events.push((
            EventType::Normal,
            "Unplaced",
            format!("removed from {}", removed.join(", ")),
        ));
    }
    for (node, state) in &after {
        let was = before.get(node);
        if was == Some(state) {
            continue;
        }
        match state {
            PlacementState::Stale => events.push((
                EventType::Warning,
                "NodeStale",
                format!("{node}: agent heartbeat is stale; removed from the endpoints"),
            )),
            PlacementState::Failed => events.push((
                EventType::Warning,
                "ListenFailed",
                format!("{node}: the agent could not start the service"),
            )),
            // Back from stale or failed; a node's first readiness is no news
            // (the Placed Event said it was coming).
            PlacementState::Ready
                if matches!(was, Some(PlacementState::Stale | PlacementState::Failed)) =>
            {
                events.push((
                    EventType::Normal,
                    "NodeReady",
                    format!("{node}: serving again"),
                ))
            }
            _ => {}
        }
    }
    let old_conflict = old.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "PortConflict")
    });
    if !decision.conflicts.is_empty() && !old_conflict {
        let list: Vec<String> = decision
            .conflicts
            .iter()
            .map(|(n, o)| format!("{n} (held by {o})"))
            .collect();
        events.push((
            EventType::Warning,
            "PortConflict",
            format!("port {} is taken on {}", port, list.join(", ")),
        ));
    }
    let old_foreign = old.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == status::SERVICE_CONFLICT)
    });
    if let Some(message) = foreign
        && !old_foreign
    {
        events.push((
            EventType::Warning,
            status::SERVICE_CONFLICT,
            message.to_string(),
        ));
    }
    let degraded_reason = |s: Option<&EdgeServiceStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = degraded_reason(Some(new))
        && reason.starts_with("Module")
        && degraded_reason(old).map(|(r, _)| r) != Some(reason.clone())
    {
        events.push((EventType::Warning, module_reason(&reason), message));
    }
    // A Secret problem is told again when it changes (another Secret, or
    // missing turned invalid).
    if let Some((reason, message)) = degraded_reason(Some(new))
        && let Some(reason) = secret_reason(&reason)
        && degraded_reason(old) != Some((reason.to_string(), message.clone()))
    {
        events.push((EventType::Warning, reason, message));
    }
    if let Some(note) = crate::ports::newly_refused(old, new) {
        events.push((EventType::Warning, crate::ports::PORT_NOT_ALLOWED, note));
    }
    events
        .into_iter()
        .map(|(type_, reason, note)| ServiceEvent {
            type_,
            reason,
            note,
        })
        .collect()
}

/// The Event reasons for unusable Wasm modules (Event reasons are static).
fn module_reason(reason: &str) -> &'static str {
    match reason {
        "ModulePullFailed" => "ModulePullFailed",
        "ModuleInvalid" => "ModuleInvalid",
        "ModuleMissingExport" => "ModuleMissingExport",
        "ModuleUnsupportedImport" => "ModuleUnsupportedImport",
        "ModuleDigestMismatch" => "ModuleDigestMismatch",
        _ => "ModuleUnusable",
    }
}

/// The Event reasons for unusable Secrets (Event reasons are static).
fn secret_reason(reason: &str) -> Option<&'static str> {
    use crate::secret_check::{SECRET_INVALID, SECRET_MISSING};
    [SECRET_MISSING, SECRET_INVALID]
        .into_iter()
        .find(|r| *r == reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::placed;

    fn reasons(before: &[NodePlacement], after: &[NodePlacement]) -> Vec<&'static str> {
        let status = EdgeServiceStatus::default();
        service_events(
            8080,
            (Some(&status), before),
            (&status, after),
            &Decision::default(),
            None,
        )
        .into_iter()
        .map(|e| e.reason)
        .collect()
    }

    #[test]
    fn a_node_serving_for_the_first_time_is_no_news() {
        use PlacementState::{Pending, Ready};
        assert_eq!(reasons(&[], &[placed("a", Pending)]), ["Placed"]);
        assert!(reasons(&[placed("a", Pending)], &[placed("a", Ready)]).is_empty());
        // Placed and listening before the first status was written.
        assert_eq!(reasons(&[], &[placed("a", Ready)]), ["Placed"]);
    }

    #[test]
    fn a_node_back_from_stale_or_failed_serves_again() {
        use PlacementState::{Failed, Ready, Stale};
        assert_eq!(
            reasons(&[placed("a", Ready)], &[placed("a", Stale)]),
            ["NodeStale"]
        );
        assert_eq!(
            reasons(&[placed("a", Stale)], &[placed("a", Ready)]),
            ["NodeReady"]
        );
        assert_eq!(
            reasons(&[placed("a", Ready)], &[placed("a", Failed)]),
            ["ListenFailed"]
        );
        assert_eq!(
            reasons(&[placed("a", Failed)], &[placed("a", Ready)]),
            ["NodeReady"]
        );
        assert_eq!(
            reasons(
                &[placed("a", Ready), placed("b", Ready)],
                &[placed("b", Ready)]
            ),
            ["Unplaced"]
        );
    }
}
