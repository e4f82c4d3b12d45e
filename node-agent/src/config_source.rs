//! Where the agent's config comes from: the built-in default, or a file that is
//! re-read when it changes (polled, so ConfigMap symlink swaps are seen too) or
//! on SIGHUP. A file with errors is refused and the last good config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgewire_api::{AgentConfig, ConfigError};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is invalid: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
}

pub async fn load(path: &Path) -> Result<(AgentConfig, Vec<u8>), LoadError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let config = parse(path, &bytes)?;
    Ok((config, bytes))
}

fn parse(path: &Path, bytes: &[u8]) -> Result<AgentConfig, LoadError> {
    let invalid = |source| LoadError::Invalid {
        path: path.to_path_buf(),
        source,
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| invalid(ConfigError::Syntax(format!("not UTF-8: {e}"))))?;
    AgentConfig::parse(text).map_err(invalid)
}

/// Re-reads `path` every `interval` and on SIGHUP, applying each new valid
/// content. Also retries services that failed to bind.
pub async fn watch(
    path: PathBuf,
    mut current: AgentConfig,
    mut last: Vec<u8>,
    agent: Arc<Agent>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP; relying on polling");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => true,
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot read config; keeping the last good one");
                continue;
            }
        };
        if bytes == last && !forced {
            if agent.has_failed_services().await {
                agent.apply(&current).await;
            }
            continue;
        }
        last = bytes;
        match parse(&path, &last) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "config changed; applying");
                agent.apply(&config).await;
                agent.metrics().config_reload(true);
                current = config;
            }
            Err(err) => {
                tracing::error!(error = %err, "config refused; the agent keeps running its last good config");
                agent.metrics().config_reload(false);
            }
        }
    }
}
