//! The agent's configuration: the services it runs, each on its own port, with
//! its handlers, channels and limits. The standalone agent reads it from a file;
//! in a cluster the same type is what an EdgeService's placement renders into.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, FieldError};

/// Everything one agent serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// One listening port serving HTTP handlers, WebSocket handlers and the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    /// A DNS label, unique within the config; it is the `service` label of every metric.
    pub name: String,
    /// The TCP port. 0 asks the operating system for a free one (used by tests).
    pub port: u16,
    /// Handlers, each bound to a path and callable over the relay by name.
    #[serde(default)]
    pub handlers: Vec<HandlerSpec>,
    /// The channels clients may subscribe and publish to on the relay.
    #[serde(default)]
    pub channels: Vec<ChannelSpec>,
    /// The path where WebSocket clients speak the JSON envelope protocol.
    #[serde(default = "default_relay_path")]
    pub relay_path: String,
    #[serde(default)]
    pub limits: Limits,
    /// The other agents that run this service: channels span all of them
    /// through the mesh. In a cluster the agent fills this from the
    /// EdgeService's placement; a standalone config may list peers itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerSpec>,
    /// Client authentication with JWTs. Absent: the service is open to every
    /// client, as the seed's clients expect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<crate::auth::AuthSpec>,
    /// Serve `wss://` and `https://` with this certificate. Absent: plain
    /// `ws://` and `http://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsSpec>,
    /// A hub this service links to, for the channels marked `uplink` or
    /// `downlink`. Its credential and CA come from files (`tokenFile`,
    /// `caFile`); an EdgeService names Secrets instead, which the agent
    /// stores as files before the config reaches here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<crate::hub::HubSpec>,
}

/// Another agent running the same service, reached on its mesh port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerSpec {
    /// The peer's node name; it must match the name the peer authenticates with.
    pub node: String,
    /// `host:port` of the peer's mesh listener.
    pub address: String,
    /// The peer's mesh public key (X25519, 64 hex digits): the link is
    /// refused unless the peer proves it holds the matching private key.
    /// Required; `edgewire-agent --print-mesh-public-key` prints a node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// Whether `text` is a mesh public key: 32 bytes as 64 hex digits.
pub fn is_mesh_public_key(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A compute or WebSocket handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandlerSpec {
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    pub kind: HandlerKind,
    /// Where the handler answers over HTTP (and, for `echo`, WebSocket). A handler
    /// without a path is reachable only through the relay's `call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), regex(pattern = r"^/[^?#\s]*$"))]
    pub path: Option<String>,
    /// For `kind: wasm`: where the component comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleSource>,
    /// For `kind: wasm`: what one call may use. Every field has a safe default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WasmLimits>,
    /// For `kind: wasm`: the hosts (`host` or `host:port`) the component may
    /// send HTTP requests to. Empty, the default, denies all outbound HTTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_outbound_hosts: Vec<String>,
    /// For `kind: upstream`: the URL it forwards to and the bounds on each
    /// forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<crate::upstream::UpstreamSpec>,
}

impl HandlerSpec {
    /// A built-in handler (no module, no Wasm limits).
    pub fn builtin(name: &str, kind: HandlerKind, path: Option<&str>) -> HandlerSpec {
        HandlerSpec {
            name: name.into(),
            kind,
            path: path.map(Into::into),
            module: None,
            limits: None,
            allowed_outbound_hosts: Vec::new(),
            upstream: None,
        }
    }

    /// The Wasm limits in force: the handler's, or the defaults.
    pub fn wasm_limits(&self) -> WasmLimits {
        self.limits.clone().unwrap_or_default()
    }
}

/// Where a `wasm` handler's component comes from: exactly one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModuleSource {
    /// A path on the node (the standalone agent). A relative path is taken
    /// from the agent's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub file: Option<String>,
    /// A key of a ConfigMap's `binaryData` in the EdgeService's namespace (in a
    /// cluster; a ConfigMap holds at most 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,
    /// An OCI reference (`registry/repository:tag` or `...@sha256:...`) to a
    /// Wasm artifact: a manifest with one `application/wasm` layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,
    /// For `image`: the manifest digest (`sha256:` and 64 hex digits) the
    /// reference must resolve to; any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub digest: Option<String>,
    /// For `image` in a cluster: a `kubernetes.io/dockerconfigjson` Secret in
    /// the EdgeService's namespace with the registry's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub image_pull_secret: Option<String>,
    /// For `image`: speak plain HTTP to the registry instead of HTTPS (a
    /// registry on loopback or a trusted network only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

impl ModuleSource {
    /// A module read from a file on the node.
    pub fn file(path: impl Into<String>) -> ModuleSource {
        ModuleSource {
            file: Some(path.into()),
            config_map: None,
            image: None,
            digest: None,
            image_pull_secret: None,
            plain_http: false,
        }
    }
}

/// Whether `text` is a manifest digest as `module.digest` takes it.
pub fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// One `binaryData` key of a ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKey {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What one call of a `wasm` handler may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WasmLimits {
    /// Wall-clock time for one call, from instantiation to the end of the
    /// response body; past it the call is stopped and answers 504.
    #[schemars(range(min = 1, max = 300000))]
    pub timeout_ms: u32,
    /// The most linear memory (and table space) one instance may grow to; a
    /// call that needs more fails with 500.
    #[schemars(range(min = 65536, max = 4294967296u64))]
    pub max_memory_bytes: u64,
    /// Calls running at once; more answer 503 at once rather than queue.
    #[schemars(range(min = 1, max = 1000))]
    pub max_instances: u32,
    /// The largest request body passed to the component; larger answers 413.
    #[schemars(range(min = 0, max = 16777216))]
    pub max_request_bytes: u32,
    /// The largest response body taken from the component; larger answers 502.
    #[schemars(range(min = 0, max = 16777216))]
    pub max_response_bytes: u32,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            timeout_ms: 1_000,
            max_memory_bytes: 64 * 1024 * 1024,
            max_instances: 16,
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 1024 * 1024,
        }
    }
}

