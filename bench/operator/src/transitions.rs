//! Counting the times an EdgeService leaves Ready, and judging each against
//! the simulated agents' ground truth: a *false* NotReady is one where every
//! node the service needs had heartbeats on time, so the operator's own view
//! (not the fleet) made it leave Ready.
//!
//! The judgement is a pure function of the placement just before and just
//! after the transition and of whether each node was live; a watch of the
//! EdgeServices feeds it for the whole run.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeService, EdgeServiceStatus, NodePlacement, PlacementState};
use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::agents::Heartbeats;

/// The benchmark's phases, in order; transitions are counted per phase.
pub const PHASES: [&str; 3] = ["apply", "steady", "relabel"];

/// Why a service left Ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every node it needs was heartbeating on time, and either one of them
    /// is shown Stale or the service is on the same nodes as before: the
    /// operator judged a live node not ready.
    False,
    /// Every node was heartbeating on time, none is shown Stale, and the
    /// service moved (a node left its placement or joined it): it waits for
    /// a newly placed node's agent to report the service listening.
    Move,
    /// Some node it needs had missed its heartbeats: the fleet, not the
    /// operator, made it leave Ready.
    Late,
}

fn is_ready(status: Option<&EdgeServiceStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn nodes(placement: &[NodePlacement]) -> BTreeSet<&str> {
    placement.iter().map(|p| p.node.as_str()).collect()
}

/// Judges one Ready → not Ready transition. `live(node)` says whether the
/// node's heartbeats were on time at the moment of the transition.
pub fn classify(
    before: &[NodePlacement],
    after: &[NodePlacement],
    live: impl Fn(&str) -> bool,
) -> Kind {
    let (old, new) = (nodes(before), nodes(after));
    if !old.union(&new).all(|n| live(n)) {
        return Kind::Late;
    }
    let stale = after.iter().any(|p| p.state == PlacementState::Stale);
    if stale || old == new {
        Kind::False
    } else {
        Kind::Move
    }
}

/// Counts of transitions out of Ready, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub false_not_ready: usize,
    pub moves: usize,
    pub late: usize,
}

impl Counts {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::False => self.false_not_ready += 1,
            Kind::Move => self.moves += 1,
            Kind::Late => self.late += 1,
        }
    }
}

/// Each service's last seen readiness and placement, and the counts per
/// phase. Pure: it is told the phase and who was live.
#[derive(Default)]
pub struct Tracker {
    last: HashMap<String, (bool, Vec<NodePlacement>)>,
    pub counts: [Counts; PHASES.len()],
    /// The first few false transitions, for the report: service, reason and
    /// message of its Ready condition.
    pub examples: Vec<String>,
}

const EXAMPLES: usize = 5;

impl Tracker {
    /// Takes one observed state of a service; returns the kind of the
    /// transition if it just left Ready.
    pub fn observe(
        &mut self,
        key: &str,
        status: Option<&EdgeServiceStatus>,
        phase: usize,
        live: impl Fn(&str) -> bool,
    ) -> Option<Kind> {
        let ready = is_ready(status);
        let placement = status.map(|s| s.placement.clone()).unwrap_or_default();
        let previous = self
            .last
            .insert(key.to_string(), (ready, placement.clone()));
        let (was_ready, before) = previous?;
        if !was_ready || ready {
            return None;
        }
        let kind = classify(&before, &placement, live);
        self.counts[phase.min(PHASES.len() - 1)].add(kind);
        if kind == Kind::False && self.examples.len() < EXAMPLES {
            let condition = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
            self.examples.push(format!(
                "{key} in {}: {} ({})",
                PHASES[phase.min(PHASES.len() - 1)],
                condition.map_or("no Ready condition", |c| c.reason.as_str()),
                condition.map_or("", |c| c.message.as_str()),
            ));
        }
        Some(kind)
    }

    pub fn forget(&mut self, key: &str) {
        self.last.remove(key);
    }
}

