//! Placement: which nodes an EdgeService runs on. A pure function of the spec,
//! the candidate nodes, the previous placement and the other services' ports.
//!
//! Rules, in order:
//! 1. A node is eligible when its labels match `nodeSelector`, its agent's
//!    heartbeat is fresh, and (with `spreadBy`) it carries the spread label.
//! 2. No two EdgeServices share a port on a node: a node where an older
//!    EdgeService already listens on the same port is a conflict, not a place.
//! 3. Stability: nodes already placed stay placed while they match; a node
//!    whose heartbeat went stale stays (marked stale, out of the endpoints)
//!    until it has been silent for the eviction time, so a brief outage does
//!    not move clients around.
//! 4. `maxNodes` caps the count; new nodes fill the least-used spread domain
//!    first and, within a domain, the node fewest other services run on;
//!    ties go by a hash of the service and the node, so that services which
//!    decide at the same moment (and see the same counts) still spread over
//!    a domain's nodes instead of all taking its first by name. The result
//!    is deterministic for its inputs.

use std::collections::{BTreeMap, BTreeSet};

use edgewire_api::crd::EdgeServiceSpec;

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
    pub freshness: Freshness,
    /// How many other EdgeServices are placed on this node.
    pub load: usize,
}

/// How recent the node's agent heartbeat is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Stale, but not yet for the eviction time.
    Stale,
    /// Stale for longer than the eviction time, or never reported.
    Gone,
}

/// Another EdgeService's claim on a port of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortClaim {
    /// `namespace/name` of the other EdgeService.
    pub owner: String,
    pub node: String,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The chosen nodes, sorted by name.
    pub nodes: Vec<String>,
    /// Nodes this service would have used but for an older EdgeService
    /// holding the port there: node -> that EdgeService. Empty when the
    /// claims cost it nothing (it has as many nodes as without them).
    pub conflicts: BTreeMap<String, String>,
}

pub fn matches_selector(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Decides where `spec` runs. `service` names it (`namespace/name`) for the
/// tie-break between equally loaded nodes; `previous` is the current
/// placement; `claims` are the ports that older EdgeServices hold on nodes.
pub fn place(
    service: &str,
    spec: &EdgeServiceSpec,
    candidates: &[Candidate],
    previous: &[String],
    claims: &[PortClaim],
) -> Decision {
    let spread = spec.placement.spread_by.as_deref();
    let mut conflicts = BTreeMap::new();
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| matches_selector(&spec.node_selector, &c.labels))
        .filter(|c| spread.is_none_or(|key| c.labels.contains_key(key)))
        .filter(|c| {
            match claims
                .iter()
                .find(|claim| claim.node == c.name && claim.port == spec.port)
            {
                Some(claim) => {
                    if c.freshness == Freshness::Fresh {
                        conflicts.insert(c.name.clone(), claim.owner.clone());
                    }
                    false
                }
                None => true,
            }
        })
        .collect();

    let previous_list = previous;
    let previous: BTreeSet<&str> = previous.iter().map(String::as_str).collect();
    // Kept: previously placed nodes that still match and have not been gone
    // for the eviction time.
    let mut kept: Vec<&Candidate> = usable
        .iter()
        .copied()
        .filter(|c| previous.contains(c.name.as_str()) && c.freshness != Freshness::Gone)
        .collect();
    let mut fresh_new: Vec<&Candidate> = usable
        .iter()
        .copied()
        .filter(|c| !previous.contains(c.name.as_str()) && c.freshness == Freshness::Fresh)
        .collect();
    kept.sort_by(|a, b| a.name.cmp(&b.name));
    fresh_new.sort_by_cached_key(|c| (c.load, tie_break(service, &c.name), c.name.clone()));

    let max = spec
        .placement
        .max_nodes
        .map_or(usize::MAX, |m| usize::try_from(m.max(0)).unwrap_or(0));
    let domain = |c: &Candidate| {
        spread
            .and_then(|key| c.labels.get(key).cloned())
            .unwrap_or_default()
    };

    // Scale down: drop from the most crowded domain, stale nodes first, then
    // the last by name.
    while kept.len() > max {
        let counts = domain_counts(&kept, domain);
        let crowded = counts.values().copied().max().unwrap_or(0);
        let victim = kept
            .iter()
            .enumerate()
            .filter(|(_, c)| counts.get(&domain(c)).copied() == Some(crowded))
            .max_by_key(|(_, c)| (c.freshness != Freshness::Fresh, c.name.clone()))
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                kept.remove(i);
            }
            None => break,
        }
    }

    // Fill up: each new node from the least used domain (ties: the domain by
    // name), and within it in the order above. A heap of domains keeps this
    // O(n log d).
    let mut chosen = kept;
    let mut counts = domain_counts(&chosen, domain);
    let mut waiting: BTreeMap<String, std::collections::VecDeque<&Candidate>> = BTreeMap::new();
    for c in fresh_new {
        waiting.entry(domain(c)).or_default().push_back(c);
    }
    let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(usize, String)>> = waiting
        .keys()
        .map(|d| std::cmp::Reverse((counts.get(d).copied().unwrap_or(0), d.clone())))
        .collect();
    while chosen.len() < max {
        let Some(std::cmp::Reverse((count, d))) = heap.pop() else {
            break;
        };
        let Some(next) = waiting.get_mut(&d).and_then(|q| q.pop_front()) else {
            continue;
        };
        chosen.push(next);
        counts.insert(d.clone(), count + 1);
        if waiting.get(&d).is_some_and(|q| !q.is_empty()) {
            heap.push(std::cmp::Reverse((count + 1, d)));
        }
    }

    let mut nodes: Vec<String> = chosen.into_iter().map(|c| c.name.clone()).collect();
    nodes.sort();
    // A conflict only matters where it kept this service off a node it
    // would otherwise have used: with no claims at all, it would have had
    // more nodes.
    if !conflicts.is_empty() {
        let unclaimed = place(service, spec, candidates, previous_list, &[]);
        if unclaimed.nodes.len() > nodes.len() {
            conflicts.retain(|node, _| unclaimed.nodes.contains(node) && !nodes.contains(node));
        } else {
            conflicts.clear();
        }
    }
    Decision { nodes, conflicts }
}

