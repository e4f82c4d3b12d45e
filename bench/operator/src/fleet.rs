//! The simulated fleet as pure functions: which node is in which site and
//! zone, the EdgeServices placed over them, the Deployments of the stock
//! path, and the relabel burst.

use std::collections::BTreeMap;

use edgewire_api::crd::EdgeService;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;

pub const EDGE_LABEL: &str = "edgewire.dev/edge";
pub const SITE_LABEL: &str = "edgewire.dev/site";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub nodes: usize,
    pub services: usize,
    pub sites: usize,
    pub zones: usize,
    pub max_nodes: usize,
}

pub fn node_name(i: usize) -> String {
    format!("edge-{i:05}")
}

pub fn site(i: usize) -> String {
    format!("site-{i:03}")
}

/// Node `i` is in site `i % sites`; within a site, nodes take turns over the
/// zones, so every site spans every zone.
pub fn node_labels(shape: &Shape, i: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        (EDGE_LABEL.to_string(), "true".to_string()),
        (SITE_LABEL.to_string(), site(i % shape.sites)),
        (
            ZONE_LABEL.to_string(),
            format!("zone-{}", (i / shape.sites) % shape.zones),
        ),
    ])
}

/// Each node's advertised address, in 198.18.0.0/15 (the range set aside
/// for benchmarks): written into EndpointSlices, never contacted.
pub fn node_address(i: usize) -> String {
    format!("198.18.{}.{}", i / 250, 1 + i % 250)
}

/// EdgeService `j`: the nodes of site `j % sites`, at most `max_nodes` of
/// them spread over zones, on a port of its own.
pub fn edge_service(shape: &Shape, j: usize) -> anyhow::Result<EdgeService> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "edgewire.dev/v1alpha1",
        "kind": "EdgeService",
        "metadata": {"name": format!("svc-{j:04}")},
        "spec": {
            "nodeSelector": {SITE_LABEL: site(j % shape.sites)},
            "placement": {"maxNodes": shape.max_nodes, "spreadBy": ZONE_LABEL},
            "port": 20000 + j,
            "handlers": [{"name": "echo", "kind": "echo", "path": "/"}],
        },
    }))?)
}

/// The stock path for the same intent: a Deployment per service, the same
/// node selector, `max_nodes` replicas spread over zones, one per node.
pub fn deployment(shape: &Shape, j: usize) -> anyhow::Result<Deployment> {
    let name = format!("svc-{j:04}");
    let labels = json!({"app": name});
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": shape.max_nodes,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {SITE_LABEL: site(j % shape.sites)},
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": ZONE_LABEL,
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": labels},
                    }, {
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": labels},
                    }],
                    "containers": [{"name": "relay", "image": "edgewire-agent:bench"}],
                },
            },
        },
    }))?)
}

/// The relabel burst: `count` nodes, each moved to the next site. Nodes
/// are taken in index order, which goes round the sites, so each site loses
/// and gains the same few nodes and every service keeps somewhere to run.
/// Returns (node index, new site).
pub fn relabels(shape: &Shape, count: usize) -> Vec<(usize, String)> {
    (0..count.min(shape.nodes))
        .map(|i| (i, site((i % shape.sites + 1) % shape.sites)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        nodes: 1000,
        services: 500,
        sites: 50,
        zones: 5,
        max_nodes: 3,
    };

    #[test]
    fn every_site_spans_every_zone() {
        for s in 0..SHAPE.sites {
            let zones: std::collections::BTreeSet<String> = (0..SHAPE.nodes)
                .map(|i| node_labels(&SHAPE, i))
                .filter(|l| l[SITE_LABEL] == site(s))
                .map(|l| l[ZONE_LABEL].clone())
                .collect();
            assert_eq!(zones.len(), SHAPE.zones, "site {s}");
        }
    }

    #[test]
    fn addresses_are_distinct_and_in_the_benchmark_range() {
        let all: std::collections::BTreeSet<String> = (0..SHAPE.nodes).map(node_address).collect();
        assert_eq!(all.len(), SHAPE.nodes);
        assert!(
            all.iter()
                .all(|a| a.starts_with("198.18.") || a.starts_with("198.19."))
        );
    }

    #[test]
    fn objects_parse_and_relabels_move_distinct_nodes() {
        let es = edge_service(&SHAPE, 7).unwrap();
        assert_eq!(es.spec.port, 20007);
        assert_eq!(es.spec.node_selector[SITE_LABEL], site(7));
        deployment(&SHAPE, 7).unwrap();
        let moves = relabels(&SHAPE, 100);
        assert_eq!(moves.len(), 100);
        let nodes: std::collections::BTreeSet<usize> = moves.iter().map(|m| m.0).collect();
        assert_eq!(nodes.len(), 100);
        assert!(moves.iter().all(|(i, s)| *s != site(i % SHAPE.sites)));
        // Every site still has enough nodes for a service's maxNodes.
        let mut site_of: Vec<String> = (0..SHAPE.nodes).map(|i| site(i % SHAPE.sites)).collect();
        for (i, s) in moves {
            site_of[i] = s;
        }
        for s in 0..SHAPE.sites {
            let left = site_of.iter().filter(|x| **x == site(s)).count();
            assert!(left >= SHAPE.max_nodes, "site {s} keeps {left} nodes");
        }
    }
}
