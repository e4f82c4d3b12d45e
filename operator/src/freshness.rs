//! Node freshness, judged by observation.
//!
//! An agent stamps `lastHeartbeat` with its own clock, and edge boxes run
//! without NTP or a clock battery: comparing that stamp with the operator's
//! clock keeps a dead node Ready for as long as its clock ran ahead, and
//! never places one whose clock is behind. So, as Kubernetes' node lifecycle
//! controller does with node Leases, the operator records *when it saw* each
//! node's heartbeat value change, on its own monotonic clock, and judges
//! the age from that. The agent's timestamp is only compared with its own
//! previous value. A heartbeat is either a change of the EdgeNode's
//! `lastHeartbeat` or a renewal of the node's Lease (`edgewire_api::
//! node_lease`); the later sighting of the two counts.
//!
//! Two moments give every node a full timeout of grace, because before them
//! the operator could not have seen a heartbeat: the start of observation (an
//! operator that just became leader) and the moment a heartbeat watch (of
//! EdgeNodes or of node Leases) delivers again after failing (an API server
//! outage). While a heartbeat
//! watch is failing and has delivered nothing since, no staleness is judged
//! at all.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgewire_api::crd::EdgeNode;
use kube::ResourceExt;
use kube::runtime::watcher;

use crate::placement::Freshness;

/// The timeouts freshness is judged by.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Unseen for this long: stale (out of the endpoints).
    pub heartbeat: Duration,
    /// Unseen for this long: gone (replaced in the placement).
    pub eviction: Duration,
}

/// Freshness of a heartbeat last seen changing at `seen`, trusting the view
/// only since `epoch`, judged at `now`; and how long until that changes.
pub fn judge(
    seen: Instant,
    epoch: Instant,
    now: Instant,
    t: Timeouts,
) -> (Freshness, Option<Duration>) {
    let age = now.saturating_duration_since(seen.max(epoch));
    if age <= t.heartbeat {
        (Freshness::Fresh, Some(t.heartbeat - age))
    } else if age <= t.eviction {
        (Freshness::Stale, Some(t.eviction - age))
    } else {
        (Freshness::Gone, None)
    }
}

#[derive(Debug)]
struct Seen {
    /// The heartbeat value as the agent wrote it; only compared for change.
    beat: String,
    at: Instant,
}

/// Where an agent's heartbeat is seen: its EdgeNode's `lastHeartbeat`
/// (written with every status report) or its node Lease's `renewTime`
/// (renewed every heartbeat interval). A node is fresh while either changed
/// recently, so an agent that cannot write its Lease (an older agent, or
/// one without the Role) is judged by its status alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Status = 0,
    Lease = 1,
}

#[derive(Debug)]
struct State {
    seen: HashMap<String, [Option<Seen>; 2]>,
    epoch: Instant,
    /// Per source, the last watch error with nothing delivered since.
    failing_since: [Option<Instant>; 2],
}

impl State {
    fn latest(&self, node: &str) -> Option<Instant> {
        self.seen
            .get(node)?
            .iter()
            .flatten()
            .map(|seen| seen.at)
            .max()
    }
}

/// When this operator saw each node's heartbeat change.
#[derive(Debug)]
pub struct HeartbeatClock {
    timeouts: Timeouts,
    state: Mutex<State>,
}

impl HeartbeatClock {
    /// A clock that starts observing now: every node gets a full timeout.
    pub fn new(timeouts: Timeouts) -> HeartbeatClock {
        HeartbeatClock::starting_at(timeouts, Instant::now())
    }

