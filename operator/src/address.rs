//! Which address an edge node's endpoints get. The Node object is the
//! authority: the kubelet (or the cloud provider) writes `status.addresses`,
//! and an agent cannot. An agent's `EdgeNode.spec.address` only chooses among
//! them (e.g. the ExternalIP that edge devices reach); a claim that is not one
//! of them is ignored and reported, so a stolen agent token cannot point an
//! EdgeService's endpoints at an address of its choosing.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

/// The address types that name an IP of the node itself (not a DNS name).
const IP_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// The decision for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddress {
    /// The address to publish: the claimed one when it is the node's,
    /// else the node's first InternalIP, else its first ExternalIP.
    pub address: Option<String>,
    /// The agent claimed an address that is not one of the node's.
    pub rejected_claim: Option<String>,
}

/// Whether two address strings name the same IP (`::1` and `0::1` do);
/// strings that are not IPs compare as text.
fn same(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The node's own IPs, InternalIPs first, each in the order the node lists it.
pub fn node_ips(node: &Node) -> Vec<&str> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    IP_TYPES
        .iter()
        .flat_map(|t| {
            addresses
                .iter()
                .filter(move |a| a.type_ == *t && !a.address.is_empty())
                .map(|a| a.address.as_str())
        })
        .collect()
}

/// Decides the address of a node from its own addresses and what its agent
/// claims (`EdgeNode.spec.address`; empty or absent when it claims nothing).
pub fn decide(node: &Node, claimed: Option<&str>) -> NodeAddress {
    let ips = node_ips(node);
    let claimed = claimed.map(str::trim).filter(|c| !c.is_empty());
    match claimed {
        Some(c) => match ips.iter().find(|ip| same(ip, c)) {
            Some(ip) => NodeAddress {
                address: Some((*ip).to_string()),
                rejected_claim: None,
            },
            None => NodeAddress {
                address: ips.first().map(|ip| (*ip).to_string()),
                rejected_claim: Some(c.to_string()),
            },
        },
        None => NodeAddress {
            address: ips.first().map(|ip| (*ip).to_string()),
            rejected_claim: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress as Addr, NodeStatus};

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| Addr {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn a_claim_of_one_of_the_nodes_addresses_is_used() {
        let n = node(&[
            ("Hostname", "edge-1"),
            ("InternalIP", "10.0.0.5"),
            ("ExternalIP", "203.0.113.7"),
        ]);
        assert_eq!(
            decide(&n, Some("203.0.113.7")),
            NodeAddress {
                address: Some("203.0.113.7".into()),
                rejected_claim: None
            }
        );
        assert_eq!(
            decide(&n, Some("10.0.0.5")).address.as_deref(),
            Some("10.0.0.5")
        );
    }

    #[test]
    fn a_claim_of_another_address_is_rejected_and_the_nodes_is_used() {
        let n = node(&[("InternalIP", "10.0.0.5")]);
        assert_eq!(
            decide(&n, Some("192.0.2.66")),
            NodeAddress {
                address: Some("10.0.0.5".into()),
                rejected_claim: Some("192.0.2.66".into())
            }
        );
    }

    #[test]
    fn names_are_not_addresses() {
        // A Hostname or DNS entry is the node's, but not an IP an
        // EndpointSlice of type IPv4/IPv6 can carry.
        let n = node(&[("Hostname", "edge-1"), ("InternalDNS", "edge-1.local")]);
        let d = decide(&n, Some("edge-1"));
        assert_eq!(d.address, None);
        assert_eq!(d.rejected_claim.as_deref(), Some("edge-1"));
    }

    #[test]
    fn no_claim_takes_the_internal_ip_first() {
        let n = node(&[("ExternalIP", "203.0.113.7"), ("InternalIP", "10.0.0.5")]);
        assert_eq!(decide(&n, None).address.as_deref(), Some("10.0.0.5"));
        assert_eq!(decide(&n, Some("  ")).rejected_claim, None);
        let external_only = node(&[("ExternalIP", "203.0.113.7")]);
        assert_eq!(
            decide(&external_only, Some("")).address.as_deref(),
            Some("203.0.113.7")
        );
    }

    #[test]
    fn ipv6_claims_match_in_any_spelling() {
        let n = node(&[("InternalIP", "2001:db8::5")]);
        let d = decide(&n, Some("2001:0db8:0:0::5"));
        assert_eq!(d.address.as_deref(), Some("2001:db8::5"));
        assert_eq!(d.rejected_claim, None);
    }

    #[test]
    fn a_node_without_addresses_has_none_and_rejects_any_claim() {
        let d = decide(&Node::default(), Some("10.0.0.5"));
        assert_eq!(d.address, None);
        assert_eq!(d.rejected_claim.as_deref(), Some("10.0.0.5"));
    }
}
