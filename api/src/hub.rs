//! Links from an edge service to a hub: another edgewire relay, reached by
//! URL, that chosen channels are bridged to (uplink), from (downlink), or
//! both. Uplinked messages wait in an on-disk queue while the hub is away.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::auth::{SecretKeyRef, check_secret_key, check_secret_name};
use crate::error::FieldError;

/// Where a service's hub is and how its queue is bounded. The hub is an
/// edgewire relay (`ws://`, `wss://`) or a NATS server with JetStream
/// (`nats://`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HubSpec {
    /// The hub's relay endpoint, `ws://host:port/relay` or `wss://...`; or
    /// a NATS server with JetStream, `nats://host:port`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// A file holding the bearer token the agent presents to the hub (the
    /// hub checks it like any client's, see `auth`). Read at each connect.
    /// The standalone agent's only: an EdgeService uses `tokenSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub token_file: Option<String>,
    /// In an EdgeService, instead of `tokenFile`: the key of a Secret in
    /// its namespace holding the token. The agent stores it as a file of
    /// its own and reads that at each connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
    /// PEM CA certificates that a `wss://` hub's certificate must chain to.
    /// Absent: the system's roots. The standalone agent's only: an
    /// EdgeService uses `caSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub ca_file: Option<String>,
    /// In an EdgeService, instead of `caFile`: the key of a Secret in its
    /// namespace holding the PEM CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// A NATS hub: a file holding the user's NKEY seed (`SU...`) or a
    /// `.creds` file (user JWT and seed). Read at each connect. The
    /// standalone agent's only: an EdgeService uses `credentialsSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub credentials_file: Option<String>,
    /// In an EdgeService, instead of `credentialsFile`: the key of a Secret
    /// in its namespace holding the seed or the `.creds` text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretKeyRef>,
    /// Bytes of uplink messages the on-disk queue holds at most; past it the
    /// oldest are dropped (and counted).
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u64,
    /// A queued message older than this (by this node's clock at enqueue)
    /// is dropped (and counted).
    #[serde(default = "default_ttl_seconds")]
    pub ttl_seconds: u64,
    /// A NATS hub: the JetStream stream uplinked messages are stored in
    /// (made, over `<subjectPrefix>.>`, when missing). Default `EDGEWIRE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// A NATS hub: channel `C` is subject `<subjectPrefix>.C`. Default
    /// `edgewire`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
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
            token_secret: None,
            ca_file: None,
            ca_secret: None,
            credentials_file: None,
            credentials_secret: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            ttl_seconds: DEFAULT_TTL_SECONDS,
            stream: None,
            subject_prefix: None,
        }
    }

    /// Whether the hub is a NATS server (JetStream) rather than a relay.
    pub fn is_nats(&self) -> bool {
        self.url.starts_with("nats://")
    }

    /// A NATS hub's stream.
    pub fn stream_name(&self) -> &str {
        self.stream.as_deref().unwrap_or("EDGEWIRE")
    }

    /// The NATS subject of `channel`.
    pub fn subject(&self, channel: &str) -> String {
        format!(
            "{}.{channel}",
            self.subject_prefix.as_deref().unwrap_or("edgewire")
        )
    }

    /// Whether the link runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("wss://")
    }

    /// The Secrets this hub names, by field: `tokenSecret`, `caSecret`,
    /// `credentialsSecret`.
    pub fn secret_refs(&self) -> [(&'static str, Option<&SecretKeyRef>); 3] {
        [
            ("tokenSecret", self.token_secret.as_ref()),
            ("caSecret", self.ca_secret.as_ref()),
            ("credentialsSecret", self.credentials_secret.as_ref()),
        ]
    }

    /// Whether a CA may be named: a `wss://` hub, or a NATS hub (which then
    /// must serve TLS).
    pub fn takes_ca(&self) -> bool {
        self.is_tls() || self.is_nats()
    }

    pub fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let rest = self
            .url
            .strip_prefix("ws://")
            .or_else(|| self.url.strip_prefix("wss://"))
            .or_else(|| self.url.strip_prefix("nats://"));
        let host_ok = rest.is_some_and(|rest| {
            let authority = rest.split('/').next().unwrap_or_default();
            !authority.is_empty() && !authority.contains(['@', '?', '#', ' '])
        });
        if !host_ok {
            errors.push(FieldError::new(
                format!("{at}.url"),
                format!(
                    "{:?} must be a ws://, wss:// or nats:// URL with a host, e.g. ws://hub.example:8765/relay",
                    self.url
                ),
            ));
        }
        for (field, value) in [
            ("tokenFile", &self.token_file),
            ("caFile", &self.ca_file),
            ("credentialsFile", &self.credentials_file),
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                errors.push(FieldError::new(format!("{at}.{field}"), "must name a file"));
            }
        }
        for (field, file, secret) in [
            ("token", &self.token_file, &self.token_secret),
            ("ca", &self.ca_file, &self.ca_secret),
            (
                "credentials",
                &self.credentials_file,
                &self.credentials_secret,
            ),
        ] {
            if let Some(secret) = secret {
                let checked =
                    check_secret_name(&secret.name).and_then(|()| check_secret_key(&secret.key));
                if let Err(why) = checked {
                    errors.push(FieldError::new(format!("{at}.{field}Secret"), why));
                } else if file.is_some() {
                    errors.push(FieldError::new(
                        format!("{at}.{field}Secret"),
                        format!("exactly one of {field}File and {field}Secret may be set"),
                    ));
                }
            }
        }
        if (self.ca_file.is_some() || self.ca_secret.is_some()) && !self.takes_ca() {
            let field = if self.ca_file.is_some() {
                "caFile"
            } else {
                "caSecret"
            };
            errors.push(FieldError::new(
                format!("{at}.{field}"),
                "only a wss:// or nats:// hub takes a CA",
            ));
        }
        let credentials = self.credentials_file.is_some() || self.credentials_secret.is_some();
        let token = self.token_file.is_some() || self.token_secret.is_some();
        if credentials && !self.is_nats() {
            errors.push(FieldError::new(
                format!("{at}.credentialsFile"),
                "only a nats:// hub takes NATS credentials",
            ));
        } else if credentials && token {
            errors.push(FieldError::new(
                format!("{at}.credentialsFile"),
                "a NATS hub takes a token or credentials, not both",
            ));
        }
        let nats_names = [
            ("stream", &self.stream, "letters, digits, '-' and '_'"),
            (
                "subjectPrefix",
                &self.subject_prefix,
                "letters, digits, '-', '_' and '.'",
            ),
        ];
        for (field, value, allowed) in nats_names {
            let Some(value) = value else { continue };
            let ok = !value.is_empty()
                && value.len() <= 128
                && value.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || b == b'-'
                        || b == b'_'
                        || (b == b'.' && field == "subjectPrefix")
                })
                && !value.starts_with('.')
                && !value.ends_with('.');
            if !self.is_nats() {
                errors.push(FieldError::new(
                    format!("{at}.{field}"),
                    "only a nats:// hub takes it",
                ));
            } else if !ok {
                errors.push(FieldError::new(
                    format!("{at}.{field}"),
                    format!("{value:?} must be 1 to 128 of {allowed}"),
                ));
            }
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
        let es: crate::crd::EdgeService =
            serde_yaml_ng::from_str(include_str!("../../examples/hub/edgeservice.yaml")).unwrap();
        assert_eq!(
            crate::crd::referenced_secrets(&es.spec),
            std::collections::BTreeSet::from(["hub-credentials".to_string()])
        );
        assert_eq!(es.spec.channels, edge.services[0].channels);
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
    fn nats_names_are_checked_and_only_for_nats() {
        let mut spec = HubSpec::at("nats://h:4222");
        assert_eq!(spec.subject("telemetry"), "edgewire.telemetry");
        assert_eq!(spec.stream_name(), "EDGEWIRE");
        spec.stream = Some("a.b".into());
        spec.subject_prefix = Some("fleet.eu".into());
        assert_eq!(fields(&spec), ["hub.stream"]);
        assert_eq!(spec.subject("t"), "fleet.eu.t");
        let mut relay = HubSpec::at("ws://h/relay");
        relay.stream = Some("S".into());
        assert_eq!(fields(&relay), ["hub.stream"]);
    }

    #[test]
    fn a_credential_comes_from_a_file_or_a_secret_never_both() {
        let secret = |name: &str, key: &str| {
            Some(SecretKeyRef {
                name: name.into(),
                key: key.into(),
            })
        };
        let mut spec = HubSpec::at("wss://h/relay");
        spec.token_secret = secret("hub", "token");
        spec.ca_secret = secret("hub", "ca.crt");
        assert!(fields(&spec).is_empty(), "{:?}", fields(&spec));
        spec.token_file = Some("/t".into());
        spec.ca_secret = secret("Hub", "..");
        assert_eq!(fields(&spec), ["hub.tokenSecret", "hub.caSecret"]);
        let mut plain = HubSpec::at("ws://h/relay");
        plain.ca_secret = secret("hub", "ca.crt");
        assert_eq!(fields(&plain), ["hub.caSecret"]);
        plain.ca_secret = None;
        plain.credentials_file = Some("/user.creds".into());
        assert_eq!(fields(&plain), ["hub.credentialsFile"]);

        let mut nats = HubSpec::at("nats://h:4222");
        nats.ca_file = Some("/ca.pem".into());
        nats.credentials_secret = secret("nats", "user.creds");
        assert!(fields(&nats).is_empty(), "{:?}", fields(&nats));
        nats.token_file = Some("/t".into());
        assert_eq!(fields(&nats), ["hub.credentialsFile"]);
        nats.token_file = None;
        nats.credentials_file = Some("/user.creds".into());
        assert_eq!(fields(&nats), ["hub.credentialsSecret"]);
    }

    #[test]
    fn an_agent_config_names_files_not_secrets() {
        let err = crate::AgentConfig::parse(
            r#"
services:
  - name: edge
    port: 0
    channels: [{name: t, uplink: true}]
    hub: {url: "nats://h:4222", credentialsSecret: {name: hub, key: creds}, caSecret: {name: hub, key: ca}}
    auth: {algorithm: HS256, keySecret: {name: jwt, key: secret}}
    handlers:
      - {name: u, kind: upstream, upstream: {url: "https://c/u", caSecret: {name: c, key: ca}}}
"#,
        )
        .unwrap_err()
        .to_string();
        for field in [
            "services[0].auth.keySecret",
            "services[0].hub.credentialsSecret",
            "services[0].hub.caSecret",
            "services[0].handlers[0].upstream.caSecret",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
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
