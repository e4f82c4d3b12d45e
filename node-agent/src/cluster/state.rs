//! The last config the agent received from the cluster, kept on local disk
//! so that a restart without the API server still serves (edge autonomy).

use std::path::{Path, PathBuf};

use edgewire_api::AgentConfig;

const FILE: &str = "config.json";

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The stored config, if there is a valid one.
pub fn load(dir: &Path) -> Option<AgentConfig> {
    let text = std::fs::read_to_string(path(dir)).ok()?;
    match AgentConfig::parse(&text) {
        Ok(config) => Some(config),
        Err(err) => {
            tracing::warn!(path = %path(dir).display(), %err, "ignoring an unreadable stored config");
            None
        }
    }
}

/// Writes the config atomically (temporary file, fsync, rename), so a crash
/// never leaves half a file.
pub fn save(dir: &Path, config: &AgentConfig) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(config).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_none());
        let config = AgentConfig::builtin_default();
        save(dir.path(), &config).unwrap();
        assert_eq!(load(dir.path()), Some(config));
        std::fs::write(path(dir.path()), "{garbage").unwrap();
        assert!(load(dir.path()).is_none());
    }
}
