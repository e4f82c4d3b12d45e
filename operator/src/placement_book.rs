//! The placement as the operator last saw it written: its cache of
//! PlacementSlices, with indexes by service and by node so a reconcile
//! reads the few slices it needs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use edgewire_api::crd::{EdgeService, NodePlacement, PlacementSlice};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::caches::WatchEvent;
use crate::index::Index;

#[derive(Clone)]
pub struct PlacementBook {
    pub store: Store<PlacementSlice>,
    indexes: Indexes,
}

/// `namespace/name` of a slice or a service.
fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn slice_key(slice: &PlacementSlice) -> String {
    key(&slice.namespace().unwrap_or_default(), &slice.name_any())
}

/// `namespace/service` of the service a slice belongs to.
fn service_of(slice: &PlacementSlice) -> String {
    key(&slice.namespace().unwrap_or_default(), &slice.spec.service)
}

/// The indexes, to be fed from the slice watch before the store exists.
#[derive(Clone, Default)]
pub struct Indexes {
    by_service: Arc<Index>,
    by_node: Arc<Index>,
}

impl Indexes {
    pub fn apply(&self, event: &WatchEvent<PlacementSlice>) {
        self.by_service
            .apply(event, slice_key, |s| vec![service_of(s)]);
        self.by_node.apply(event, slice_key, |s| {
            s.spec.nodes.iter().map(|p| p.node.clone()).collect()
        });
    }

    pub fn book(self, store: Store<PlacementSlice>) -> PlacementBook {
        PlacementBook {
            store,
            indexes: self,
        }
    }
}

fn object_ref(key: &str) -> Option<ObjectRef<PlacementSlice>> {
    let (namespace, name) = key.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

impl PlacementBook {
    /// The slices of `es` that it owns (a slice left by an earlier service
    /// of the same name, or written by someone else, is not its placement).
    pub fn slices(&self, es: &EdgeService) -> Vec<Arc<PlacementSlice>> {
        let namespace = es.namespace().unwrap_or_default();
        let uid = es.uid();
        self.indexes
            .by_service
            .get(&key(&namespace, &es.name_any()))
            .iter()
            .filter_map(|k| self.store.get(&object_ref(k)?))
            .filter(|s| {
                s.namespace().as_deref() == Some(namespace.as_str())
                    && s.spec.service == es.name_any()
                    && s.owner_references()
                        .iter()
                        .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
            })
            .collect()
    }

    /// Every node `es` is placed on, once each, by node name.
    pub fn placement(&self, es: &EdgeService) -> Vec<NodePlacement> {
        let mut by_node = BTreeMap::new();
        for slice in self.slices(es) {
            for p in &slice.spec.nodes {
                by_node.entry(p.node.clone()).or_insert_with(|| p.clone());
            }
        }
        by_node.into_values().collect()
    }

    /// What `es`'s slices hold now: slice name to node names.
    pub fn layout(&self, es: &EdgeService) -> BTreeMap<String, BTreeSet<String>> {
        self.slices(es)
            .iter()
            .map(|s| {
                (
                    s.name_any(),
                    s.spec.nodes.iter().map(|p| p.node.clone()).collect(),
                )
            })
            .collect()
    }

    /// How many services are placed on `node`, by the count of slices that
    /// name it (a service's slices never share a node), without reading
    /// the slices: placement asks this of every candidate.
    pub fn load(&self, node: &str) -> usize {
        self.indexes.by_node.count(node)
    }

    /// The services (`namespace`, `name`) placed on `node`.
    pub fn services_on(&self, node: &str) -> Vec<(String, String)> {
        let mut services: Vec<(String, String)> = self
            .indexes
            .by_node
            .get(node)
            .iter()
            .filter_map(|k| self.store.get(&object_ref(k)?))
            .filter(|s| s.spec.nodes.iter().any(|p| p.node == node))
            .map(|s| (s.namespace().unwrap_or_default(), s.spec.service.clone()))
            .collect();
        services.sort_unstable();
        services.dedup();
        services
    }
}