const WASM_PAGE: u64 = 64 * 1024;
const MAX_WASM_MEMORY: u64 = 4 * 1024 * 1024 * 1024;
const MAX_WASM_BODY: u32 = 16 * 1024 * 1024;
const MAX_WASM_TIMEOUT_MS: u32 = 300_000;
const MAX_WASM_INSTANCES: u32 = 1000;

impl WasmLimits {
    fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let mut check = |field: &str, ok: bool, why: String| {
            if !ok {
                errors.push(FieldError::new(format!("{at}.{field}"), why));
            }
        };
        check(
            "timeoutMs",
            (1..=MAX_WASM_TIMEOUT_MS).contains(&self.timeout_ms),
            format!("must be between 1 and {MAX_WASM_TIMEOUT_MS}"),
        );
        check(
            "maxMemoryBytes",
            (WASM_PAGE..=MAX_WASM_MEMORY).contains(&self.max_memory_bytes),
            format!("must be between one Wasm page ({WASM_PAGE}) and {MAX_WASM_MEMORY}"),
        );
        check(
            "maxInstances",
            (1..=MAX_WASM_INSTANCES).contains(&self.max_instances),
            format!("must be between 1 and {MAX_WASM_INSTANCES}"),
        );
        check(
            "maxRequestBytes",
            self.max_request_bytes <= MAX_WASM_BODY,
            format!("must be at most {MAX_WASM_BODY}"),
        );
        check(
            "maxResponseBytes",
            self.max_response_bytes <= MAX_WASM_BODY,
            format!("must be at most {MAX_WASM_BODY}"),
        );
    }
}

/// What a handler does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// WebSocket: answers each text message with `Echo: <text>`.
    /// HTTP: `GET <path>?text=hi` answers `Echo: hi`. Relay call: `{"text": "hi"}`.
    Echo,
    /// HTTP: `GET <path>?a=1&b=2` answers `{"result": 3}`. Relay call: `{"a": 1, "b": 2}`.
    Add,
    /// The user's own WebAssembly component (a standard `wasi:http/incoming-handler`)
    /// from `module`. HTTP: the request passed through. Relay call: the args
    /// as a JSON POST body, the JSON response body as `result`. Channel
    /// processor: see [`ChannelSpec::processor`].
    Wasm,
    /// A forward to the HTTP(S) service at `upstream.url` (in the cloud, or
    /// beside the agent). HTTP: the request passed through (method, headers
    /// but hop-by-hop ones, query, body) and the upstream's answer passed
    /// back. Relay call: the args as a JSON POST body, the JSON response
    /// body as `result`.
    Upstream,
}

