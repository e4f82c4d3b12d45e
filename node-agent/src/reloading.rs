//! A value built from files and built again when they change: a service's
//! TLS certificate and its token key. Rotating them (a new Secret volume
//! revision, a renewed certificate) needs no restart, so open connections
//! stay up; what they were admitted with stays theirs.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often, at most, the files are looked at: a burst of requests costs
/// one `stat` per file per interval, not one each.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What a file looked like when last read: a change means a rotation (or
/// half of one) happened.
type Stamp = (Option<SystemTime>, u64);

fn stamp_of(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    }
}

struct Loaded<T> {
    value: Arc<T>,
    stamps: Vec<Stamp>,
    checked: Instant,
}

/// The newest value that builds from the files; while they do not (half
/// written, or broken) the previous one stays in use.
pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    loaded: RwLock<Loaded<T>>,
}

impl<T> Reloading<T> {
    /// Builds the value once; an error here is the caller's to report.
    pub fn load<E>(paths: Vec<PathBuf>, build: impl FnOnce() -> Result<T, E>) -> Result<Self, E> {
        // Stamped before reading: a change during the read is seen next time.
        let stamps = paths.iter().map(|p| stamp_of(p)).collect();
        let value = Arc::new(build()?);
        Ok(Reloading {
            paths,
            loaded: RwLock::new(Loaded {
                value,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The value, built again first if a file changed since the last build
    /// (looked at no more than once per [`CHECK_EVERY`]).
    pub fn current<E: Display>(&self, build: impl FnOnce() -> Result<T, E>) -> Arc<T> {
        self.refresh(build);
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&loaded.value)
    }

    fn refresh<E: Display>(&self, build: impl FnOnce() -> Result<T, E>) {
        {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            if loaded.checked.elapsed() < CHECK_EVERY {
                return;
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() < CHECK_EVERY {
            return;
        }
        loaded.checked = Instant::now();
        let stamps: Vec<Stamp> = self.paths.iter().map(|p| stamp_of(p)).collect();
        if stamps == loaded.stamps {
            return;
        }
        let first = self.paths.first().map(|p| p.display().to_string());
        match build() {
            Ok(value) => {
                tracing::info!(file = first.unwrap_or_default(), "reloaded after a change");
                loaded.value = Arc::new(value);
                loaded.stamps = stamps;
            }
            // Mid-rotation or broken: keep what works and look again at the
            // next check.
            Err(err) => tracing::warn!(%err, "not reloaded; keeping the previous version"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_after_a_change_and_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("value");
        std::fs::write(&file, "1").unwrap();
        let read = || -> Result<u32, String> {
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            text.trim()
                .parse()
                .map_err(|e: std::num::ParseIntError| e.to_string())
        };
        let value = Reloading::load(vec![file.clone()], read).unwrap();
        assert_eq!(*value.current(read), 1);
        std::fs::write(&file, "22").unwrap();
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(50));
        assert_eq!(*value.current(read), 22);
        std::fs::write(&file, "not a number").unwrap();
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(50));
        assert_eq!(
            *value.current(read),
            22,
            "a broken file keeps the last value"
        );
    }
}
