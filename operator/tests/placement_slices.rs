//! An EdgeService's placement in PlacementSlices, against the real API
//! server: bounded slices owned by the service, a change on one node
//! rewriting one slice, and the status short list.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use edgewire_api::crd::{EdgeService, PlacementSlice};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use support::*;

/// Nodes per slice for the operator in this test: small, so a handful of
/// nodes shows what thousands would.
const SLICE_SIZE: usize = 2;

/// The service's slices (name to nodes), and the uid of each slice's
/// controller.
async fn slices(env: &Env, es: &str) -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let list = Api::<PlacementSlice>::namespaced(env.client.clone(), env.name())
        .list(&ListParams::default().labels(&format!("edgewire.dev/edgeservice={es}")))
        .await
        .unwrap();
    let owners = list
        .items
        .iter()
        .flat_map(|s| s.owner_references().iter())
        .filter(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
        .collect();
    let by_name = list
        .items
        .iter()
        .map(|s| {
            let nodes: Vec<String> = s.spec.nodes.iter().map(|p| p.node.clone()).collect();
            let set: BTreeSet<String> = nodes.iter().cloned().collect();
            assert_eq!(set.len(), nodes.len(), "a node twice in {}", s.name_any());
            assert_eq!(s.spec.service, es);
            (s.name_any(), set)
        })
        .collect();
    (by_name, owners)
}

/// Waits until the slices of `es` hold exactly `want`, each node once and
/// no slice over the size; returns them.
async fn wait_slices(
    env: &Env,
    es: &str,
    want: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (by_name, _) = slices(env, es).await;
        let listed: Vec<&String> = by_name.values().flatten().collect();
        let union: BTreeSet<String> = listed.iter().map(|n| (*n).clone()).collect();
        if &union == want && listed.len() == want.len() {
            assert!(
                by_name.values().all(|n| n.len() <= SLICE_SIZE),
                "a slice over {SLICE_SIZE} nodes: {by_name:?}"
            );
            return by_name;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slices of {es}: {by_name:?}, wanted the nodes {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_placement_is_written_in_bounded_slices_that_change_where_a_node_changes() {
    let env = Env::new("pslice").await;
    let names = ["a", "b", "c", "d", "e"];
    let mut nodes = env.nodes(&names, &[(EDGE_LABEL, "true")]).await;
    let spare = env.nodes(&["f"], &[]).await;
    nodes.extend(spare.iter().cloned());
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let size = SLICE_SIZE.to_string();
    let operator =
        Operator::start_with_args(&env, "op-1", &["--placement-slice-size", size.as_str()]);
    env.apply_es(&format!(
        "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata:\n  name: wide\nspec:\n  nodeSelector: {{{EDGE_LABEL}: \"true\"}}\n  port: 18300\n  handlers:\n    - {{name: echo, kind: echo, path: /}}\n"
    ))
    .await;
    let es: EdgeService = env
        .wait_es("wide", "ready on five nodes", |es| {
            es.status.as_ref().is_some_and(|s| s.ready_nodes == 5)
        })
        .await;
    let five: BTreeSet<String> = nodes[..5].iter().cloned().collect();
    let before = wait_slices(&env, "wide", &five).await;
    assert_eq!(before.len(), 3, "five nodes in slices of two: {before:?}");
    let (_, owners) = slices(&env, "wide").await;
    assert!(
        owners.len() == 3 && owners.iter().all(|u| Some(u) == es.uid().as_ref()),
        "every slice is controlled by its EdgeService: {owners:?}"
    );
    assert_eq!(
        placed(&es),
        five.iter().cloned().collect::<Vec<_>>(),
        "a small placement is listed whole in the status"
    );

    // One node leaves: the other slices keep their nodes (a node's state
    // changing rewrites its own slice only, and heartbeats on this busy
    // machine may do that, so it is the membership that is compared).
    let leaving = &nodes[2];
    env.set_node_label(leaving, EDGE_LABEL, None).await;
    let four: BTreeSet<String> = five.iter().filter(|n| *n != leaving).cloned().collect();
    let after = wait_slices(&env, "wide", &four).await;
    for (name, members) in &before {
        let now = after.get(name).cloned().unwrap_or_default();
        let kept: BTreeSet<String> = members.iter().filter(|n| *n != leaving).cloned().collect();
        assert_eq!(
            now, kept,
            "slice {name} keeps its nodes but {leaving}: before {before:?}, after {after:?}"
        );
    }

    // A new node takes the free room; no slice is added.
    env.set_node_label(&spare[0], EDGE_LABEL, Some("true"))
        .await;
    let mut grown = four.clone();
    grown.insert(spare[0].clone());
    let last = wait_slices(&env, "wide", &grown).await;
    assert_eq!(
        last.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the new node fills the room the leaving one made"
    );
    env.wait_es("wide", "ready on five nodes again", |es| {
        es.status.as_ref().is_some_and(|s| s.ready_nodes == 5)
    })
    .await;
    drop(operator);
    env.cleanup_nodes(&nodes).await;
}