impl HandlerKind {
    pub const ALL: [HandlerKind; 4] = [
        HandlerKind::Echo,
        HandlerKind::Add,
        HandlerKind::Wasm,
        HandlerKind::Upstream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Echo => "echo",
            HandlerKind::Add => "add",
            HandlerKind::Wasm => "wasm",
            HandlerKind::Upstream => "upstream",
        }
    }
}

/// A named pub/sub channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelSpec {
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._/-]+$"))]
    pub name: String,
    /// A `wasm` handler of the same service that each message published on
    /// this channel at this node passes through before delivery: it gets a
    /// POST whose body is the message's `data` (header `edgewire-channel`
    /// names the channel) and answers a JSON array of the `data` of the
    /// messages to deliver instead (`[]` drops the message). Messages from
    /// mesh peers were processed where they were published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<String>,
    /// Every message published on this channel at this node is also sent to
    /// the same channel at the service's `hub` (stored while the hub is away).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uplink: bool,
    /// Messages published on this channel at the service's `hub` reach this
    /// channel's subscribers here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downlink: bool,
}

impl ChannelSpec {
    pub fn named(name: &str) -> ChannelSpec {
        ChannelSpec {
            name: name.into(),
            processor: None,
            uplink: false,
            downlink: false,
        }
    }
}

/// What a client that cannot keep up gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 1008 (policy violation), as NATS does: the client
    /// learns it lost messages instead of silently missing some.
    #[default]
    Disconnect,
    /// Keep the connection and drop the messages that do not fit its queue.
    Drop,
}

/// Per-service limits. Every field has a default, so `limits: {}` is valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Open WebSocket connections; an upgrade beyond it answers HTTP 503.
    #[schemars(range(min = 1))]
    pub max_connections: u32,
    /// Largest message (and frame) a client may send; larger closes with 1009.
    #[schemars(range(min = 64, max = 16777216))]
    pub max_message_bytes: u32,
    /// Messages queued for one connection before the slow-consumer policy applies.
    #[schemars(range(min = 1, max = 65536))]
    pub send_queue_messages: u32,
    /// Bytes queued for one connection before the slow-consumer policy
    /// applies. Default: 8 MiB, or twice `maxMessageBytes` when that is more.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 1073741824))]
    pub send_queue_bytes: Option<u32>,
    pub slow_consumer: SlowConsumerPolicy,
    /// How often the agent pings each client.
    #[schemars(range(min = 1))]
    pub ping_interval_seconds: u32,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout_seconds: u32,
    /// Time from TCP accept to a complete HTTP request or WebSocket upgrade.
    #[schemars(range(min = 1))]
    pub handshake_timeout_seconds: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_message_bytes: 64 * 1024,
            // Room for a burst from a fast publisher; the queue allocates
            // as it fills, so an idle connection pays nothing for it.
            send_queue_messages: 4096,
            send_queue_bytes: None,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            ping_interval_seconds: 20,
            idle_timeout_seconds: 60,
            handshake_timeout_seconds: 5,
        }
    }
}

pub const MAX_MESSAGE_BYTES_CEILING: u32 = 16 * 1024 * 1024;
const MIN_MESSAGE_BYTES: u32 = 64;
const MAX_SEND_QUEUE: u32 = 1 << 16;
const MAX_SEND_QUEUE_BYTES: u32 = 1 << 30;
/// The default of [`Limits::send_queue_bytes`].
pub const DEFAULT_SEND_QUEUE_BYTES: u32 = 8 * 1024 * 1024;
const MAX_CHANNEL_NAME: usize = 128;

fn default_relay_path() -> String {
    "/relay".to_string()
}

impl AgentConfig {
    /// The config the agent runs when it is given none: the seed's two services
    /// on the seed's ports, plus the relay on the echo service.
    pub fn builtin_default() -> AgentConfig {
        AgentConfig {
            services: vec![
                ServiceConfig {
                    name: "echo".into(),
                    port: 8765,
                    handlers: vec![
                        HandlerSpec::builtin("echo", HandlerKind::Echo, Some("/")),
                        HandlerSpec::builtin("add", HandlerKind::Add, Some("/add")),
                    ],
                    channels: vec![ChannelSpec::named("chat"), ChannelSpec::named("telemetry")],
                    relay_path: default_relay_path(),
                    limits: Limits::default(),
                    peers: vec![],
                    auth: None,
                    tls: None,
                    hub: None,
                },
                ServiceConfig {
                    name: "compute".into(),
                    port: 5000,
                    handlers: vec![HandlerSpec::builtin("add", HandlerKind::Add, Some("/add"))],
                    channels: vec![],
                    relay_path: default_relay_path(),
                    limits: Limits::default(),
                    peers: vec![],
                    auth: None,
                    tls: None,
                    hub: None,
                },
            ],
        }
    }