/// FNV-1a of the service and the node, then MurmurHash3's finaliser (FNV
/// alone orders names that differ in their last characters together): a
/// fixed function, so the order it gives does not change with the
/// toolchain.
fn tie_break(service: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in service.bytes().chain([0xff]).chain(node.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

fn domain_counts(
    nodes: &[&Candidate],
    domain: impl Fn(&Candidate) -> String,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in nodes {
        *counts.entry(domain(c)).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use edgewire_api::crd::Placement;

    use super::*;

    fn spec(selector: &[(&str, &str)], max: Option<i32>, spread: Option<&str>) -> EdgeServiceSpec {
        EdgeServiceSpec {
            node_selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            placement: Placement {
                max_nodes: max,
                spread_by: spread.map(str::to_string),
            },
            port: 8765,
            handlers: vec![],
            channels: vec![],
            relay_path: "/relay".into(),
            limits: Default::default(),
            expose: Default::default(),
            auth: None,
            tls: None,
            hub: None,
        }
    }

    fn node(name: &str, labels: &[(&str, &str)], freshness: Freshness) -> Candidate {
        Candidate {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            address: Some(format!("10.0.0.{}", name.len())),
            freshness,
            load: 0,
        }
    }

    /// One service's decisions; the tie-break is the only use of its name.
    fn place(
        spec: &EdgeServiceSpec,
        candidates: &[Candidate],
        previous: &[String],
        claims: &[PortClaim],
    ) -> Decision {
        super::place("ns/svc", spec, candidates, previous, claims)
    }

    const EDGE: (&str, &str) = ("edge", "true");

    #[test]
    fn places_on_fresh_matching_nodes_only() {
        let nodes = [
            node("a", &[EDGE], Freshness::Fresh),
            node("b", &[], Freshness::Fresh),
            node("c", &[EDGE], Freshness::Stale),
            node("d", &[EDGE], Freshness::Gone),
            node("e", &[EDGE], Freshness::Fresh),
        ];
        let d = place(&spec(&[EDGE], None, None), &nodes, &[], &[]);
        assert_eq!(d.nodes, ["a", "e"]);
    }

    #[test]
    fn a_new_node_does_not_reshuffle_the_placed_ones() {
        let s = spec(&[EDGE], Some(2), None);
        let mut nodes = vec![
            node("m", &[EDGE], Freshness::Fresh),
            node("n", &[EDGE], Freshness::Fresh),
        ];
        let first = place(&s, &nodes, &[], &[]);
        assert_eq!(first.nodes, ["m", "n"]);
        nodes.push(node("a", &[EDGE], Freshness::Fresh));
        let second = place(&s, &nodes, &first.nodes, &[]);
        assert_eq!(
            second.nodes,
            ["m", "n"],
            "'a' sorts first but the placement holds"
        );
    }

    #[test]
    fn max_nodes_scales_down_deterministically() {
        let nodes: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .map(|n| node(n, &[EDGE], Freshness::Fresh))
            .collect();
        let all = place(&spec(&[EDGE], None, None), &nodes, &[], &[]);
        let two = place(&spec(&[EDGE], Some(2), None), &nodes, &all.nodes, &[]);
        assert_eq!(two.nodes, ["a", "b"]);
        let one = place(&spec(&[EDGE], Some(1), None), &nodes, &two.nodes, &[]);
        assert_eq!(one.nodes, ["a"]);
    }

    #[test]
    fn spread_balances_domains() {
        let z = "zone";
        let nodes = [
            node("a1", &[EDGE, (z, "a")], Freshness::Fresh),
            node("a2", &[EDGE, (z, "a")], Freshness::Fresh),
            node("a3", &[EDGE, (z, "a")], Freshness::Fresh),
            node("b1", &[EDGE, (z, "b")], Freshness::Fresh),
            node("c1", &[EDGE, (z, "c")], Freshness::Fresh),
            node("nolabel", &[EDGE], Freshness::Fresh),
        ];
        let zones = |d: &Decision| {
            d.nodes
                .iter()
                .map(|n| n[..1].to_string())
                .collect::<Vec<_>>()
        };
        let d = place(&spec(&[EDGE], Some(3), Some(z)), &nodes, &[], &[]);
        assert_eq!(zones(&d), ["a", "b", "c"]);
        let d = place(&spec(&[EDGE], Some(4), Some(z)), &nodes, &[], &[]);
        assert_eq!(zones(&d), ["a", "a", "b", "c"]);
        // Scaling down from a crowded domain first.
        let d = place(
            &spec(&[EDGE], Some(3), Some(z)),
            &nodes,
            &["a1".into(), "a2".into(), "a3".into(), "b1".into()],
            &[],
        );
        assert_eq!(d.nodes, ["a1", "a2", "b1"]);
    }

    #[test]
    fn relabelled_node_leaves_the_placement() {
        let nodes = [
            node("a", &[EDGE], Freshness::Fresh),
            node("b", &[], Freshness::Fresh),
        ];
        let d = place(
            &spec(&[EDGE], None, None),
            &nodes,
            &["a".into(), "b".into()],
            &[],
        );
        assert_eq!(d.nodes, ["a"]);
    }

    #[test]
    fn stale_nodes_stay_until_gone() {
        let s = spec(&[EDGE], Some(1), None);
        let stale = [
            node("a", &[EDGE], Freshness::Stale),
            node("b", &[EDGE], Freshness::Fresh),
        ];
        assert_eq!(place(&s, &stale, &["a".into()], &[]).nodes, ["a"]);
        let gone = [
            node("a", &[EDGE], Freshness::Gone),
            node("b", &[EDGE], Freshness::Fresh),
        ];
        assert_eq!(place(&s, &gone, &["a".into()], &[]).nodes, ["b"]);
    }

    #[test]
    fn port_claims_are_conflicts_not_places() {
        let nodes = [
            node("a", &[EDGE], Freshness::Fresh),
            node("b", &[EDGE], Freshness::Fresh),
        ];
        let claims = [
            PortClaim {
                owner: "ns/older".into(),
                node: "a".into(),
                port: 8765,
            },
            PortClaim {
                owner: "ns/other-port".into(),
                node: "b".into(),
                port: 9000,
            },
        ];
        let d = place(&spec(&[EDGE], None, None), &nodes, &["a".into()], &claims);
        assert_eq!(d.nodes, ["b"]);
        assert_eq!(
            d.conflicts,
            BTreeMap::from([("a".to_string(), "ns/older".to_string())])
        );
    }

    #[test]
    fn a_claim_is_a_conflict_only_where_it_cost_a_node() {
        let nodes = [
            node("a", &[EDGE], Freshness::Fresh),
            node("b", &[EDGE], Freshness::Fresh),
            node("c", &[EDGE], Freshness::Fresh),
        ];
        let claim = |n: &str| PortClaim {
            owner: "ns/older".into(),
            node: n.into(),
            port: 8765,
        };
        // One node wanted, two free: the claim on "a" costs nothing.
        let d = place(&spec(&[EDGE], Some(1), None), &nodes, &[], &[claim("a")]);
        assert!(d.nodes == ["b"] || d.nodes == ["c"], "{:?}", d.nodes);
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
        // Three wanted: the claims on "a" and "b" each cost one.
        let d = place(
            &spec(&[EDGE], Some(3), None),
            &nodes,
            &[],
            &[claim("a"), claim("b")],
        );
        assert_eq!(d.nodes, ["c"]);
        assert_eq!(d.conflicts.keys().collect::<Vec<_>>(), ["a", "b"]);
        // Two wanted, "a" claimed: "b" and "c" serve; nothing lost.
        let d = place(&spec(&[EDGE], Some(2), None), &nodes, &[], &[claim("a")]);
        assert_eq!(d.nodes, ["b", "c"]);
        assert!(d.conflicts.is_empty());
    }

    #[test]
    fn filling_thousands_of_nodes_across_domains_is_balanced_and_ordered() {
        let z = "zone";
        let zones = ["a", "b", "c", "d"];
        let nodes: Vec<Candidate> = (0..10_000)
            .map(|i| {
                node(
                    &format!("n{i:05}"),
                    &[EDGE, (z, zones[i % zones.len()])],
                    Freshness::Fresh,
                )
            })
            .collect();
        let six = spec(&[EDGE], Some(6), Some(z));
        let d = place(&six, &nodes, &[], &[]);
        // Round robin over the zones: two from two of them, one from the
        // others; the same inputs, the same nodes; another service, others.
        let mut per_zone: BTreeMap<usize, usize> = BTreeMap::new();
        for n in &d.nodes {
            let i: usize = n[1..].parse().expect("a node index");
            *per_zone.entry(i % zones.len()).or_default() += 1;
        }
        assert_eq!(per_zone.values().copied().collect::<Vec<_>>(), [2, 2, 1, 1]);
        assert_eq!(place(&six, &nodes, &[], &[]), d);
        let other = super::place("ns/other", &six, &nodes, &[], &[]);
        assert!(other.nodes.iter().all(|n| !d.nodes.contains(n)));
        let all = place(&spec(&[EDGE], None, Some(z)), &nodes, &[], &[]);
        assert_eq!(all.nodes.len(), 10_000);
    }

    #[test]
    fn the_nodes_fewest_services_run_on_fill_first() {
        let mut nodes: Vec<Candidate> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| node(n, &[EDGE], Freshness::Fresh))
            .collect();
        for (n, load) in nodes.iter_mut().zip([3, 0, 2, 1]) {
            n.load = load;
        }
        let d = place(&spec(&[EDGE], Some(2), None), &nodes, &[], &[]);
        assert_eq!(d.nodes, ["b", "d"]);
        // A placed node stays, however loaded.
        let d = place(&spec(&[EDGE], Some(2), None), &nodes, &["a".into()], &[]);
        assert_eq!(d.nodes, ["a", "b"]);
    }

    #[test]
    fn services_deciding_together_spread_over_a_sites_nodes() {
        // Ten services of one site, each on three of its twenty nodes over
        // five zones, all deciding before any sees another's placement.
        let z = "zone";
        let zones = ["a", "b", "c", "d", "e"];
        let nodes: Vec<Candidate> = (0..20)
            .map(|i| {
                node(
                    &format!("n{i:02}"),
                    &[EDGE, (z, zones[i % zones.len()])],
                    Freshness::Fresh,
                )
            })
            .collect();
        let s = spec(&[EDGE], Some(3), Some(z));
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for j in 0..10 {
            for n in super::place(&format!("ns/svc-{j}"), &s, &nodes, &[], &[]).nodes {
                *per_node.entry(n).or_default() += 1;
            }
        }
        // By name alone all ten would share three nodes.
        assert!(per_node.len() >= 12, "{per_node:?}");
        assert!(per_node.values().all(|&n| n <= 4), "{per_node:?}");
    }
}
