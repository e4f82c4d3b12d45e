//! Types shared by the edgewire operator and agent: the agent's config, the
//! relay's wire messages, and their validation. Nothing here does I/O.

pub mod auth;
pub mod config;
pub mod crd;
pub mod error;
pub mod hub;
pub mod node_lease;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use auth::{AuthSpec, Grants, SecretKeyRef, TokenAlgorithm};
pub use config::{
    AgentConfig, ChannelSpec, ConfigMapKey, HandlerKind, HandlerSpec, Limits, ModuleSource,
    PeerSpec, ServiceConfig, SlowConsumerPolicy, WasmLimits,
};
pub use error::{ConfigError, FieldError};
pub use hub::HubSpec;
pub use tls::TlsSpec;
pub use upstream::{BreakerSpec, UpstreamSpec};