    /// Parses YAML or JSON (JSON is YAML) and validates the result.
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = serde_yaml_ng::from_str(text).map_err(ConfigError::from_yaml)?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_yaml_ng::to_string(self).map_err(ConfigError::from_yaml)
    }

    /// Checks what the types cannot: names, uniqueness, paths and bounds. Every
    /// problem is reported, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if !names.insert(service.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{at}.name"),
                    format!("duplicate service name {:?}", service.name),
                ));
            }
            if service.port != 0 && !ports.insert(service.port) {
                errors.push(FieldError::new(
                    format!("{at}.port"),
                    format!("port {} is used by another service", service.port),
                ));
            }
            service.validate_into(&at, &mut errors);
            service.refuse_secret_refs_into(&at, &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl ServiceConfig {
    /// Validates one service on its own, prefixing each field with `at`.
    pub fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        if let Err(why) = check_service_name(&self.name) {
            errors.push(FieldError::new(format!("{at}.name"), why));
        }
        for (j, peer) in self.peers.iter().enumerate() {
            if peer.node.is_empty() {
                errors.push(FieldError::new(
                    format!("{at}.peers[{j}].node"),
                    "must not be empty",
                ));
            }
            if !peer.address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            }) {
                errors.push(FieldError::new(
                    format!("{at}.peers[{j}].address"),
                    format!("{:?} must be host:port", peer.address),
                ));
            }
            if !peer.public_key.as_deref().is_some_and(is_mesh_public_key) {
                errors.push(FieldError::new(
                    format!("{at}.peers[{j}].publicKey"),
                    "must be the peer's mesh public key, 64 hex digits \
                     (edgewire-agent --print-mesh-public-key on that node)",
                ));
            }
        }
        if let Err(why) = check_path(&self.relay_path) {
            errors.push(FieldError::new(format!("{at}.relayPath"), why));
        }

        let mut handler_names = BTreeSet::new();
        let mut paths = BTreeSet::new();
        paths.insert(self.relay_path.as_str());
        for (j, handler) in self.handlers.iter().enumerate() {
            let hat = format!("{at}.handlers[{j}]");
            if let Err(why) = check_dns_label(&handler.name) {
                errors.push(FieldError::new(format!("{hat}.name"), why));
            } else if !handler_names.insert(handler.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{hat}.name"),
                    format!("duplicate handler name {:?}", handler.name),
                ));
            }
            handler.validate_wasm_into(&hat, errors);
            handler.validate_upstream_into(&hat, errors);
            if let Some(path) = &handler.path {
                if let Err(why) = check_path(path) {
                    errors.push(FieldError::new(format!("{hat}.path"), why));
                } else if !paths.insert(path.as_str()) {
                    let what = if *path == self.relay_path {
                        "the relay path".to_string()
                    } else {
                        "another handler".to_string()
                    };
                    errors.push(FieldError::new(
                        format!("{hat}.path"),
                        format!("path {path:?} is already used by {what}"),
                    ));
                }
            }
        }

        let mut channel_names = BTreeSet::new();
        for (j, channel) in self.channels.iter().enumerate() {
            let field = format!("{at}.channels[{j}].name");
            if let Err(why) = check_channel_name(&channel.name) {
                errors.push(FieldError::new(field, why));
            } else if !channel_names.insert(channel.name.as_str()) {
                errors.push(FieldError::new(
                    field,
                    format!("duplicate channel {:?}", channel.name),
                ));
            }
            if let Some(processor) = &channel.processor {
                let field = format!("{at}.channels[{j}].processor");
                match self.handler(processor) {
                    Some(h) if h.kind == HandlerKind::Wasm => {}
                    Some(_) => errors.push(FieldError::new(
                        field,
                        format!("handler {processor:?} is not a wasm handler"),
                    )),
                    None => errors.push(FieldError::new(
                        field,
                        format!("no handler {processor:?} in this service"),
                    )),
                }
            }
        }

        self.validate_hub_into(at, errors);
        self.limits.validate_into(&format!("{at}.limits"), errors);
        if let Some(auth) = &self.auth {
            auth.validate_into(&format!("{at}.auth"), errors);
        }
        if let Some(tls) = &self.tls {
            tls.validate_into(&format!("{at}.tls"), errors);
        }
    }

    /// The token key's, hub's and upstreams' Secret references are an
    /// EdgeService's: an agent config names files (in a cluster the agent
    /// has replaced each Secret with the file it stored it in before the
    /// config gets here).
    fn refuse_secret_refs_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let why = "names a Secret, which only an EdgeService can; an agent config names a file";
        if self.auth.as_ref().is_some_and(|a| a.key_secret.is_some()) {
            errors.push(FieldError::new(format!("{at}.auth.keySecret"), why));
        }
        if let Some(hub) = &self.hub {
            for (field, secret) in hub.secret_refs() {
                if secret.is_some() {
                    errors.push(FieldError::new(format!("{at}.hub.{field}"), why));
                }
            }
        }
        for (j, handler) in self.handlers.iter().enumerate() {
            if handler
                .upstream
                .as_ref()
                .is_some_and(|u| u.ca_secret.is_some())
            {
                errors.push(FieldError::new(
                    format!("{at}.handlers[{j}].upstream.caSecret"),
                    why,
                ));
            }
        }
    }

    /// A hub needs a channel to bridge, and a bridged channel needs a hub.
    fn validate_hub_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let bridged = self.channels.iter().any(|c| c.uplink || c.downlink);
        match &self.hub {
            Some(hub) => {
                hub.validate_into(&format!("{at}.hub"), errors);
                if !bridged {
                    errors.push(FieldError::new(
                        format!("{at}.hub"),
                        "no channel is marked uplink or downlink",
                    ));
                }
            }
            None => {
                for (j, channel) in self.channels.iter().enumerate() {
                    if channel.uplink || channel.downlink {
                        errors.push(FieldError::new(
                            format!("{at}.channels[{j}]"),
                            "uplink and downlink need the service's hub",
                        ));
                    }
                }
            }
        }
    }

    /// Whether messages published here on `channel` go up to the hub.
    pub fn is_uplink(&self, channel: &str) -> bool {
        self.hub.is_some() && self.channels.iter().any(|c| c.name == channel && c.uplink)
    }

    /// Whether the hub's messages on `channel` come down to this node.
    pub fn is_downlink(&self, channel: &str) -> bool {
        self.hub.is_some()
            && self
                .channels
                .iter()
                .any(|c| c.name == channel && c.downlink)
    }

    pub fn handler(&self, name: &str) -> Option<&HandlerSpec> {
        self.handlers.iter().find(|h| h.name == name)
    }

    pub fn has_channel(&self, name: &str) -> bool {
        self.channels.iter().any(|c| c.name == name)
    }

    /// The wasm handler that processes what is published on `channel`.
    pub fn processor(&self, channel: &str) -> Option<&str> {
        self.channels
            .iter()
            .find(|c| c.name == channel)
            .and_then(|c| c.processor.as_deref())
    }
}