    fn starting_at(timeouts: Timeouts, now: Instant) -> HeartbeatClock {
        HeartbeatClock {
            timeouts,
            state: Mutex::new(State {
                seen: HashMap::new(),
                epoch: now,
                failing_since: [None, None],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `node`'s status heartbeat as seen now. Idempotent: the same
    /// heartbeat value seen again (by a second watch, or in a relist) keeps
    /// its first sighting.
    pub fn observe(&self, node: &EdgeNode) {
        self.observe_at(node, Instant::now());
    }

    fn observe_at(&self, node: &EdgeNode, now: Instant) {
        if let Some(beat) = heartbeat(node) {
            self.observe_beat(&node.name_any(), Source::Status, beat, now);
        }
    }

    /// Records a renewal of `node`'s Lease as seen now. True when it brings
    /// the node back: before it, the node was not fresh (or never seen).
    pub fn observe_lease(&self, node: &str, renewed: String) -> bool {
        self.observe_beat(node, Source::Lease, renewed, Instant::now())
    }

    fn observe_beat(&self, node: &str, source: Source, beat: String, now: Instant) -> bool {
        let mut state = self.lock();
        let was_fresh = state
            .latest(node)
            .is_some_and(|at| judge(at, state.epoch, now, self.timeouts).0 == Freshness::Fresh);
        let slot = &mut state.seen.entry(node.to_string()).or_default()[source as usize];
        match slot {
            Some(seen) if seen.beat == beat => false,
            _ => {
                *slot = Some(Seen { beat, at: now });
                !was_fresh
            }
        }
    }

    pub fn forget(&self, node: &str) {
        self.lock().seen.remove(node);
    }

    /// Feeds the health of the watch that sees `source`: an error starts an
    /// outage; the first delivery after it ends the outage and starts a new
    /// epoch.
    pub fn watch_event<K>(
        &self,
        source: Source,
        event: &Result<watcher::Event<K>, watcher::Error>,
    ) {
        self.watch_event_at(source, event, Instant::now());
    }

    fn watch_event_at<K>(
        &self,
        source: Source,
        event: &Result<watcher::Event<K>, watcher::Error>,
        now: Instant,
    ) {
        let mut state = self.lock();
        let failing = &mut state.failing_since[source as usize];
        match event {
            Err(_) => *failing = Some(now),
            // A relist is complete only at InitDone.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => {
                if failing.take().is_some() {
                    state.epoch = now;
                }
            }
        }
    }

    /// Whether the view is known to be behind: a heartbeat watch failed and
    /// has not delivered since. A resumed watch with nothing to say looks
    /// the same as a failing one, so after a heartbeat timeout of silence
    /// the view is trusted again, from a new epoch.
    pub fn behind(&self) -> bool {
        self.behind_at(Instant::now())
    }

    fn behind_at(&self, now: Instant) -> bool {
        let mut state = self.lock();
        let mut behind = false;
        let mut resumed = false;
        for failing in &mut state.failing_since {
            match *failing {
                None => {}
                Some(since) if now.saturating_duration_since(since) < self.timeouts.heartbeat => {
                    behind = true;
                }
                Some(_) => {
                    *failing = None;
                    resumed = true;
                }
            }
        }
        if resumed {
            state.epoch = now;
        }
        behind
    }

    /// How fresh `node`'s agent is now, and how long until that changes.
    pub fn freshness(&self, node: &EdgeNode) -> (Freshness, Option<Duration>) {
        self.freshness_at(node, Instant::now())
    }

    fn freshness_at(&self, node: &EdgeNode, now: Instant) -> (Freshness, Option<Duration>) {
        // A node reporting for the first time is news to the clock too.
        self.observe_at(node, now);
        let state = self.lock();
        match state.latest(&node.name_any()) {
            Some(at) => judge(at, state.epoch, now, self.timeouts),
            None => (Freshness::Gone, None),
        }
    }
}

fn heartbeat(node: &EdgeNode) -> Option<String> {
    let beat = node.status.as_ref()?.last_heartbeat.as_ref()?;
    Some(beat.0.to_string())
}

#[cfg(test)]
mod tests {
    use edgewire_api::crd::{EdgeNodeSpec, EdgeNodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    const S: Duration = Duration::from_secs(1);
    const T: Timeouts = Timeouts {
        heartbeat: Duration::from_secs(30),
        eviction: Duration::from_secs(300),
    };

    fn node(name: &str, beat: Option<i64>) -> EdgeNode {
        let mut en = EdgeNode::new(
            name,
            EdgeNodeSpec {
                address: "192.0.2.1".into(),
                mesh_port: None,
                mesh_public_key: None,
            },
        );
        en.status = Some(EdgeNodeStatus {
            last_heartbeat: beat.map(|b| Time(Timestamp::from_second(b).unwrap())),
            ..Default::default()
        });
        en
    }

    #[test]
    fn judged_from_the_later_of_sighting_and_epoch() {
        let t0 = Instant::now();
        assert_eq!(
            judge(t0, t0, t0 + 10 * S, T),
            (Freshness::Fresh, Some(20 * S))
        );
        assert_eq!(judge(t0, t0, t0 + 31 * S, T).0, Freshness::Stale);
        assert_eq!(judge(t0, t0, t0 + 301 * S, T), (Freshness::Gone, None));
        // Seen long ago, but the view was only trusted again at t0 + 100 s.
        assert_eq!(judge(t0, t0 + 100 * S, t0 + 110 * S, T).0, Freshness::Fresh);
    }

    #[test]
    fn an_agent_clock_far_ahead_or_behind_changes_nothing() {
        let t0 = Instant::now();
        let clock = HeartbeatClock::starting_at(T, t0);
        let now = Timestamp::now().as_second();
        // Ten minutes ahead, then dead: stale once unseen for the timeout.
        let ahead = node("ahead", Some(now + 600));
        assert_eq!(clock.freshness_at(&ahead, t0).0, Freshness::Fresh);
        assert_eq!(clock.freshness_at(&ahead, t0 + 29 * S).0, Freshness::Fresh);
        assert_eq!(clock.freshness_at(&ahead, t0 + 31 * S).0, Freshness::Stale);
        // Ten minutes behind, beating every 10 s: always fresh.
        for i in 0..20 {
            let behind = node("behind", Some(now - 600 + 10 * i));
            let at = t0 + 10 * S * u32::try_from(i).unwrap();
            assert_eq!(
                clock.freshness_at(&behind, at).0,
                Freshness::Fresh,
                "beat {i}"
            );
        }
    }

    #[test]
    fn the_same_heartbeat_seen_again_is_not_a_new_sighting() {
        let t0 = Instant::now();
        let clock = HeartbeatClock::starting_at(T, t0);
        clock.observe_at(&node("a", Some(100)), t0);
        // A second watch, or a relist, delivers the same value later.
        clock.observe_at(&node("a", Some(100)), t0 + 25 * S);
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 31 * S).0,
            Freshness::Stale
        );
        // A changed value is a heartbeat, even one that goes backwards.
        clock.observe_at(&node("a", Some(90)), t0 + 32 * S);
        assert_eq!(
            clock.freshness_at(&node("a", Some(90)), t0 + 40 * S).0,
            Freshness::Fresh
        );
    }

    #[test]
    fn never_reported_is_gone() {
        let clock = HeartbeatClock::new(T);
        assert_eq!(clock.freshness(&node("new", None)), (Freshness::Gone, None));
    }

    #[test]
    fn a_watch_outage_gives_every_node_a_full_timeout_from_when_it_resumes() {
        let t0 = Instant::now();
        let clock = HeartbeatClock::starting_at(T, t0);
        clock.observe_at(&node("a", Some(100)), t0);
        // The API server goes away at t0 + 5 s for a minute.
        clock.watch_event_at::<()>(
            Source::Status,
            &Err(watcher::Error::NoResourceVersion),
            t0 + 5 * S,
        );
        assert!(clock.behind_at(t0 + 20 * S));
        clock.watch_event_at::<()>(
            Source::Status,
            &Err(watcher::Error::NoResourceVersion),
            t0 + 60 * S,
        );
        assert!(clock.behind_at(t0 + 65 * S));
        // A relist is not a delivery until it is complete.
        clock.watch_event_at::<()>(Source::Status, &Ok(watcher::Event::Init), t0 + 66 * S);
        assert!(clock.behind_at(t0 + 66 * S));
        clock.watch_event_at::<()>(Source::Status, &Ok(watcher::Event::InitDone), t0 + 67 * S);
        assert!(!clock.behind_at(t0 + 67 * S));
        // Node a's heartbeat has not changed since t0, but it is judged from
        // t0 + 67 s, when the operator could see again.
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 90 * S).0,
            Freshness::Fresh
        );
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 98 * S).0,
            Freshness::Stale
        );
    }

    #[test]
    fn a_resumed_watch_with_nothing_to_deliver_is_trusted_after_a_timeout() {
        let t0 = Instant::now();
        let clock = HeartbeatClock::starting_at(T, t0);
        clock.observe_at(&node("a", Some(100)), t0);
        clock.watch_event_at::<()>(
            Source::Status,
            &Err(watcher::Error::NoResourceVersion),
            t0 + S,
        );
        assert!(clock.behind_at(t0 + 30 * S));
        assert!(!clock.behind_at(t0 + 32 * S));
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 60 * S).0,
            Freshness::Fresh
        );
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 63 * S).0,
            Freshness::Stale
        );
    }

    #[test]
    fn a_node_renewing_only_its_lease_stays_fresh_and_its_return_is_news() {
        let t0 = Instant::now();
        let clock = HeartbeatClock::starting_at(T, t0);
        // One status report at t0, then Lease renewals every 10 s.
        clock.observe_at(&node("a", Some(100)), t0);
        for i in 1..10u32 {
            let renewal = format!("renewal {i}");
            let news = clock.observe_beat("a", Source::Lease, renewal, t0 + 10 * S * i);
            assert!(!news, "an ordinary renewal of a fresh node is no news");
        }
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 100 * S).0,
            Freshness::Fresh
        );
        // The renewals stop: stale a timeout after the last one.
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 121 * S).0,
            Freshness::Stale
        );
        // The same renewal seen again (a relist) changes nothing.
        assert!(!clock.observe_beat("a", Source::Lease, "renewal 9".into(), t0 + 122 * S));
        // A new one brings the node back, and says so.
        assert!(clock.observe_beat("a", Source::Lease, "renewal 10".into(), t0 + 123 * S));
        assert_eq!(
            clock.freshness_at(&node("a", Some(100)), t0 + 124 * S).0,
            Freshness::Fresh
        );
        // A node first seen by its Lease is news too.
        assert!(clock.observe_beat("b", Source::Lease, "first".into(), t0 + 124 * S));
    }

    #[test]
    fn a_failing_lease_watch_holds_judgement_like_a_failing_edgenode_watch() {
        let t0 = Instant::now();
        let clock = HeartbeatClock::starting_at(T, t0);
        clock.observe_beat("a", Source::Lease, "r1".into(), t0);
        clock.watch_event_at::<()>(
            Source::Lease,
            &Err(watcher::Error::NoResourceVersion),
            t0 + S,
        );
        // The EdgeNode watch delivering does not end the Lease watch's outage.
        clock.watch_event_at::<()>(Source::Status, &Ok(watcher::Event::InitDone), t0 + 2 * S);
        assert!(clock.behind_at(t0 + 20 * S));
        clock.watch_event_at::<()>(Source::Lease, &Ok(watcher::Event::InitDone), t0 + 40 * S);
        assert!(!clock.behind_at(t0 + 40 * S));
        // Not renewed since t0, but judged from when the watch came back.
        assert_eq!(
            clock.freshness_at(&node("a", None), t0 + 65 * S).0,
            Freshness::Fresh
        );
        assert_eq!(
            clock.freshness_at(&node("a", None), t0 + 71 * S).0,
            Freshness::Stale
        );
    }
}
