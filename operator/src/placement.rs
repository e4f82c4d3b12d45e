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
//!    first; ties go by name, so the result is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use edgewire_api::crd::EdgeServiceSpec;

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub address: Option<String>,
    pub freshness: Freshness,
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
    /// Eligible nodes left out because an older EdgeService holds the port
    /// there: node -> that EdgeService.
    pub conflicts: BTreeMap<String, String>,
}

pub fn matches_selector(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Decides where `spec` runs. `previous` is the current placement;
/// `claims` are the ports that older EdgeServices hold on nodes.
pub fn place(
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
    fresh_new.sort_by(|a, b| a.name.cmp(&b.name));

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

    // Fill up: each new node from the least used domain.
    let mut chosen = kept;
    while chosen.len() < max && !fresh_new.is_empty() {
        let counts = domain_counts(&chosen, domain);
        let pick = fresh_new
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| {
                (
                    counts.get(&domain(c)).copied().unwrap_or(0),
                    domain(c),
                    c.name.clone(),
                )
            })
            .map(|(i, _)| i);
        match pick {
            Some(i) => chosen.push(fresh_new.remove(i)),
            None => break,
        }
    }

    let mut nodes: Vec<String> = chosen.into_iter().map(|c| c.name.clone()).collect();
    nodes.sort();
    // A conflict only matters where this service would otherwise have gone.
    Decision { nodes, conflicts }
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
        }
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
        let d = place(&spec(&[EDGE], Some(3), Some(z)), &nodes, &[], &[]);
        assert_eq!(d.nodes, ["a1", "b1", "c1"]);
        let d = place(&spec(&[EDGE], Some(4), Some(z)), &nodes, &[], &[]);
        assert_eq!(d.nodes, ["a1", "a2", "b1", "c1"]);
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
}