impl HandlerSpec {
    /// A `wasm` handler needs exactly one module source; the Wasm fields mean
    /// nothing on a built-in handler, so they are refused there.
    fn validate_wasm_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        if self.kind != HandlerKind::Wasm {
            for (field, set) in [
                ("module", self.module.is_some()),
                ("limits", self.limits.is_some()),
                (
                    "allowedOutboundHosts",
                    !self.allowed_outbound_hosts.is_empty(),
                ),
            ] {
                if set {
                    errors.push(FieldError::new(
                        format!("{at}.{field}"),
                        format!("only a wasm handler takes {field}"),
                    ));
                }
            }
            return;
        }
        match &self.module {
            None => errors.push(FieldError::new(
                format!("{at}.module"),
                "a wasm handler needs a module (file, configMap or image)",
            )),
            Some(module) => module.validate_into(&format!("{at}.module"), errors),
        }
        if let Some(limits) = &self.limits {
            limits.validate_into(&format!("{at}.limits"), errors);
        }
        for (k, host) in self.allowed_outbound_hosts.iter().enumerate() {
            let ok = !host.is_empty()
                && host.len() <= 253
                && !host.contains(['/', '?', '#', '@'])
                && !host.chars().any(char::is_whitespace);
            if !ok {
                errors.push(FieldError::new(
                    format!("{at}.allowedOutboundHosts[{k}]"),
                    format!("{host:?} must be a host or host:port, without a scheme or path"),
                ));
            }
        }
    }
}

