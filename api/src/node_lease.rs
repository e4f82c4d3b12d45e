//! The Lease an agent renews as its heartbeat, the way a kubelet renews its
//! node Lease: a small, fixed-size write the API server handles cheaply,
//! while the EdgeNode's status is written only when what it reports changes.
//! The operator judges a node's freshness by when it *saw* either change.

/// Label on every agent's node Lease; the operator watches by it.
pub const LABEL: &str = "edgewire.dev/node-lease";

const PREFIX: &str = "edgewire-node-";

/// The name of `node`'s Lease.
pub fn name(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// The node a Lease of that name is the heartbeat of.
pub fn node(lease_name: &str) -> Option<&str> {
    lease_name.strip_prefix(PREFIX).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_and_its_lease_name_map_both_ways() {
        assert_eq!(name("edge-1"), "edgewire-node-edge-1");
        assert_eq!(node(&name("edge-1")), Some("edge-1"));
        assert_eq!(node("edgewire-operator"), None);
        assert_eq!(node("edgewire-node-"), None);
    }
}
