//! The hub's side of store-and-forward: the highest sequence delivered per
//! (origin node, channel), so a message an edge sends again (its
//! acknowledgement was lost, or the edge restarted) is acknowledged but not
//! delivered twice. Each accepted sequence is appended to a log in the
//! state directory before the message is delivered (one `write`; a killed
//! hub keeps it), and the log is compacted when it opens and as it grows.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Log lines per table entry before the log is rewritten.
const COMPACT_FACTOR: usize = 8;
const COMPACT_MIN: usize = 4096;

/// The highest sequence delivered, by origin node and then channel: looked
/// up by `&str` without building a key per message.
type Table = HashMap<String, HashMap<String, u64>>;

#[derive(Default)]
struct Inner {
    highest: Table,
    /// Entries in `highest`.
    entries: usize,
    log: Option<File>,
    /// The log was opened (or found unwritable): services that are never a
    /// hub write nothing.
    tried: bool,
    lines: usize,
    warned: bool,
}

/// One service's table.
#[derive(Default)]
pub struct Dedup {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl Dedup {
    /// The table kept in `path` (created at the first forwarded message);
    /// `None`, or a path that cannot be written, keeps it in memory only
    /// (with a warning).
    pub fn open(path: Option<PathBuf>) -> Dedup {
        let mut inner = Inner::default();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for line in text.lines() {
                // A line cut by a crash does not parse and is skipped.
                if let Ok((node, channel, seq)) =
                    serde_json::from_str::<(String, String, u64)>(line)
                {
                    inner.record(node, channel, seq);
                }
            }
        }
        Dedup {
            path,
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `seq` from `node` on `channel` is new (and so to be
    /// delivered); a new one is recorded before this returns.
    pub fn accept(&self, node: &str, channel: &str, seq: u64) -> bool {
        let mut inner = self.lock();
        match inner.highest.get_mut(node).and_then(|c| c.get_mut(channel)) {
            Some(high) if seq <= *high => return false,
            Some(high) => *high = seq,
            None => inner.record(node.to_string(), channel.to_string(), seq),
        }
        if !inner.tried {
            inner.tried = true;
            // Rewritten compact, with this entry, and opened for appends.
            self.compact(&mut inner);
            return true;
        }
        let written = inner
            .log
            .as_mut()
            .map(|log| log.write_all(line(node, channel, seq).as_bytes()));
        match written {
            Some(Ok(())) => inner.lines += 1,
            Some(Err(err)) if !inner.warned => {
                inner.warned = true;
                tracing::warn!(%err, path = ?self.path, "cannot record delivered uplink sequences; duplicates after a restart are possible");
            }
            _ => {}
        }
        if inner.lines > (inner.entries * COMPACT_FACTOR).max(COMPACT_MIN) {
            self.compact(&mut inner);
        }
        true
    }

    /// Rewrites the log as one line per entry.
    fn compact(&self, inner: &mut Inner) {
        let Some(path) = &self.path else { return };
        let tmp = path.with_extension("tmp");
        let mut text = String::new();
        for (node, channels) in &inner.highest {
            for (channel, &seq) in channels {
                text.push_str(&line(node, channel, seq));
            }
        }
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, &text))
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| OpenOptions::new().append(true).open(path));
        match written {
            Ok(file) => {
                inner.log = Some(file);
                inner.lines = inner.entries;
            }
            Err(err) => {
                inner.log = None;
                tracing::warn!(%err, path = %path.display(), "cannot keep the uplink deduplication table on disk; it is kept in memory");
            }
        }
    }
}

impl Inner {
    /// Sets an entry, counting a new one.
    fn record(&mut self, node: String, channel: String, seq: u64) {
        let channels = self.highest.entry(node).or_default();
        match channels.get_mut(&channel) {
            Some(high) => *high = (*high).max(seq),
            None => {
                channels.insert(channel, seq);
                self.entries += 1;
            }
        }
    }
}

/// One line of the log: `["node","channel",seq]`.
fn line(node: &str, channel: &str, seq: u64) -> String {
    serde_json::to_string(&(node, channel, seq)).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_is_delivered_once_per_node_and_channel_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup").join("svc.log");
        let dedup = Dedup::open(Some(path.clone()));
        assert!(dedup.accept("a", "t", 5));
        assert!(!dedup.accept("a", "t", 5), "again");
        assert!(!dedup.accept("a", "t", 4), "older");
        assert!(dedup.accept("a", "u", 1), "another channel");
        assert!(dedup.accept("b", "t", 1), "another node");
        assert!(dedup.accept("a", "t", 9));
        drop(dedup);
        let dedup = Dedup::open(Some(path));
        assert!(!dedup.accept("a", "t", 9));
        assert!(!dedup.accept("b", "t", 1));
        assert!(dedup.accept("a", "t", 10));
        let memory = Dedup::open(None);
        assert!(memory.accept("a", "t", 1) && !memory.accept("a", "t", 1));
    }
}
