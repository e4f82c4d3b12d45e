//! Which channel messages had to arrive, and what did not: pure functions
//! over what the clients and the pod observer recorded, all on this
//! machine's clock.
//!
//! A message is owed to a subscriber when, at the moment it was published,
//! the publisher and the subscriber were both connected, had been for
//! `settle` (the subscriber's interest has crossed the mesh), their nodes had
//! both been running the same agent for `settle` and went on running it for
//! `margin` (delivery takes a moment), and the subscriber stayed connected
//! for `margin`. Every owed message must arrive once, and every message of a
//! publisher arrives in the order it was published.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// One connection of a client: from connected (for a subscriber: its
/// subscription confirmed) until it ended or the client stopped.
#[derive(Clone, Debug)]
pub struct Session {
    pub start: Instant,
    pub end: Instant,
    /// Whether the connection was lost rather than closed by the test.
    pub lost: bool,
}

#[derive(Clone, Debug)]
pub struct Published {
    pub n: u64,
    pub at: Instant,
}

#[derive(Clone, Debug)]
pub struct PublisherLog {
    pub node: usize,
    pub sessions: Vec<Session>,
    /// Every publish written, in order; numbers grow across sessions.
    pub sent: Vec<Published>,
}

#[derive(Clone, Debug)]
pub struct Heard {
    pub publisher: usize,
    pub n: u64,
    pub session: usize,
}

#[derive(Clone, Debug)]
pub struct SubscriberLog {
    pub node: usize,
    pub sessions: Vec<Session>,
    pub heard: Vec<Heard>,
}

/// What the observer saw of one node at one moment: the agent running
/// there steadily (its pod Ready, not being deleted), as `(pod uid, restart
/// count)`, or None while it is restarting.
pub type NodeState = Option<(String, i64)>;

/// One look at every node; `at` is taken before the look, so a change seen
/// at the next look happened after `at`.
#[derive(Clone, Debug)]
pub struct Observation {
    pub at: Instant,
    pub nodes: Vec<NodeState>,
}

/// Per node, the closed intervals during which it ran one agent without
/// interruption: between two consecutive looks that saw the same steady
/// agent.
pub fn steady_intervals(
    observations: &[Observation],
    nodes: usize,
) -> Vec<Vec<(Instant, Instant)>> {
    let mut steady = vec![Vec::<(Instant, Instant)>::new(); nodes];
    for pair in observations.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        for (node, intervals) in steady.iter_mut().enumerate() {
            let same = matches!(
                (before.nodes.get(node), after.nodes.get(node)),
                (Some(Some(a)), Some(Some(b))) if a == b
            );
            if !same {
                continue;
            }
            match intervals.last_mut() {
                Some(last) if last.1 == before.at => last.1 = after.at,
                _ => intervals.push((before.at, after.at)),
            }
        }
    }
    steady
}

/// The restarts of each node: the gaps between its steady intervals.
pub fn restarts(steady: &[Vec<(Instant, Instant)>]) -> Vec<Vec<(Instant, Instant)>> {
    steady
        .iter()
        .map(|intervals| intervals.windows(2).map(|w| (w[0].1, w[1].0)).collect())
        .collect()
}

fn covers(intervals: &[(Instant, Instant)], from: Instant, to: Instant) -> bool {
    intervals.iter().any(|(a, b)| *a <= from && to <= *b)
}

#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub settle: Duration,
    pub margin: Duration,
}

/// The verdict: what went wrong, and how many owed deliveries were checked
/// while each node restarted, per (restarting node, publisher's node,
/// subscriber's node).
#[derive(Debug, Default)]
pub struct Verdict {
    pub problems: Vec<String>,
    pub checked_during_restart: Vec<((usize, usize, usize), usize)>,
    pub owed: usize,
}

