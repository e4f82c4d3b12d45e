//! The uplink's store-and-forward queue: an append-only log of segment
//! files in the state directory, with the same messages held in memory for
//! sending (so the byte bound is also a memory bound).
//!
//! - Each message is written (one `write`) before the publisher gets its
//!   reply, so a killed agent loses nothing the kernel has; the active
//!   segment is `fdatasync`ed by [`Queue::sync`], which the link calls every
//!   [`super::SYNC_INTERVAL`]: a power cut loses at most that much.
//! - A message leaves the queue when the hub acknowledges it (delivered),
//!   or when the queue drops it: the oldest first when a new one would pass
//!   the byte bound (`capacity`), or once older than the TTL (`ttl`).
//! - `cursor` holds the highest sequence that has left; segments wholly
//!   below it are deleted. After a restart the queue resends from the
//!   oldest message above the cursor; the hub drops what it already has.
//! - Sequences start, for a new queue, at this node's wall clock in
//!   microseconds, so a node whose state directory was wiped does not
//!   reuse numbers the hub has already seen.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::record::{self, Decoded, Record};

const SEGMENT_SUFFIX: &str = ".seg";
const CURSOR: &str = "cursor";
/// Segments roll at this size, or an eighth of the bound when that is less,
/// so dropped and delivered bytes are freed on disk soon.
const MAX_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
const MIN_SEGMENT_BYTES: u64 = 4096;

/// What bounds the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub max_bytes: u64,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot open the uplink queue in {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a push did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Its sequence, when it was stored.
    pub seq: Option<u64>,
    /// Older messages dropped to make room, or this one when it alone is
    /// larger than the bound.
    pub dropped: u64,
}

/// Counts and age of what is queued, for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub messages: u64,
    pub bytes: u64,
    pub oldest_seconds: f64,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
}

struct Inner {
    bounds: Bounds,
    entries: VecDeque<Record>,
    bytes: u64,
    next_seq: u64,
    /// Every sequence at or below it has left the queue.
    cursor: u64,
    cursor_written: u64,
    segments: VecDeque<Segment>,
    active: Option<File>,
    active_len: u64,
    unsynced: bool,
}