impl ModuleSource {
    fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let sources = [
            self.file.is_some(),
            self.config_map.is_some(),
            self.image.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() != 1 {
            errors.push(FieldError::new(
                at,
                "exactly one of file, configMap and image must be set",
            ));
        }
        if let Some(image) = &self.image
            && (image.is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace))
        {
            errors.push(FieldError::new(
                format!("{at}.image"),
                format!("{image:?} is not an OCI reference"),
            ));
        }
        if let Some(digest) = &self.digest
            && !is_sha256_digest(digest)
        {
            errors.push(FieldError::new(
                format!("{at}.digest"),
                format!("{digest:?} must be sha256: and 64 lowercase hex digits"),
            ));
        }
        if self.image.is_none() {
            for (field, set) in [
                ("digest", self.digest.is_some()),
                ("imagePullSecret", self.image_pull_secret.is_some()),
                ("plainHttp", self.plain_http),
            ] {
                if set {
                    errors.push(FieldError::new(
                        format!("{at}.{field}"),
                        format!("only an image module takes {field}"),
                    ));
                }
            }
        }
    }
}

impl Limits {
    /// The bytes one connection may have queued: `sendQueueBytes`, or its
    /// default.
    pub fn send_queue_bytes(&self) -> usize {
        let bytes = self.send_queue_bytes.unwrap_or_else(|| {
            DEFAULT_SEND_QUEUE_BYTES.max(self.max_message_bytes.saturating_mul(2))
        });
        bytes as usize
    }

    fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        let mut check = |field: &str, ok: bool, why: String| {
            if !ok {
                errors.push(FieldError::new(format!("{at}.{field}"), why));
            }
        };
        check(
            "maxConnections",
            self.max_connections >= 1,
            "must be at least 1".into(),
        );
        check(
            "maxMessageBytes",
            (MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES_CEILING).contains(&self.max_message_bytes),
            format!("must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES_CEILING}"),
        );
        check(
            "sendQueueMessages",
            (1..=MAX_SEND_QUEUE).contains(&self.send_queue_messages),
            format!("must be between 1 and {MAX_SEND_QUEUE}"),
        );
        if let Some(bytes) = self.send_queue_bytes {
            check(
                "sendQueueBytes",
                bytes >= self.max_message_bytes && bytes <= MAX_SEND_QUEUE_BYTES,
                format!(
                    "must be between maxMessageBytes ({}) and {MAX_SEND_QUEUE_BYTES}, so the largest message fits",
                    self.max_message_bytes
                ),
            );
        }
        check(
            "pingIntervalSeconds",
            self.ping_interval_seconds >= 1,
            "must be at least 1".into(),
        );
        check(
            "idleTimeoutSeconds",
            self.idle_timeout_seconds > self.ping_interval_seconds,
            "must be longer than pingIntervalSeconds, or every pinged client would time out".into(),
        );
        check(
            "handshakeTimeoutSeconds",
            self.handshake_timeout_seconds >= 1,
            "must be at least 1".into(),
        );
    }
}

/// A service is named by a DNS label, or `namespace/name` (two labels) when
/// rendered from an EdgeService.
pub fn check_service_name(name: &str) -> Result<(), String> {
    match name.split_once('/') {
        Some((namespace, rest)) => check_dns_label(namespace).and_then(|()| check_dns_label(rest)),
        None => check_dns_label(name),
    }
}

/// RFC 1123 label: what Kubernetes accepts as a name and Prometheus as a label value.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > 63 {
        Err(format!("{name:?} must be 1 to 63 characters"))
    } else if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        Err(format!(
            "{name:?} must be lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    } else {
        Ok(())
    }
}

