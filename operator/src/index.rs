//! Secondary indexes over a cache, kept up to date from its watch events, so
//! that a reconcile looks up the few objects it needs (the nodes carrying a
//! selected label, the services on a port, the slices of an owner) instead
//! of scanning every object of the kind.
//!
//! An index is only a hint: a reader confirms each hit against the store,
//! which is the truth; the index never hides an object the store has.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::watcher;

use crate::caches::WatchEvent;

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<String, HashSet<String>>,
    keys_of: HashMap<String, Vec<String>>,
    /// Objects seen since a relist began; the rest are dropped at its end.
    relisting: Option<HashSet<String>>,
}

impl Entries {
    fn set(&mut self, object: String, keys: Vec<String>) {
        self.remove(&object);
        for key in &keys {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(object.clone());
        }
        self.keys_of.insert(object, keys);
    }

    fn remove(&mut self, object: &str) {
        for key in self.keys_of.remove(object).unwrap_or_default() {
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(object);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }
}

/// Object names by key; many keys per object.
#[derive(Debug, Default)]
pub struct Index {
    entries: Mutex<Entries>,
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows one watch event: `name` names an object, `keys` are the keys
    /// it is found under.
    pub fn apply<K>(
        &self,
        event: &WatchEvent<K>,
        name: impl Fn(&K) -> String,
        keys: impl Fn(&K) -> Vec<String>,
    ) {
        let mut entries = self.lock();
        match event {
            Ok(watcher::Event::Init) => entries.relisting = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(o)) => {
                let n = name(o);
                if let Some(seen) = entries.relisting.as_mut() {
                    seen.insert(n.clone());
                }
                entries.set(n, keys(o));
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = entries.relisting.take() {
                    let gone: Vec<String> = entries
                        .keys_of
                        .keys()
                        .filter(|o| !seen.contains(*o))
                        .cloned()
                        .collect();
                    for o in gone {
                        entries.remove(&o);
                    }
                }
            }
            Ok(watcher::Event::Apply(o)) => entries.set(name(o), keys(o)),
            Ok(watcher::Event::Delete(o)) => entries.remove(&name(o)),
            Err(_) => {}
        }
    }

    /// The objects under `key`.
    pub fn get(&self, key: &str) -> Vec<String> {
        self.lock()
            .by_key
            .get(key)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many objects are under `key`.
    pub fn count(&self, key: &str) -> usize {
        self.lock().by_key.get(key).map_or(0, |set| set.len())
    }

    /// The objects under the rarest of `keys` (a superset of those under
    /// all of them, which is what a selector of several labels needs), or
    /// None when `keys` is empty.
    pub fn narrowest(&self, keys: &[String]) -> Option<Vec<String>> {
        let entries = self.lock();
        let empty = HashSet::new();
        keys.iter()
            .map(|k| entries.by_key.get(k).unwrap_or(&empty))
            .min_by_key(|set| set.len())
            .map(|set| set.iter().cloned().collect())
    }
}

/// `key=value` for each label: the keys of a label index.
pub fn label_keys(labels: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        e: watcher::Event<(&'static str, &'static [&'static str])>,
    ) -> WatchEvent<(&'static str, &'static [&'static str])> {
        Ok(e)
    }

    fn apply(index: &Index, e: watcher::Event<(&'static str, &'static [&'static str])>) {
        index.apply(
            &ev(e),
            |o| o.0.to_string(),
            |o| o.1.iter().map(|k| k.to_string()).collect(),
        );
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn follows_applies_changes_and_deletes() {
        let index = Index::default();
        apply(
            &index,
            watcher::Event::Apply(("a", &["zone=1", "edge=true"])),
        );
        apply(
            &index,
            watcher::Event::Apply(("b", &["zone=2", "edge=true"])),
        );
        assert_eq!(sorted(index.get("edge=true")), ["a", "b"]);
        // Relabelled: gone from its old key.
        apply(&index, watcher::Event::Apply(("a", &["zone=2"])));
        assert!(index.get("zone=1").is_empty());
        assert_eq!(sorted(index.get("zone=2")), ["a", "b"]);
        apply(&index, watcher::Event::Delete(("b", &[])));
        assert_eq!(index.get("zone=2"), ["a"]);
        assert!(index.get("edge=true").is_empty());
    }

    #[test]
    fn a_relist_drops_what_disappeared_meanwhile() {
        let index = Index::default();
        apply(&index, watcher::Event::Apply(("a", &["k"])));
        apply(&index, watcher::Event::Apply(("b", &["k"])));
        apply(&index, watcher::Event::Init);
        apply(&index, watcher::Event::InitApply(("b", &["k"])));
        // Until the relist is done, the old entries stay.
        assert_eq!(sorted(index.get("k")), ["a", "b"]);
        apply(&index, watcher::Event::InitDone);
        assert_eq!(index.get("k"), ["b"]);
    }

    #[test]
    fn the_narrowest_key_wins() {
        let index = Index::default();
        apply(
            &index,
            watcher::Event::Apply(("a", &["edge=true", "zone=1"])),
        );
        apply(
            &index,
            watcher::Event::Apply(("b", &["edge=true", "zone=2"])),
        );
        apply(
            &index,
            watcher::Event::Apply(("c", &["edge=true", "zone=2"])),
        );
        let keys = ["edge=true".to_string(), "zone=1".to_string()];
        assert_eq!(index.narrowest(&keys), Some(vec!["a".to_string()]));
        assert_eq!(index.narrowest(&["nothing=here".to_string()]), Some(vec![]));
        assert_eq!(index.narrowest(&[]), None);
    }
}
