//! When a leaving agent may close its ports: once the operator has taken
//! its node out of the endpoints of every service it runs. The operator
//! writes the EndpointSlices before the PlacementSlices, so a placement
//! that no longer reads Ready for this node means the EndpointSlices no
//! longer list it. A pure function over the agent's cached EdgeServices and
//! PlacementSlices.

use edgewire_api::crd::{EdgeService, PlacementSlice, PlacementState};

use super::render;

/// Whether no EdgeService among `running` (`namespace/name`) still counts
/// `node` as a Ready endpoint.
pub fn out_of_endpoints(
    node: &str,
    services: &[EdgeService],
    slices: &[PlacementSlice],
    running: &[String],
) -> bool {
    render::placements(services, slices)
        .iter()
        .filter(|(key, _)| running.contains(key))
        .flat_map(|(_, nodes)| nodes.iter())
        .all(|p| p.node != node || p.state != PlacementState::Ready)
}

#[cfg(test)]
mod tests {
    use edgewire_api::crd::{NodePlacement, PlacementSliceSpec};

    use super::*;

    /// A service and the one slice that holds its placement.
    fn es(name: &str, placement: &[(&str, PlacementState)]) -> (EdgeService, PlacementSlice) {
        let es: EdgeService = serde_json::from_value(serde_json::json!({
            "apiVersion": "edgewire.dev/v1alpha1",
            "kind": "EdgeService",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"port": 8000},
        }))
        .unwrap();
        let mut slice = PlacementSlice::new(
            &format!("{name}-0"),
            PlacementSliceSpec {
                service: name.to_string(),
                nodes: placement
                    .iter()
                    .map(|(node, state)| NodePlacement {
                        node: node.to_string(),
                        address: None,
                        state: *state,
                        message: None,
                        mesh_public_key: None,
                    })
                    .collect(),
            },
        );
        slice.metadata.namespace = Some("ns".into());
        (es, slice)
    }

    fn out(node: &str, placed: &[(EdgeService, PlacementSlice)], running: &[String]) -> bool {
        let (services, slices): (Vec<_>, Vec<_>) = placed.iter().cloned().unzip();
        out_of_endpoints(node, &services, &slices, running)
    }

    #[test]
    fn out_once_no_running_service_counts_the_node_ready() {
        let running = vec!["ns/a".to_string(), "ns/b".to_string()];
        let a_ready = es(
            "a",
            &[
                ("me", PlacementState::Ready),
                ("other", PlacementState::Ready),
            ],
        );
        let a_pending = es(
            "a",
            &[
                ("me", PlacementState::Pending),
                ("other", PlacementState::Ready),
            ],
        );
        let b_pending = es("b", &[("me", PlacementState::Pending)]);
        let c_ready = es("c", &[("me", PlacementState::Ready)]);
        assert!(!out("me", &[a_ready.clone(), b_pending.clone()], &running));
        assert!(out("me", &[a_pending.clone(), b_pending.clone()], &running));
        assert!(
            out("me", &[a_pending, b_pending, c_ready], &running),
            "a service this agent does not run is not its business"
        );
        assert!(out("me", &[], &running));
        assert!(!out("other", &[a_ready], &running));
    }
}