/// Channel names are opaque to the agent but travel in JSON and logs, so they are
/// kept to a printable, unambiguous set.
pub fn check_channel_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
        Err(format!(
            "{name:?} must be 1 to {MAX_CHANNEL_NAME} characters"
        ))
    } else if !ok_chars {
        Err(format!(
            "{name:?} may hold only letters, digits, '-', '_', '.' and '/'"
        ))
    } else {
        Ok(())
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        Err(format!("{path:?} must begin with '/'"))
    } else if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace()) {
        Err(format!(
            "{path:?} must be a plain path, without spaces, '?' or '#'"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(err: ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid(errors) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected validation errors, got {other}"),
        }
    }

    #[test]
    fn send_queue_bytes_defaults_to_room_for_large_messages_and_must_hold_one() {
        let mut limits = Limits::default();
        assert_eq!(limits.send_queue_bytes(), 8 * 1024 * 1024);
        limits.max_message_bytes = 16 * 1024 * 1024;
        assert_eq!(limits.send_queue_bytes(), 32 * 1024 * 1024);
        limits.send_queue_bytes = Some(1024 * 1024);
        let mut errors = Vec::new();
        limits.validate_into("limits", &mut errors);
        assert_eq!(
            errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(),
            ["limits.sendQueueBytes"],
            "smaller than the largest message"
        );
        limits.send_queue_bytes = Some(16 * 1024 * 1024);
        let mut errors = Vec::new();
        limits.validate_into("limits", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(limits.send_queue_bytes(), 16 * 1024 * 1024);
    }

    #[test]
    fn builtin_default_is_valid_and_serves_the_seed_ports() {
        let config = AgentConfig::builtin_default();
        config.validate().expect("default config must validate");
        let ports: Vec<u16> = config.services.iter().map(|s| s.port).collect();
        assert_eq!(ports, vec![8765, 5000]);
    }

    #[test]
    fn round_trips_through_yaml() {
        let config = AgentConfig::builtin_default();
        let text = serde_yaml_ng::to_string(&config).unwrap();
        assert_eq!(AgentConfig::parse(&text).unwrap(), config);
    }

    #[test]
    fn parses_json_and_fills_defaults() {
        let config = AgentConfig::parse(
            r#"{"services":[{"name":"a","port":9000,"handlers":[{"name":"echo","kind":"echo","path":"/"}]}]}"#,
        )
        .unwrap();
        let service = &config.services[0];
        assert_eq!(service.relay_path, "/relay");
        assert_eq!(service.limits, Limits::default());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = AgentConfig::parse("services:\n  - name: a\n    prot: 1\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("prot"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = AgentConfig::parse("services:\n  - name: a\n    port: eighty\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("services[0].port"), "{text}");
    }

    #[test]
    fn unknown_handler_kind_is_refused() {
        let err = AgentConfig::parse(
            "services:\n  - name: a\n    port: 1\n    handlers:\n      - {name: x, kind: rot13}\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("rot13") && text.contains("handlers[0].kind"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut config = AgentConfig::builtin_default();
        config.services[1].name = "echo".into();
        config.services[1].port = 8765;
        config.services[0].handlers[1].path = Some("/".into());
        config.services[0].handlers[0].path = Some("no-slash".into());
        config.services[0].channels.push(ChannelSpec::named("chat"));
        config.services[0]
            .channels
            .push(ChannelSpec::named("bad channel"));
        config.services[0].limits.max_message_bytes = 1;
        config.services[0].limits.idle_timeout_seconds = 5;
        config.services[0].limits.ping_interval_seconds = 10;
        let got = fields(config.validate().unwrap_err());
        assert_eq!(
            got,
            vec![
                "services[0].handlers[0].path",
                "services[0].channels[2].name",
                "services[0].channels[3].name",
                "services[0].limits.maxMessageBytes",
                "services[0].limits.idleTimeoutSeconds",
                "services[1].name",
                "services[1].port",
            ]
        );
    }

    #[test]
    fn handler_path_may_not_take_the_relay_path() {
        let mut config = AgentConfig::builtin_default();
        config.services[0].handlers[0].path = Some("/relay".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("services[0].handlers[0].path"), "{err}");
        assert!(err.contains("relay path"), "{err}");
    }

    #[test]
    fn service_names_may_carry_a_namespace() {
        assert!(check_service_name("edge/chat").is_ok());
        for bad in ["edge/", "/chat", "a/b/c", "Edge/chat"] {
            assert!(check_service_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn peers_need_host_and_port() {
        let mut config = AgentConfig::builtin_default();
        config.services[0].peers = vec![
            PeerSpec {
                node: "b".into(),
                address: "127.0.0.2:7946".into(),
                public_key: Some("0f".repeat(32)),
            },
            PeerSpec {
                node: "".into(),
                address: "nowhere".into(),
                public_key: Some("0f".into()),
            },
        ];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("services[0].peers[1].node"), "{err}");
        assert!(err.contains("services[0].peers[1].address"), "{err}");
        assert!(err.contains("services[0].peers[1].publicKey"), "{err}");
        assert!(!err.contains("peers[0]"), "{err}");
    }

    #[test]
    fn wasm_handlers_need_one_module_and_processors_a_wasm_handler() {
        let config = AgentConfig::parse(
            r#"
services:
  - name: edge
    port: 0
    handlers:
      - name: add
        kind: wasm
        path: /add
        module: {file: add.wasm}
        limits: {timeoutMs: 200}
        allowedOutboundHosts: ["api.example.com:443"]
      - {name: filter, kind: wasm, module: {configMap: {name: mods, key: filter.wasm}}}
      - {name: echo, kind: echo, path: /}
    channels:
      - {name: telemetry, processor: filter}
"#,
        )
        .unwrap();
        let add = config.services[0].handler("add").unwrap();
        assert_eq!(add.wasm_limits().timeout_ms, 200);
        assert_eq!(
            add.wasm_limits().max_instances,
            WasmLimits::default().max_instances
        );

        let mut bad = config.clone();
        let service = &mut bad.services[0];
        service.handlers[0].module = None;
        service.handlers[1].module = Some(ModuleSource {
            config_map: Some(ConfigMapKey {
                name: "m".into(),
                key: "k".into(),
            }),
            ..ModuleSource::file("x.wasm")
        });
        service.handlers[1].limits = Some(WasmLimits {
            max_memory_bytes: 1,
            ..WasmLimits::default()
        });
        service.handlers[2].allowed_outbound_hosts = vec!["x".into()];
        service.handlers[0].allowed_outbound_hosts = vec!["https://x/".into()];
        service.channels[0].processor = Some("echo".into());
        service.channels.push(ChannelSpec {
            processor: Some("nothing".into()),
            ..ChannelSpec::named("chat")
        });
        assert_eq!(
            fields(bad.validate().unwrap_err()),
            vec![
                "services[0].handlers[0].module",
                "services[0].handlers[0].allowedOutboundHosts[0]",
                "services[0].handlers[1].module",
                "services[0].handlers[1].limits.maxMemoryBytes",
                "services[0].handlers[2].allowedOutboundHosts",
                "services[0].channels[0].processor",
                "services[0].channels[1].processor",
            ]
        );
    }

    #[test]
    fn image_modules_take_a_pin_a_secret_and_plain_http() {
        let config = AgentConfig::parse(
            r#"
services:
  - name: edge
    port: 0
    handlers:
      - name: add
        kind: wasm
        path: /add
        module:
          image: 127.0.0.1:5000/edge/add:v1
          digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
          imagePullSecret: registry
          plainHttp: true
"#,
        )
        .unwrap();
        let module = config.services[0].handlers[0].module.clone().unwrap();
        assert!(module.plain_http);
        assert_eq!(module.image_pull_secret.as_deref(), Some("registry"));

        let mut bad = config.clone();
        let handlers = &mut bad.services[0].handlers;
        handlers[0].module = Some(ModuleSource {
            image: Some("a b".into()),
            digest: Some("sha256:ABC".into()),
            ..module.clone()
        });
        let mut file = ModuleSource::file("add.wasm");
        file.digest = module.digest.clone();
        file.plain_http = true;
        handlers.push(HandlerSpec {
            name: "file".into(),
            module: Some(file),
            path: None,
            ..handlers[0].clone()
        });
        let mut both = module.clone();
        both.file = Some("add.wasm".into());
        handlers.push(HandlerSpec {
            name: "both".into(),
            module: Some(both),
            path: None,
            ..handlers[0].clone()
        });
        assert_eq!(
            fields(bad.validate().unwrap_err()),
            vec![
                "services[0].handlers[0].module.image",
                "services[0].handlers[0].module.digest",
                "services[0].handlers[1].module.digest",
                "services[0].handlers[1].module.plainHttp",
                "services[0].handlers[2].module",
            ]
        );
    }

    #[test]
    fn the_wasm_example_config_is_valid() {
        let config = AgentConfig::parse(include_str!("../../examples/wasm/agent.yaml")).unwrap();
        assert_eq!(
            config.services[0].channels[0].processor.as_deref(),
            Some("filter")
        );
    }

    #[test]
    fn names_must_be_dns_labels() {
        assert!(check_dns_label("edge-1").is_ok());
        for bad in ["", "Edge", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad:?} accepted");
        }
    }
}
