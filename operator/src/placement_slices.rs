//! How an EdgeService's placement is written: PlacementSlices of at most
//! `max` nodes each, owned by the service, and a short list in its status.
//!
//! The whole placement in the status would grow toward etcd's object size
//! limit for a service on ten thousand nodes, and every change on one node
//! would rewrite it all. Slices bound both, the way EndpointSlices split a
//! Service's endpoints. As the EndpointSlice controller does, a node stays
//! in the slice it is in: a change rewrites the slices it touches only.
//!
//! All pure: which node goes into which slice, the slice objects, and the
//! status summary.

use std::collections::{BTreeMap, BTreeSet};

use edgewire_api::crd::{
    EdgeService, NodePlacement, PlacementSlice, PlacementSliceSpec, PlacementState,
};

use crate::desired::{self, DesiredError};

/// Nodes per slice by default: a few hundred bytes each, so a slice stays
/// near 100 KiB, far below etcd's limit, and a watch event stays small.
pub const DEFAULT_NODES_PER_SLICE: usize = 500;
/// The nodes listed in `status.placement` at most.
pub const STATUS_NODES: usize = 100;

/// Which nodes go into which slice. `existing` is what the service's slices
/// hold now (slice name to node names); `nodes` are the nodes it is placed
/// on. A node already in a slice stays there; new nodes fill the slices
/// with room, in name order, then new slices named `<service>-<n>` with the
/// smallest free `n`. Slices left empty are not returned (they go).
pub fn fill(
    service: &str,
    existing: &BTreeMap<String, BTreeSet<String>>,
    nodes: &BTreeSet<&str>,
    max: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    let max = max.max(1);
    let mut slices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    for (name, members) in existing {
        let kept: Vec<&str> = members
            .iter()
            .filter_map(|n| nodes.get(n.as_str()).copied())
            .filter(|n| !placed.contains(n))
            .take(max)
            .collect();
        placed.extend(kept.iter().copied());
        slices.insert(name.clone(), kept.into_iter().map(str::to_string).collect());
    }
    let mut new_nodes = nodes.iter().filter(|n| !placed.contains(*n)).peekable();
    for members in slices.values_mut() {
        while members.len() < max {
            match new_nodes.next() {
                Some(n) => {
                    members.insert((*n).to_string());
                }
                None => break,
            }
        }
    }
    let mut n = 0usize;
    while new_nodes.peek().is_some() {
        let name = loop {
            let candidate = format!("{service}-{n}");
            n += 1;
            if !slices.contains_key(&candidate) {
                break candidate;
            }
        };
        let members: BTreeSet<String> = new_nodes
            .by_ref()
            .take(max)
            .map(|n| (*n).to_string())
            .collect();
        slices.insert(name, members);
    }
    slices.retain(|_, members| !members.is_empty());
    slices
}

/// The PlacementSlices for `placement`, filled as `fill` says.
pub fn desired(
    es: &EdgeService,
    placement: &[NodePlacement],
    existing: &BTreeMap<String, BTreeSet<String>>,
    max: usize,
) -> Result<Vec<PlacementSlice>, DesiredError> {
    let name = es
        .metadata
        .name
        .clone()
        .ok_or(DesiredError::Missing("name"))?;
    let by_node: BTreeMap<&str, &NodePlacement> =
        placement.iter().map(|p| (p.node.as_str(), p)).collect();
    let nodes: BTreeSet<&str> = by_node.keys().copied().collect();
    fill(&name, existing, &nodes, max)
        .into_iter()
        .map(|(slice, members)| {
            let mut slice = PlacementSlice::new(
                &slice,
                PlacementSliceSpec {
                    service: name.clone(),
                    nodes: members
                        .iter()
                        .filter_map(|n| by_node.get(n.as_str()).map(|p| (*p).clone()))
                        .collect(),
                },
            );
            slice.metadata =
                desired::meta(es, slice.metadata.name.clone().unwrap_or_default(), &[])?;
            Ok(slice)
        })
        .collect()
}

/// Whether a slice as stored already says what `want` says (labels, owner
/// and nodes), so it need not be written.
pub fn matches(have: &PlacementSlice, want: &PlacementSlice) -> bool {
    desired::owned_by(&have.metadata, &want.metadata) && have.spec == want.spec
}

