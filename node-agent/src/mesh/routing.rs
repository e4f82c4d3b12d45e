//! The mesh's routing rule, as a pure function: the agents running one
//! service form a full mesh; a publish is sent from the agent it happened at
//! straight to each peer that has subscribers for the channel, and a message
//! that came over the mesh is delivered locally and never forwarded again.
//! One hop from the origin means no loops and no duplicates; one FIFO link
//! per (sender, receiver) keeps each publisher's order. This is how NATS
//! routes between the servers of a cluster.

use foldhash::{HashMap, HashSet};

/// The channels one peer has subscribers for, by service. Looked up by
/// borrowed names on every publish, so the lookup allocates nothing.
#[derive(Debug, Default)]
pub struct PeerInterest(HashMap<String, HashSet<String>>);

impl PeerInterest {
    pub fn contains(&self, service: &str, channel: &str) -> bool {
        self.0.get(service).is_some_and(|c| c.contains(channel))
    }

    pub fn insert(&mut self, service: String, channel: String) {
        self.0.entry(service).or_default().insert(channel);
    }

    pub fn remove(&mut self, service: &str, channel: &str) {
        if let Some(channels) = self.0.get_mut(service) {
            channels.remove(channel);
            if channels.is_empty() {
                self.0.remove(service);
            }
        }
    }

    /// The peer's whole interest in `service`, as its snapshot says.
    pub fn replace(&mut self, service: String, channels: impl IntoIterator<Item = String>) {
        let channels: HashSet<String> = channels.into_iter().collect();
        if channels.is_empty() {
            self.0.remove(&service);
        } else {
            self.0.insert(service, channels);
        }
    }
}

