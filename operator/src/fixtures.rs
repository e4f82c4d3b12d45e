//! What the unit tests of several modules build alike.

use edgewire_api::crd::{NodePlacement, PlacementState};

/// `node` placed in `state`, with nothing else known about it.
pub fn placed(node: &str, state: PlacementState) -> NodePlacement {
    NodePlacement {
        node: node.into(),
        address: None,
        state,
        message: None,
        mesh_public_key: None,
    }
}