pub fn judge(
    publishers: &[PublisherLog],
    subscribers: &[SubscriberLog],
    steady: &[Vec<(Instant, Instant)>],
    rules: Rules,
) -> Verdict {
    let restarts = restarts(steady);
    let mut verdict = Verdict::default();
    let mut during = std::collections::BTreeMap::<(usize, usize, usize), usize>::new();
    let quiet = |node: usize, from: Instant, to: Instant| {
        steady.get(node).is_some_and(|s| covers(s, from, to))
    };

    let sessions = publishers
        .iter()
        .map(|l| ("publisher", l.node, &l.sessions))
        .chain(
            subscribers
                .iter()
                .map(|l| ("subscriber", l.node, &l.sessions)),
        );
    for (kind, node, sessions) in sessions {
        for (index, session) in sessions.iter().enumerate() {
            if session.lost && quiet(node, session.end, session.end) {
                verdict.problems.push(format!(
                    "the {kind} at node {node} lost its connection (session {index}) while its node was not restarting"
                ));
            }
        }
    }

    for (s, sub) in subscribers.iter().enumerate() {
        for (p, publisher) in publishers.iter().enumerate() {
            for (session_index, session) in sub.sessions.iter().enumerate() {
                let heard: Vec<u64> = sub
                    .heard
                    .iter()
                    .filter(|h| h.publisher == p && h.session == session_index)
                    .map(|h| h.n)
                    .collect();
                let mut seen = BTreeSet::new();
                let mut last = None;
                for n in &heard {
                    if !seen.insert(*n) {
                        verdict.problems.push(format!(
                            "subscriber {s} (node {}) session {session_index} heard publisher {p}'s message {n} twice",
                            sub.node
                        ));
                    } else if last.is_some_and(|l| *n < l) {
                        verdict.problems.push(format!(
                            "subscriber {s} (node {}) session {session_index} heard publisher {p}'s message {n} after {}",
                            sub.node,
                            last.unwrap_or_default()
                        ));
                    }
                    last = Some(last.map_or(*n, |l: u64| l.max(*n)));
                }
                let mut missing = Vec::new();
                for message in &publisher.sent {
                    let (from, to) = (
                        message.at.checked_sub(rules.settle),
                        message.at + rules.margin,
                    );
                    let Some(from) = from else { continue };
                    let connected = publisher
                        .sessions
                        .iter()
                        .any(|ps| ps.start <= from && message.at <= ps.end)
                        && session.start <= from
                        && to <= session.end;
                    if !connected || !quiet(publisher.node, from, to) || !quiet(sub.node, from, to)
                    {
                        continue;
                    }
                    verdict.owed += 1;
                    for (restarting, windows) in restarts.iter().enumerate() {
                        if windows
                            .iter()
                            .any(|(a, b)| *a <= message.at && message.at <= *b)
                        {
                            *during
                                .entry((restarting, publisher.node, sub.node))
                                .or_default() += 1;
                        }
                    }
                    if !seen.contains(&message.n) {
                        missing.push(message.n);
                    }
                }
                if !missing.is_empty() {
                    verdict.problems.push(format!(
                        "subscriber {s} (node {}) session {session_index} missed publisher {p}'s (node {}) messages {}",
                        sub.node,
                        publisher.node,
                        ranges(&missing)
                    ));
                }
            }
        }
    }
    verdict.checked_during_restart = during.into_iter().collect();
    verdict
}

