//! The real nodes' network: a bridge on the host, one network namespace per
//! node wired to it by a veth pair, and routes to each node's pod range.
//!
//! Nothing leaves the machine: the host does not forward (its `ip_forward`
//! is never touched), so the nodes reach the host's bridge address and each
//! other, and nothing beyond. The bridge has a fixed MAC: a bridge otherwise
//! takes its lowest port's, and removing one node's veth would change it and
//! leave the other nodes with a stale ARP entry for the API server.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::cmd::run;
use crate::Error;

/// Every name this module creates starts with this, so that what an
/// interrupted run left behind is found again by name.
pub const PREFIX: &str = "ewrn";
pub const BRIDGE: &str = "ewrn0";
const BRIDGE_MAC: &str = "02:00:ac:1e:fa:01";
/// The host's address on the bridge: where the API server listens.
pub const HOST: Ipv4Addr = Ipv4Addr::new(172, 30, 250, 1);
const PREFIX_LEN: u8 = 24;

/// Node `index` (1-based) in the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNet {
    pub index: u8,
    /// The network namespace's name (`ip netns`), also the host-side veth's.
    pub netns: String,
    pub address: Ipv4Addr,
    /// The node's pod range, `10.244.<index>.0/24`.
    pub pod_cidr: String,
}

impl NodeNet {
    pub fn new(index: u8) -> NodeNet {
        NodeNet {
            index,
            netns: format!("{PREFIX}-n{index}"),
            address: Ipv4Addr::new(172, 30, 250, 10 + index),
            pod_cidr: format!("10.244.{index}.0/24"),
        }
    }

    /// The namespace's pin file, as `nsenter --net=` takes it.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.netns)
    }

    /// The host-side end of the node's veth pair: down is a cut cable.
    pub fn host_link(&self) -> &str {
        &self.netns
    }
}

fn ip(args: &[&str]) -> Result<String, Error> {
    run("ip", args)
}

/// Creates the bridge and the nodes' namespaces, links and routes.
pub fn up(nodes: &[NodeNet]) -> Result<(), Error> {
    let host = format!("{HOST}/{PREFIX_LEN}");
    ip(&[
        "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
    ])?;
    ip(&["addr", "add", &host, "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    for node in nodes {
        let ns = node.netns.as_str();
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["link", "set", ns, "master", BRIDGE, "up"])?;
        let address = format!("{}/{PREFIX_LEN}", node.address);
        ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        // The default route leads to the host, which does not forward.
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &HOST.to_string(),
        ])?;
    }
    // Each node (and the host, which answers pods that call the API server
    // through the `kubernetes` Service) reaches every node's pods through it.
    for target in nodes {
        let via = target.address.to_string();
        ip(&[
            "route",
            "replace",
            &target.pod_cidr,
            "via",
            &via,
            "dev",
            BRIDGE,
        ])?;
        for other in nodes.iter().filter(|n| n.index != target.index) {
            ip(&[
                "-n",
                &other.netns,
                "route",
                "replace",
                &target.pod_cidr,
                "via",
                &via,
                "dev",
                "eth0",
            ])?;
        }
    }
    Ok(())
}

/// Cuts (or restores) the node's cable: its veth's host end goes down.
pub fn set_link(node: &NodeNet, up: bool) -> Result<(), Error> {
    ip(&[
        "link",
        "set",
        node.host_link(),
        if up { "up" } else { "down" },
    ])
    .map(|_| ())
}

/// The iptables rules, inside the node's namespace only, that drop its
/// traffic to the API server (its own processes', and its pods' that it
/// forwards), or remove them again.
pub fn apiserver_rules(node: &NodeNet, port: u16, blocked: bool) -> Result<(), Error> {
    let action = if blocked { "-I" } else { "-D" };
    let host = HOST.to_string();
    let port = port.to_string();
    for chain in ["OUTPUT", "FORWARD"] {
        run(
            "nsenter",
            &[
                &format!("--net={}", node.netns_path().display()),
                "--",
                "iptables",
                "-w",
                action,
                chain,
                "-d",
                &host,
                "-p",
                "tcp",
                "--dport",
                &port,
                "-m",
                "comment",
                "--comment",
                "edgewire-test-apiserver-unreachable",
                "-j",
                "DROP",
            ],
        )?;
    }
    Ok(())
}

/// Whether a route on the host already covers the bridge's range or a pod
/// range (then the real nodes would shadow or be shadowed by it).
pub fn conflicting_routes(routes: &str) -> Vec<String> {
    routes
        .lines()
        .filter(|line| !line.contains(BRIDGE))
        .filter(|line| {
            let dest = line.split_whitespace().next().unwrap_or("");
            dest.starts_with("172.30.250.") || dest.starts_with("10.244.")
        })
        .map(String::from)
        .collect()
}

/// Removes the bridge (its routes go with it) and every node namespace,
/// by name, whoever made them.
pub fn down() {
    // The host ends of the veth pairs first: deleting one end deletes both
    // at once, where a deleted namespace takes its devices down later, in
    // the background, and the next run would find the names taken.
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        for link in links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name))
            .filter(|name| name.starts_with(&format!("{PREFIX}-")))
        {
            let _ = ip(&["link", "del", link]);
        }
    }
    if let Ok(list) = ip(&["netns", "list"]) {
        for ns in list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        {
            let _ = ip(&["netns", "del", ns]);
        }
    }
    if ip(&["link", "show", BRIDGE]).is_ok() {
        let _ = ip(&["link", "del", BRIDGE]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_addresses_namespaces_and_pod_ranges() {
        let a = NodeNet::new(1);
        let b = NodeNet::new(2);
        assert_eq!(a.address, Ipv4Addr::new(172, 30, 250, 11));
        assert_eq!(b.pod_cidr, "10.244.2.0/24");
        assert_eq!(a.netns, "ewrn-n1");
        assert_ne!(a.host_link(), b.host_link());
        assert!(a.host_link().len() <= 15, "a Linux interface name");
    }

    #[test]
    fn routes_that_would_collide_are_found() {
        let routes = "default via 192.0.2.1 dev eth0\n10.244.1.0/24 via 172.30.250.11 dev ewrn0\n10.244.0.0/16 dev flannel.1\n";
        assert_eq!(
            conflicting_routes(routes),
            vec!["10.244.0.0/16 dev flannel.1".to_string()]
        );
    }
}
