//! The operator's caches, each filled by a watch on a task of its own.
//!
//! When a controller polls its watches itself, a backlog of reconciles
//! delays the watches, and the operator judges live nodes stale from
//! heartbeats that are only late in its own cache. Here every watch is
//! driven by its own task, whatever the controller is doing; the task also
//! tells the controller what its events concern (`on_event`), which goes
//! through a coalescing queue.
//!
//! The caches keep only what the operator reads: no managedFields, and of a
//! Node only its labels and addresses (a Node's status carries its images
//! and conditions, kilobytes per node that nothing here uses).

use std::fmt::Debug;
use std::hash::Hash;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::watch::WatchBackoff;

pub type WatchEvent<K> = Result<watcher::Event<K>, watcher::Error>;

/// Starts a watch of `api` that fills the returned store on a task of its
/// own, trimming each object with `trim` first and then passing each event
/// to `on_event`, with the store, once the store has it. The task ends with
/// `stop`.
pub fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    mut on_event: impl FnMut(&Store<K>, &WatchEvent<K>) + Send + 'static,
    stop: CancellationToken,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .backoff(WatchBackoff::default())
        .modify(trim)
        .reflect(writer);
    let reader = store.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                event = stream.next() => match event {
                    Some(event) => {
                        if let Err(err) = &event {
                            tracing::debug!(%err, kind = %K::kind(&Default::default()), "watch error");
                        }
                        on_event(&reader, &event);
                    }
                    None => break,
                },
            }
        }
    });
    (store, task)
}

/// Drops what no reader of the cache uses.
pub fn trim_meta<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A Node reduced to its name, labels and addresses.
pub fn trim_node(node: &mut Node) {
    let meta = node.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    node.spec = None;
    node.status = node.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
}

/// The objects a watch event is about, with whether each still exists.
pub fn touched<K: Clone>(event: &WatchEvent<K>) -> Vec<(K, bool)> {
    match event {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![(o.clone(), true)],
        Ok(watcher::Event::Delete(o)) => vec![(o.clone(), false)],
        _ => Vec::new(),
    }
}

/// `namespace/name` of the EdgeService that owns `object`, if one does.
pub fn owner<K: Resource>(object: &K) -> Option<(String, String)> {
    let owner = object
        .owner_references()
        .iter()
        .find(|o| o.kind == "EdgeService" && o.controller == Some(true))?;
    Some((object.namespace()?, owner.name.clone()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerImage, NodeAddress, NodeSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use super::*;

    #[test]
    fn a_trimmed_node_keeps_labels_and_addresses_only() {
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        node.metadata.labels = Some([("zone".to_string(), "a".to_string())].into());
        node.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        node.spec = Some(NodeSpec {
            pod_cidr: Some("10.0.0.0/24".into()),
            ..NodeSpec::default()
        });
        node.status = Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "192.0.2.1".into(),
            }]),
            images: Some(vec![ContainerImage::default(); 50]),
            ..NodeStatus::default()
        });
        trim_node(&mut node);
        assert_eq!(node.name_any(), "n1");
        assert_eq!(node.labels().get("zone").map(String::as_str), Some("a"));
        assert!(node.metadata.managed_fields.is_none());
        assert!(node.spec.is_none());
        let status = node.status.expect("status");
        assert_eq!(status.addresses.map(|a| a.len()), Some(1));
        assert!(status.images.is_none());
    }
}