/// `[1, 2, 3, 7, 9, 10]` as "1-3, 7, 9-10".
pub fn ranges(numbers: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = numbers.iter().copied().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last + 1)) {
            last += 1;
            iter.next();
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        settle: Duration::from_secs(2),
        margin: Duration::from_secs(1),
    };

    fn secs(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    fn steady_node(uid: &str) -> NodeState {
        Some((uid.to_string(), 0))
    }

    /// Nodes 0 and 1 steady from 0 to 100 s; node 2 restarts between 40 and 50 s.
    fn observations(base: Instant) -> Vec<Observation> {
        (0..=100)
            .step_by(10)
            .map(|s| Observation {
                at: secs(base, s),
                nodes: vec![
                    steady_node("a"),
                    steady_node("b"),
                    match s {
                        0..=40 => steady_node("c-old"),
                        50 => None,
                        _ => steady_node("c-new"),
                    },
                ],
            })
            .collect()
    }

    fn session(base: Instant, from: u64, to: u64) -> Session {
        Session {
            start: secs(base, from),
            end: secs(base, to),
            lost: false,
        }
    }

    fn publisher(base: Instant, node: usize) -> PublisherLog {
        PublisherLog {
            node,
            sessions: vec![session(base, 0, 100)],
            sent: (1..=99)
                .map(|n| Published {
                    n,
                    at: secs(base, n),
                })
                .collect(),
        }
    }

    fn subscriber(
        node: usize,
        sessions: Vec<Session>,
        heard: impl IntoIterator<Item = u64>,
    ) -> SubscriberLog {
        SubscriberLog {
            node,
            sessions,
            heard: heard
                .into_iter()
                .map(|n| Heard {
                    publisher: 0,
                    n,
                    session: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn steady_intervals_join_looks_at_the_same_agent_and_restarts_are_the_gaps() {
        let base = Instant::now();
        let steady = steady_intervals(&observations(base), 3);
        assert_eq!(steady[0], vec![(secs(base, 0), secs(base, 100))]);
        assert_eq!(
            steady[2],
            vec![
                (secs(base, 0), secs(base, 40)),
                (secs(base, 60), secs(base, 100))
            ]
        );
        assert_eq!(restarts(&steady)[2], vec![(secs(base, 40), secs(base, 60))]);
    }

    #[test]
    fn a_message_between_quiet_nodes_during_a_restart_is_owed_and_its_loss_named() {
        let base = Instant::now();
        let steady = steady_intervals(&observations(base), 3);
        let sub = subscriber(
            1,
            vec![session(base, 0, 100)],
            (1..=99).filter(|n| *n != 45 && *n != 46),
        );
        let verdict = judge(&[publisher(base, 0)], &[sub], &steady, RULES);
        assert_eq!(
            verdict.problems,
            vec!["subscriber 0 (node 1) session 0 missed publisher 0's (node 0) messages 45-46"]
        );
        // From 2 s (settled) to 99 s (delivered by 100 s); 40..=60 s while
        // node 2 restarted.
        assert_eq!(verdict.owed, 98);
        assert_eq!(verdict.checked_during_restart, vec![((2, 0, 1), 21)]);
    }

    #[test]
    fn messages_to_or_from_a_restarting_node_are_not_owed() {
        let base = Instant::now();
        let steady = steady_intervals(&observations(base), 3);
        // Owed: up to 39 s in the first session (node 2 steady until 40 s),
        // from 62 s in the second (steady again at 60 s, then settled).
        let mut sub = subscriber(
            2,
            vec![session(base, 0, 45), session(base, 55, 100)],
            (1..=99).filter(|n| !(40..=61).contains(n)),
        );
        for heard in &mut sub.heard {
            heard.session = usize::from(heard.n >= 55);
        }
        let verdict = judge(&[publisher(base, 0)], &[sub], &steady, RULES);
        assert!(verdict.problems.is_empty(), "{:?}", verdict.problems);
    }

    #[test]
    fn a_freshly_connected_subscriber_is_owed_messages_only_after_settling() {
        let base = Instant::now();
        let steady = steady_intervals(&observations(base), 3);
        let sub = subscriber(1, vec![session(base, 20, 100)], 22..=99);
        let verdict = judge(&[publisher(base, 0)], &[sub], &steady, RULES);
        assert!(verdict.problems.is_empty(), "{:?}", verdict.problems);
        let late = subscriber(1, vec![session(base, 20, 100)], 24..=99);
        let verdict = judge(&[publisher(base, 0)], &[late], &steady, RULES);
        assert_eq!(verdict.problems.len(), 1, "{:?}", verdict.problems);
        assert!(verdict.problems[0].ends_with("messages 22-23"));
    }

    #[test]
    fn duplicates_and_reordering_are_named() {
        let base = Instant::now();
        let steady = steady_intervals(&observations(base), 3);
        let mut heard: Vec<u64> = (1..=99).collect();
        heard.insert(10, 10);
        heard.swap(20, 21);
        let sub = subscriber(0, vec![session(base, 0, 100)], heard);
        let verdict = judge(&[publisher(base, 0)], &[sub], &steady, RULES);
        assert_eq!(
            verdict.problems,
            vec![
                "subscriber 0 (node 0) session 0 heard publisher 0's message 10 twice",
                "subscriber 0 (node 0) session 0 heard publisher 0's message 20 after 21",
            ]
        );
    }

    #[test]
    fn a_connection_lost_on_a_quiet_node_is_a_problem() {
        let base = Instant::now();
        let steady = steady_intervals(&observations(base), 3);
        let sub = subscriber(
            0,
            vec![Session {
                lost: true,
                ..session(base, 0, 30)
            }],
            [],
        );
        let verdict = judge(&[], &[sub], &steady, RULES);
        assert_eq!(
            verdict.problems,
            vec![
                "the subscriber at node 0 lost its connection (session 0) while its node was not restarting"
            ]
        );
    }

    #[test]
    fn ranges_join_consecutive_numbers() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(ranges(&[]), "");
    }
}