pub struct Queue {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

/// Queues already open, by directory: a service that restarts takes over
/// its predecessor's queue rather than opening the files a second time.
static OPEN: Mutex<Option<HashMap<PathBuf, Weak<Queue>>>> = Mutex::new(None);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Queue {
    /// The queue in `dir`, opened (and recovered from disk) unless it is
    /// open already; `bounds` apply from now on. Blocking: call it off the
    /// async threads. Also returns how many messages the new bounds dropped.
    pub fn shared(dir: &Path, bounds: Bounds) -> Result<(Arc<Queue>, u64), QueueError> {
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        let open = open.get_or_insert_with(HashMap::new);
        open.retain(|_, queue| queue.strong_count() > 0);
        if let Some(queue) = open.get(dir).and_then(Weak::upgrade) {
            let dropped = queue.set_bounds(bounds);
            return Ok((queue, dropped));
        }
        let (queue, dropped) = Queue::open(dir, bounds)?;
        let queue = Arc::new(queue);
        open.insert(dir.to_path_buf(), Arc::downgrade(&queue));
        Ok((queue, dropped))
    }

    fn open(dir: &Path, bounds: Bounds) -> Result<(Queue, u64), QueueError> {
        let fail = |source| QueueError::Open {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        let cursor = std::fs::read_to_string(dir.join(CURSOR))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok());
        let mut segments: Vec<Segment> = std::fs::read_dir(dir)
            .map_err(fail)?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let first_seq = name.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()?;
                Some(Segment {
                    first_seq,
                    path: entry.path(),
                })
            })
            .collect();
        segments.sort_by_key(|s| s.first_seq);
        let mut entries = VecDeque::new();
        let mut last_seq = cursor.unwrap_or(0);
        let mut active_len = 0;
        let count = segments.len();
        for (i, segment) in segments.iter().enumerate() {
            let bytes = std::fs::read(&segment.path).map_err(fail)?;
            let mut at = 0;
            while at < bytes.len() {
                match record::decode(&bytes[at..]) {
                    Decoded::Record(record, used) => {
                        at += used;
                        last_seq = last_seq.max(record.seq);
                        if cursor.is_none_or(|c| record.seq > c) {
                            entries.push_back(record);
                        }
                    }
                    Decoded::Short | Decoded::Corrupt => break,
                }
            }
            if at < bytes.len() {
                // A write cut short by a crash: only ever the log's tail.
                tracing::warn!(
                    segment = %segment.path.display(),
                    offset = at,
                    "uplink queue: ignoring a torn record and what follows it"
                );
                if i + 1 == count {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&segment.path)
                        .map_err(fail)?;
                    file.set_len(at as u64).map_err(fail)?;
                }
            }
            if i + 1 == count {
                active_len = at as u64;
            }
        }
        let next_seq = if segments.is_empty() && cursor.is_none() {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64)
        } else {
            last_seq + 1
        };
        let active = match segments.last() {
            Some(last) => Some(
                OpenOptions::new()
                    .append(true)
                    .open(&last.path)
                    .map_err(fail)?,
            ),
            None => None,
        };
        let bytes = entries.iter().map(|r| r.size() as u64).sum();
        let cursor = cursor.unwrap_or(next_seq - 1);
        let queue = Queue {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                bounds,
                entries,
                bytes,
                next_seq,
                cursor,
                cursor_written: cursor,
                segments: segments.into(),
                active,
                active_len,
                unsynced: false,
            }),
        };
        let dropped = queue.set_bounds(bounds);
        Ok((queue, dropped))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New bounds; returns how many of the oldest messages they dropped.
    pub fn set_bounds(&self, bounds: Bounds) -> u64 {
        let mut inner = self.lock();
        inner.bounds = bounds;
        inner.make_room(0)
    }

    /// Stores a message published on `channel` (its `data` as JSON text).
    /// An error means it was not stored: it is lost, and counted by the
    /// caller; nothing queued before it is touched.
    pub fn push(&self, channel: &str, data: String, now_ms: u64) -> Result<Pushed, std::io::Error> {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let record = Record {
            seq,
            enqueued_ms: now_ms,
            channel: channel.to_string(),
            data,
        };
        let size = record.size() as u64;
        if size > inner.bounds.max_bytes {
            return Ok(Pushed {
                seq: None,
                dropped: 1,
            });
        }
        inner.append(&self.dir, &record)?;
        let dropped = inner.make_room(size);
        inner.bytes += size;
        inner.entries.push_back(record);
        Ok(Pushed {
            seq: Some(seq),
            dropped,
        })
    }

    /// Drops what is older than the TTL; returns how many.
    pub fn expire(&self, now_ms: u64) -> u64 {
        let mut inner = self.lock();
        let ttl = inner.bounds.ttl.as_millis() as u64;
        let mut dropped = 0;
        while inner
            .entries
            .front()
            .is_some_and(|r| now_ms.saturating_sub(r.enqueued_ms) > ttl)
        {
            inner.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Up to `max_messages` (and about `max_bytes`) queued messages with a
    /// sequence above `after` (all, with `None`), oldest first.
    pub fn after(&self, after: Option<u64>, max_messages: usize, max_bytes: usize) -> Vec<Record> {
        let inner = self.lock();
        let start = match after {
            Some(seq) => inner.entries.partition_point(|r| r.seq <= seq),
            None => 0,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for record in inner.entries.range(start..) {
            if out.len() >= max_messages || (!out.is_empty() && bytes + record.size() > max_bytes) {
                break;
            }
            bytes += record.size();
            out.push(record.clone());
        }
        out
    }

    /// Removes every message up to and including `seq` (the hub has them);
    /// returns how many left.
    pub fn remove_through(&self, seq: u64) -> u64 {
        let mut inner = self.lock();
        let mut removed = 0;
        while inner.entries.front().is_some_and(|r| r.seq <= seq) {
            inner.pop_front();
            removed += 1;
        }
        inner.cursor = inner.cursor.max(seq.min(inner.next_seq - 1));
        removed
    }

    pub fn stats(&self, now_ms: u64) -> Stats {
        let inner = self.lock();
        Stats {
            messages: inner.entries.len() as u64,
            bytes: inner.bytes,
            oldest_seconds: inner.entries.front().map_or(0.0, |r| {
                now_ms.saturating_sub(r.enqueued_ms) as f64 / 1000.0
            }),
        }
    }

    /// Makes what was written durable, records the cursor, and deletes the
    /// segments that hold nothing queued. Blocking.
    pub fn sync(&self) -> std::io::Result<()> {
        let (file, cursor) = {
            let mut inner = self.lock();
            let file = match (&inner.active, inner.unsynced) {
                (Some(file), true) => Some(file.try_clone()?),
                _ => None,
            };
            inner.unsynced = false;
            let cursor = (inner.cursor != inner.cursor_written).then_some(inner.cursor);
            (file, cursor)
        };
        if let Some(file) = file {
            file.sync_data()?;
        }
        if let Some(cursor) = cursor {
            let tmp = self.dir.join(format!("{CURSOR}.tmp"));
            std::fs::write(&tmp, format!("{cursor}\n"))?;
            std::fs::rename(&tmp, self.dir.join(CURSOR))?;
            let mut inner = self.lock();
            inner.cursor_written = cursor;
            // A segment goes once the next one starts at or below the
            // first sequence still wanted; the active one always stays.
            while inner.segments.len() > 1 && inner.segments[1].first_seq <= cursor + 1 {
                if let Some(done) = inner.segments.pop_front() {
                    let _ = std::fs::remove_file(&done.path);
                }
            }
        }
        Ok(())
    }
}

impl Inner {
    fn segment_bytes(&self) -> u64 {
        (self.bounds.max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
    }

    fn pop_front(&mut self) {
        if let Some(record) = self.entries.pop_front() {
            self.bytes -= record.size() as u64;
            self.cursor = self.cursor.max(record.seq);
        }
    }

    /// Drops the oldest until `incoming` more bytes fit the bound.
    fn make_room(&mut self, incoming: u64) -> u64 {
        let mut dropped = 0;
        while !self.entries.is_empty() && self.bytes + incoming > self.bounds.max_bytes {
            self.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Writes one record at the end of the active segment (a new one when
    /// it is full). A failed write is cut off again, so the segment never
    /// holds half a record before a whole one.
    fn append(&mut self, dir: &Path, record: &Record) -> std::io::Result<()> {
        if self.active.is_none() || self.active_len >= self.segment_bytes() {
            let path = dir.join(format!("{:020}{SEGMENT_SUFFIX}", record.seq));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            self.segments.push_back(Segment {
                first_seq: record.seq,
                path,
            });
            self.active = Some(file);
            self.active_len = 0;
        }
        let bytes = record.encode();
        let Some(file) = self.active.as_mut() else {
            return Err(std::io::Error::other("no active segment"));
        };
        if let Err(err) = file.write_all(&bytes) {
            if file.set_len(self.active_len).is_err() {
                // The segment may end in a torn record: start a new one.
                self.active = None;
            }
            return Err(err);
        }
        self.active_len += bytes.len() as u64;
        self.unsynced = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max_bytes: u64) -> Bounds {
        Bounds {
            max_bytes,
            ttl: Duration::from_secs(60),
        }
    }

    fn data(n: usize) -> String {
        format!(r#"{{"n":{n}}}"#)
    }

    #[test]
    fn messages_survive_a_reopen_and_acknowledged_ones_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) = Queue::open(dir.path(), bounds(1 << 20)).unwrap();
        let seqs: Vec<u64> = (0..10)
            .map(|n| queue.push("t", data(n), 1000).unwrap().seq.unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(queue.remove_through(seqs[3]), 4);
        queue.sync().unwrap();
        drop(queue);
        let (queue, dropped) = Queue::open(dir.path(), bounds(1 << 20)).unwrap();
        assert_eq!(dropped, 0);
        let left = queue.after(None, 100, 1 << 20);
        assert_eq!(
            left.iter().map(|r| r.seq).collect::<Vec<_>>(),
            seqs[4..].to_vec()
        );
        assert_eq!(left[0].data, data(4));
        let next = queue.push("t", data(10), 1000).unwrap().seq.unwrap();
        assert_eq!(next, seqs[9] + 1, "sequences are never reused");
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) = Queue::open(dir.path(), bounds(1 << 20)).unwrap();
        for n in 0..3 {
            queue.push("t", data(n), 1000).unwrap();
        }
        drop(queue);
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let (queue, _) = Queue::open(dir.path(), bounds(1 << 20)).unwrap();
        queue.push("t", data(3), 1000).unwrap();
        drop(queue);
        let (queue, _) = Queue::open(dir.path(), bounds(1 << 20)).unwrap();
        let all: Vec<String> = queue
            .after(None, 100, 1 << 20)
            .into_iter()
            .map(|r| r.data)
            .collect();
        assert_eq!(all, (0..4).map(data).collect::<Vec<_>>());
    }

    #[test]
    fn the_oldest_are_dropped_for_room_and_by_age_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let size = Record {
            seq: 0,
            enqueued_ms: 0,
            channel: "t".into(),
            data: data(0),
        }
        .size() as u64;
        let (queue, _) = Queue::open(dir.path(), bounds(5 * size)).unwrap();
        let mut dropped = 0;
        for n in 0..8 {
            dropped += queue.push("t", data(n), 1000 + n as u64).unwrap().dropped;
        }
        assert_eq!(dropped, 3);
        let kept: Vec<String> = queue
            .after(None, 100, 1 << 20)
            .into_iter()
            .map(|r| r.data)
            .collect();
        assert_eq!(kept, (3..8).map(data).collect::<Vec<_>>());
        let too_big = queue
            .push("t", "x".repeat(6 * size as usize), 2000)
            .unwrap();
        assert_eq!(
            too_big,
            Pushed {
                seq: None,
                dropped: 1
            }
        );
        assert_eq!(
            queue.stats(2000).messages,
            5,
            "a message too large alone drops nothing else"
        );
        // 60 s TTL: at 61.0045 s the first two (queued at 1.003, 1.004 s) are over it.
        assert_eq!(queue.expire(1004 + 60_001), 2);
        let stats = queue.stats(1004 + 60_001);
        assert_eq!(stats.messages, 3);
        assert_eq!(stats.bytes, 3 * size);
        assert!((stats.oldest_seconds - 60.0).abs() < 0.01, "{stats:?}");
    }

    #[test]
    fn delivered_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) = Queue::open(dir.path(), bounds(4096 * 8)).unwrap();
        let mut last = 0;
        for n in 0..2000 {
            last = queue.push("t", data(n), 1000).unwrap().seq.unwrap();
        }
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "seg")
                })
                .count()
        };
        assert!(segments() > 2, "{} segments", segments());
        queue.remove_through(last);
        queue.sync().unwrap();
        assert_eq!(segments(), 1, "only the active segment stays");
        assert_eq!(queue.stats(1000), Stats::default());
    }
}