/// Watches every EdgeService of a namespace for the whole run and counts
/// its transitions out of Ready, judged at the moment the watch sees them.
pub struct TransitionWatch {
    pub tracker: Arc<Mutex<Tracker>>,
    phase: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TransitionWatch {
    pub fn start(
        client: &Client,
        namespace: &str,
        heartbeats: Heartbeats,
        timeout: Duration,
    ) -> TransitionWatch {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let phase = Arc::new(AtomicUsize::new(0));
        let events = watcher(
            Api::<EdgeService>::namespaced(client.clone(), namespace),
            watcher::Config::default(),
        )
        .default_backoff();
        let (t, p) = (Arc::clone(&tracker), Arc::clone(&phase));
        // The watcher retries its own errors; a re-list replays each
        // service's current state, which the tracker takes as one more
        // observation.
        let task = tokio::spawn(events.for_each(move |event| {
            let (t, p, heartbeats) = (Arc::clone(&t), Arc::clone(&p), heartbeats.clone());
            async move {
                let at = Instant::now();
                let live = |node: &str| heartbeats.on_time(node, at, timeout);
                let mut tracker = t.lock().unwrap_or_else(|e| e.into_inner());
                match event {
                    Ok(watcher::Event::Apply(es) | watcher::Event::InitApply(es)) => {
                        let key = es.name_any();
                        tracker.observe(&key, es.status.as_ref(), p.load(Ordering::Relaxed), live);
                    }
                    Ok(watcher::Event::Delete(es)) => tracker.forget(&es.name_any()),
                    _ => {}
                }
            }
        }));
        TransitionWatch {
            tracker,
            phase,
            task,
        }
    }

    /// Counts what follows as part of phase `index` of [`PHASES`].
    pub fn set_phase(&self, index: usize) {
        self.phase.store(index, Ordering::Relaxed);
    }

    pub fn counts(&self) -> [Counts; PHASES.len()] {
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counts
    }

    pub fn examples(&self) -> Vec<String> {
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .examples
            .clone()
    }
}

impl Drop for TransitionWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewire_api::crd::EdgeServiceStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn placed(nodes: &[(&str, PlacementState)]) -> Vec<NodePlacement> {
        nodes
            .iter()
            .map(|(n, state)| NodePlacement {
                node: n.to_string(),
                address: None,
                state: *state,
                message: None,
                mesh_public_key: None,
            })
            .collect()
    }

    fn status(ready: bool, nodes: &[(&str, PlacementState)]) -> EdgeServiceStatus {
        EdgeServiceStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: if ready {
                    "AllNodesReady"
                } else {
                    "NodesNotReady"
                }
                .into(),
                message: String::new(),
                observed_generation: Some(1),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            }],
            placement: placed(nodes),
            ..EdgeServiceStatus::default()
        }
    }

    use PlacementState::{Pending, Ready, Stale};

    #[test]
    fn a_live_node_shown_stale_is_a_false_transition() {
        let before = placed(&[("a", Ready), ("b", Ready)]);
        let after = placed(&[("a", Ready), ("b", Stale)]);
        assert_eq!(classify(&before, &after, |_| true), Kind::False);
        // The same, with b really silent: the fleet's doing.
        assert_eq!(classify(&before, &after, |n| n != "b"), Kind::Late);
    }

    #[test]
    fn same_nodes_not_ready_is_false_and_a_move_is_not() {
        let before = placed(&[("a", Ready), ("b", Ready)]);
        let same = placed(&[("a", Ready), ("b", Pending)]);
        assert_eq!(classify(&before, &same, |_| true), Kind::False);
        let moved = placed(&[("a", Ready), ("c", Pending)]);
        assert_eq!(classify(&before, &moved, |_| true), Kind::Move);
        // A node that left because it was late makes the move the fleet's.
        assert_eq!(classify(&before, &moved, |n| n != "b"), Kind::Late);
        // Stale beside a move is still the operator's misjudgement.
        let moved_stale = placed(&[("a", Stale), ("c", Pending)]);
        assert_eq!(classify(&before, &moved_stale, |_| true), Kind::False);
    }

    #[test]
    fn only_ready_to_not_ready_counts_in_the_current_phase() {
        let mut t = Tracker::default();
        let live = |_: &str| true;
        // First sight, not Ready, then Ready: no transition out of Ready.
        assert_eq!(t.observe("s", None, 0, live), None);
        assert_eq!(
            t.observe("s", Some(&status(false, &[("a", Pending)])), 0, live),
            None
        );
        assert_eq!(
            t.observe("s", Some(&status(true, &[("a", Ready)])), 0, live),
            None
        );
        assert_eq!(
            t.observe("s", Some(&status(true, &[("a", Ready)])), 1, live),
            None
        );
        assert_eq!(
            t.observe("s", Some(&status(false, &[("a", Stale)])), 2, live),
            Some(Kind::False)
        );
        // Still not Ready: the same transition, not a new one.
        assert_eq!(
            t.observe("s", Some(&status(false, &[("a", Stale)])), 2, live),
            None
        );
        assert_eq!(t.counts[2].false_not_ready, 1);
        assert_eq!(t.counts[0], Counts::default());
        assert_eq!(t.examples.len(), 1);
        assert!(t.examples[0].starts_with("s in relabel: NodesNotReady"));
        // Forgotten on delete: a new service of the same name starts over.
        t.forget("s");
        assert_eq!(t.observe("s", Some(&status(false, &[])), 2, live), None);
    }
}