/// Where a publish goes, besides the local subscribers.
pub fn targets<'a>(
    origin_is_local: bool,
    service: &'a str,
    channel: &'a str,
    peers: impl IntoIterator<Item = &'a str> + 'a,
    remote_interest: &'a HashMap<String, PeerInterest>,
) -> impl Iterator<Item = &'a str> + 'a {
    peers.into_iter().filter(move |peer| {
        origin_is_local
            && remote_interest
                .get(*peer)
                .is_some_and(|i| i.contains(service, channel))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use foldhash::HashMapExt;

    use super::*;

    /// (publisher, sequence number, channel)
    type Msg = (usize, usize, &'static str);

    /// A small deterministic generator, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random topologies, subscriptions and publishes, delivered over FIFO
    /// links in a random interleaving: every subscriber at every node gets
    /// each publish exactly once, in each publisher's order.
    #[test]
    fn exactly_once_in_order_without_loops() {
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let nodes: Vec<String> = (0..2 + rng.below(5)).map(|i| format!("n{i}")).collect();
            let channels: [&'static str; 3] = ["a", "b", "c"];
            // subs[node] = channels with local subscribers there.
            let subs: Vec<BTreeSet<&str>> = nodes
                .iter()
                .map(|_| {
                    channels
                        .iter()
                        .copied()
                        .filter(|_| rng.below(2) == 0)
                        .collect()
                })
                .collect();
            let interest: HashMap<String, PeerInterest> = nodes
                .iter()
                .zip(&subs)
                .map(|(n, s)| {
                    let mut interest = PeerInterest::default();
                    interest.replace("svc".to_string(), s.iter().map(|c| c.to_string()));
                    (n.clone(), interest)
                })
                .collect();

            // links[(from, to)] carries (publisher, seq, channel).
            let mut links: HashMap<(usize, usize), VecDeque<Msg>> = HashMap::new();
            // delivered[node] = messages in delivery order.
            let mut delivered: Vec<Vec<Msg>> = vec![Vec::new(); nodes.len()];
            let mut published = Vec::new();
            let mut seq = vec![0usize; nodes.len()];
            let mut hops = 0;
            for _ in 0..60 {
                if rng.below(3) > 0 {
                    let from = rng.below(nodes.len());
                    let channel = channels[rng.below(channels.len())];
                    seq[from] += 1;
                    let msg = (from, seq[from], channel);
                    published.push(msg);
                    if subs[from].contains(channel) {
                        delivered[from].push(msg);
                    }
                    let peers: Vec<String> = nodes
                        .iter()
                        .filter(|n| **n != nodes[from])
                        .cloned()
                        .collect();
                    for to in targets(
                        true,
                        "svc",
                        channel,
                        peers.iter().map(String::as_str),
                        &interest,
                    ) {
                        let to = nodes.iter().position(|n| n == to).unwrap();
                        links.entry((from, to)).or_default().push_back(msg);
                    }
                } else {
                    // Deliver the head of a random non-empty link.
                    let busy: Vec<(usize, usize)> = links
                        .iter()
                        .filter(|(_, q)| !q.is_empty())
                        .map(|(k, _)| *k)
                        .collect();
                    if busy.is_empty() {
                        continue;
                    }
                    let (from, to) = busy[rng.below(busy.len())];
                    let msg = links.get_mut(&(from, to)).unwrap().pop_front().unwrap();
                    hops += 1;
                    if subs[to].contains(msg.2) {
                        delivered[to].push(msg);
                    }
                    // A message from the mesh is never forwarded.
                    let peers: Vec<String> =
                        nodes.iter().filter(|n| **n != nodes[to]).cloned().collect();
                    assert!(
                        targets(
                            false,
                            "svc",
                            msg.2,
                            peers.iter().map(String::as_str),
                            &interest
                        )
                        .next()
                        .is_none()
                    );
                }
            }
            // Drain the links.
            for ((_, to), queue) in links.iter_mut() {
                while let Some(msg) = queue.pop_front() {
                    hops += 1;
                    if subs[*to].contains(msg.2) {
                        delivered[*to].push(msg);
                    }
                }
            }
            for (node, got) in delivered.iter().enumerate() {
                let want: Vec<_> = published
                    .iter()
                    .copied()
                    .filter(|m| subs[node].contains(m.2))
                    .collect();
                let mut sorted = got.clone();
                sorted.sort();
                let mut want_sorted = want.clone();
                want_sorted.sort();
                assert_eq!(
                    sorted, want_sorted,
                    "seed {seed}: node {node} got a message twice or missed one"
                );
                for publisher in 0..nodes.len() {
                    let order: Vec<usize> = got
                        .iter()
                        .filter(|m| m.0 == publisher)
                        .map(|m| m.1)
                        .collect();
                    assert!(
                        order.windows(2).all(|w| w[0] < w[1]),
                        "seed {seed}: order broken at node {node}"
                    );
                }
            }
            let needed: usize = published
                .iter()
                .map(|m| {
                    (0..nodes.len())
                        .filter(|n| *n != m.0 && subs[*n].contains(m.2))
                        .count()
                })
                .sum();
            assert_eq!(
                hops, needed,
                "seed {seed}: interest routing sends only where subscribers are"
            );
        }
    }

    #[test]
    fn peer_interest_follows_subscribes_unsubscribes_and_snapshots() {
        let mut interest = PeerInterest::default();
        interest.insert("svc".into(), "a".into());
        interest.insert("svc".into(), "b".into());
        interest.insert("other".into(), "a".into());
        assert!(interest.contains("svc", "a") && interest.contains("other", "a"));
        interest.remove("svc", "a");
        assert!(!interest.contains("svc", "a") && interest.contains("svc", "b"));
        interest.replace("svc".into(), ["c".to_string()]);
        assert!(!interest.contains("svc", "b") && interest.contains("svc", "c"));
        assert!(
            interest.contains("other", "a"),
            "a snapshot replaces one service only"
        );
        interest.replace("svc".into(), []);
        assert!(!interest.contains("svc", "c"));
        interest.remove("nothing", "here");
    }
}
