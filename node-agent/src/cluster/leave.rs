//! When a leaving agent may close its ports: once the operator has taken
//! its node out of the endpoints of every service it runs. The operator
//! writes the EndpointSlices before the EdgeService status, so a placement
//! that no longer reads Ready for this node means the slices no longer list
//! it. A pure function over the agent's cached EdgeServices.

use edgewire_api::crd::{EdgeService, PlacementState};

/// Whether no EdgeService among `running` (`namespace/name`) still counts
/// `node` as a Ready endpoint.
pub fn out_of_endpoints(node: &str, services: &[EdgeService], running: &[String]) -> bool {
    services
        .iter()
        .filter(|es| {
            let key = format!(
                "{}/{}",
                es.metadata.namespace.as_deref().unwrap_or_default(),
                es.metadata.name.as_deref().unwrap_or_default()
            );
            running.contains(&key)
        })
        .flat_map(|es| es.status.iter().flat_map(|s| s.placement.iter()))
        .all(|p| p.node != node || p.state != PlacementState::Ready)
}

#[cfg(test)]
mod tests {
    use edgewire_api::crd::{EdgeServiceStatus, NodePlacement};

    use super::*;

    fn es(name: &str, placement: &[(&str, PlacementState)]) -> EdgeService {
        let mut es: EdgeService = serde_json::from_value(serde_json::json!({
            "apiVersion": "edgewire.dev/v1alpha1",
            "kind": "EdgeService",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"port": 8000},
        }))
        .unwrap();
        es.status = Some(EdgeServiceStatus {
            placement: placement
                .iter()
                .map(|(node, state)| NodePlacement {
                    node: node.to_string(),
                    address: None,
                    state: *state,
                    message: None,
                    mesh_public_key: None,
                })
                .collect(),
            ..EdgeServiceStatus::default()
        });
        es
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
        assert!(!out_of_endpoints(
            "me",
            &[a_ready.clone(), b_pending.clone()],
            &running
        ));
        assert!(out_of_endpoints(
            "me",
            &[a_pending.clone(), b_pending.clone()],
            &running
        ));
        assert!(
            out_of_endpoints("me", &[a_pending, b_pending, c_ready], &running),
            "a service this agent does not run is not its business"
        );
        assert!(out_of_endpoints("me", &[], &running));
        assert!(!out_of_endpoints("other", &[a_ready], &running));
    }
}