/// The short list for `status.placement`: every node while there are at
/// most `limit`, else those not Ready first (what a reader looks for), then
/// Ready ones, `limit` in all, by node name within each group.
pub fn status_summary(placement: &[NodePlacement], limit: usize) -> Vec<NodePlacement> {
    if placement.len() <= limit {
        return placement.to_vec();
    }
    let mut list: Vec<&NodePlacement> = placement.iter().collect();
    list.sort_by(|a, b| {
        (a.state == PlacementState::Ready, &a.node)
            .cmp(&(b.state == PlacementState::Ready, &b.node))
    });
    let mut summary: Vec<NodePlacement> = list.into_iter().take(limit).cloned().collect();
    summary.sort_by(|a, b| a.node.cmp(&b.node));
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::placed;

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    fn nodes(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("node-{i:05}")).collect()
    }

    #[test]
    fn new_nodes_fill_slices_of_at_most_max() {
        let all = nodes(1_234);
        let wanted: BTreeSet<&str> = all.iter().map(String::as_str).collect();
        let slices = fill("web", &BTreeMap::new(), &wanted, 500);
        let sizes: Vec<usize> = slices.values().map(BTreeSet::len).collect();
        assert_eq!(sizes, vec![500, 500, 234]);
        assert_eq!(
            slices.keys().cloned().collect::<Vec<_>>(),
            vec!["web-0", "web-1", "web-2"]
        );
        let union: BTreeSet<&str> = slices.values().flatten().map(String::as_str).collect();
        assert_eq!(union, wanted);
    }

    #[test]
    fn a_change_on_one_node_touches_one_slice() {
        let all = nodes(1_000);
        let wanted: BTreeSet<&str> = all.iter().map(String::as_str).collect();
        let before = fill("web", &BTreeMap::new(), &wanted, 100);
        // One node leaves, another arrives.
        let mut next = wanted.clone();
        next.remove("node-00042");
        next.insert("node-99999");
        let after = fill("web", &before, &next, 100);
        let changed: Vec<&String> = after
            .iter()
            .filter(|(name, members)| before.get(*name) != Some(*members))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(changed, vec!["web-0"], "the freed room takes the new node");
        assert!(after["web-0"].contains("node-99999"));
        assert_eq!(after.len(), before.len());
    }

    #[test]
    fn emptied_slices_go_and_their_names_are_reused() {
        let existing = BTreeMap::from([
            ("web-0".to_string(), set(&["a", "b"])),
            ("web-1".to_string(), set(&["c", "d"])),
        ]);
        let wanted: BTreeSet<&str> = ["a", "b"].into_iter().collect();
        let after = fill("web", &existing, &wanted, 2);
        assert_eq!(after.keys().cloned().collect::<Vec<_>>(), vec!["web-0"]);
        let wanted: BTreeSet<&str> = ["a", "b", "e", "f", "g"].into_iter().collect();
        let after = fill("web", &after, &wanted, 2);
        assert_eq!(after["web-0"], set(&["a", "b"]));
        assert_eq!(after["web-1"], set(&["e", "f"]));
        assert_eq!(after["web-2"], set(&["g"]));
    }

    #[test]
    fn a_node_listed_twice_or_an_oversized_slice_is_mended() {
        // Written by hand or by an older operator: never trusted blindly.
        let existing = BTreeMap::from([
            ("web-0".to_string(), set(&["a", "b", "c"])),
            ("web-1".to_string(), set(&["a"])),
        ]);
        let wanted: BTreeSet<&str> = ["a", "b", "c"].into_iter().collect();
        let after = fill("web", &existing, &wanted, 2);
        let listed: Vec<&String> = after.values().flatten().collect();
        assert_eq!(listed.len(), 3, "each node once: {after:?}");
        assert!(after.values().all(|m| m.len() <= 2));
    }

    #[test]
    fn no_placement_means_no_slices() {
        let existing = BTreeMap::from([("web-0".to_string(), set(&["a"]))]);
        assert!(fill("web", &existing, &BTreeSet::new(), 500).is_empty());
    }

    #[test]
    fn the_status_lists_all_of_a_small_placement() {
        let p = vec![
            placed("a", PlacementState::Ready),
            placed("b", PlacementState::Stale),
        ];
        assert_eq!(status_summary(&p, 100), p);
    }

    #[test]
    fn the_status_of_a_large_placement_lists_the_nodes_not_ready_first() {
        let mut p: Vec<NodePlacement> = nodes(10_000)
            .iter()
            .map(|n| placed(n, PlacementState::Ready))
            .collect();
        p[7_777].state = PlacementState::Failed;
        p[9_999].state = PlacementState::Stale;
        let summary = status_summary(&p, 100);
        assert_eq!(summary.len(), 100);
        assert!(summary.iter().any(|s| s.node == "node-07777"));
        assert!(summary.iter().any(|s| s.node == "node-09999"));
        assert!(summary.windows(2).all(|w| w[0].node < w[1].node));
    }

    #[test]
    fn every_slice_of_a_ten_thousand_node_service_stays_small() {
        use edgewire_api::crd::EdgeServiceSpec;
        let mut es = EdgeService::new(
            "web",
            serde_json::from_value::<EdgeServiceSpec>(serde_json::json!({"port": 8080}))
                .expect("a minimal spec"),
        );
        es.metadata.namespace = Some("default".into());
        es.metadata.uid = Some("uid-1".into());
        let placement: Vec<NodePlacement> = nodes(10_000)
            .iter()
            .map(|n| NodePlacement {
                node: n.clone(),
                address: Some("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".into()),
                state: PlacementState::Ready,
                message: Some("a message of some length for the worst case".into()),
                mesh_public_key: Some("ab".repeat(32)),
            })
            .collect();
        let slices =
            desired(&es, &placement, &BTreeMap::new(), DEFAULT_NODES_PER_SLICE).expect("slices");
        assert_eq!(slices.len(), 20);
        for slice in &slices {
            let bytes = serde_json::to_vec(slice).expect("serialises").len();
            assert!(bytes < 256 * 1024, "{bytes} bytes");
        }
        let summary = serde_json::to_vec(&status_summary(&placement, STATUS_NODES))
            .expect("serialises")
            .len();
        assert!(summary < 64 * 1024, "{summary} bytes");
    }
}
