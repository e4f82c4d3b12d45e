//! Links from an edge service to a hub: another edgewire relay, reached by
//! URL, that chosen channels are bridged to (uplink), from (downlink), or
//! both. Uplinked messages wait in an on-disk queue while the hub is away.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// Where a service's hub is and how its queue is bounded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HubSpec {
    /// The hub's relay endpoint: `ws://host:port/relay` or `wss://...`.
    pub url: String,
    /// A file holding the bearer token the agent presents to the hub (the
    /// hub checks it like any client's, see `auth`). Read at each connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// PEM CA certificates that a `wss://` hub's certificate must chain to.
    /// Absent: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Bytes of uplink messages the on-disk queue holds at most; past it the
    /// oldest are dropped (and counted).
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u64,
    /// A queued message older than this (by this node's clock at enqueue)
    /// is dropped (and counted).
    #[serde(default = "default_ttl_seconds")]
    pub ttl_seconds: u64,
}

/// 64 MiB.
pub const DEFAULT_QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// One day.
pub const DEFAULT_TTL_SECONDS: u64 = 24 * 3600;
const MIN_QUEUE_BYTES: u64 = 4096;
const MAX_QUEUE_BYTES: u64 = 64 * 1024 * 1024 * 1024;

fn default_queue_bytes() -> u64 {
    DEFAULT_QUEUE_BYTES
}

fn default_ttl_seconds() -> u64 {
    DEFAULT_TTL_SECONDS
}

impl HubSpec {
    /// A hub at `url` with the default bounds and no credential.
    pub fn at(url: &str) -> HubSpec {
        HubSpec {
            url: url.into(),
            token_file: None,
            ca_file: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            ttl_seconds: DEFAULT_TTL_SECONDS,
        }
    }

    /// Whether the link runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("wss://")
    }

    pub fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let rest = self
            .url
            .strip_prefix("ws://")
            .or_else(|| self.url.strip_prefix("wss://"));
        let host_ok = rest.is_some_and(|rest| {
            let authority = rest.split('/').next().unwrap_or_default();
            !authority.is_empty() && !authority.contains(['@', '?', '#', ' '])
        });
        if !host_ok {
            errors.push(FieldError::new(
                format!("{at}.url"),
                format!(
                    "{:?} must be a ws:// or wss:// URL with a host, e.g. ws://hub.example:8765/relay",
                    self.url
                ),
            ));
        }
        for (field, value) in [("tokenFile", &self.token_file), ("caFile", &self.ca_file)] {
            if value.as_deref().is_some_and(str::is_empty) {
                errors.push(FieldError::new(format!("{at}.{field}"), "must name a file"));
            }
        }
        if self.ca_file.is_some() && !self.is_tls() {
            errors.push(FieldError::new(
                format!("{at}.caFile"),
                "only a wss:// hub takes a CA",
            ));
        }
        if !(MIN_QUEUE_BYTES..=MAX_QUEUE_BYTES).contains(&self.queue_bytes) {
            errors.push(FieldError::new(
                format!("{at}.queueBytes"),
                format!("must be between {MIN_QUEUE_BYTES} and {MAX_QUEUE_BYTES}"),
            ));
        }
        if self.ttl_seconds == 0 {
            errors.push(FieldError::new(
                format!("{at}.ttlSeconds"),
                "must be at least 1",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: &HubSpec) -> Vec<String> {
        let mut errors = Vec::new();
        spec.validate_into("hub", &mut errors);
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn urls_are_ws_or_wss_with_a_host() {
        for good in [
            "ws://127.0.0.1:8765/relay",
            "wss://hub.example/relay",
            "ws://h",
        ] {
            assert!(fields(&HubSpec::at(good)).is_empty(), "{good}");
        }
        for bad in [
            "http://h/relay",
            "ws://",
            "ws:///relay",
            "wss://u@h/",
            "hub:8765",
        ] {
            assert_eq!(fields(&HubSpec::at(bad)), ["hub.url"], "{bad}");
        }
    }

    #[test]
    fn the_hub_example_configs_are_valid() {
        let edge = crate::AgentConfig::parse(include_str!("../../examples/hub/edge.yaml")).unwrap();
        let service = &edge.services[0];
        assert!(service.is_uplink("telemetry") && !service.is_downlink("telemetry"));
        assert!(service.is_downlink("commands") && !service.is_uplink("commands"));
        assert!(service.is_uplink("chat") && service.is_downlink("chat"));
        assert!(!service.is_uplink("local") && !service.is_downlink("local"));
        crate::AgentConfig::parse(include_str!("../../examples/hub/hub.yaml")).unwrap();
    }

    #[test]
    fn a_hub_needs_a_bridged_channel_and_a_bridged_channel_a_hub() {
        let text = include_str!("../../examples/hub/edge.yaml");
        let mut config: crate::AgentConfig = serde_yaml_ng::from_str(text).unwrap();
        config.services[0].hub = None;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("services[0].channels[0]: uplink and downlink need the service's hub"),
            "{err}"
        );
        let mut config: crate::AgentConfig = serde_yaml_ng::from_str(text).unwrap();
        for channel in &mut config.services[0].channels {
            channel.uplink = false;
            channel.downlink = false;
        }
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("services[0].hub: no channel is marked uplink or downlink"),
            "{err}"
        );
    }

    #[test]
    fn bounds_and_files_are_checked() {
        let mut spec = HubSpec::at("ws://h/relay");
        spec.queue_bytes = 10;
        spec.ttl_seconds = 0;
        spec.token_file = Some(String::new());
        spec.ca_file = Some("ca.pem".into());
        assert_eq!(
            fields(&spec),
            [
                "hub.tokenFile",
                "hub.caFile",
                "hub.queueBytes",
                "hub.ttlSeconds"
            ]
        );
    }
}
