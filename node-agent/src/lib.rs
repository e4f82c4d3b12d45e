//! edgewire-agent: the per-node runtime. A map for newcomers:
//!
//! - [`auth`]: client tokens and what they allow.
//! - [`agent`]: the set of running services and how a new config is applied.
//! - [`service`]: one service's listener, HTTP routing and WebSocket sessions.
//! - [`tls`]: client TLS from certificate files, reloaded when they change.
//! - [`reloading`]: a value built from files, built again when they change.
//! - [`relay`]: channel subscriptions and fan-out (the relay).
//! - [`budget`]: byte budgets for everything queued.
//! - [`mesh`]: links to the peer agents of each service.
//! - [`handlers`]: the compute handlers, as pure functions.
//! - [`metrics`]: every Prometheus metric the agent exports.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`config_source`]: the config file and its reloads.
//! - [`cluster`]: cluster mode: placement, EdgeNode heartbeats, offline state.
//! - [`uplink`]: links to a hub: store-and-forward up, delivery down.

pub mod admin;
pub mod agent;
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config_source;
pub mod handlers;
pub mod mesh;
pub mod metrics;
pub mod plan;
pub mod relay;
pub mod reloading;
pub mod service;
pub mod tls;
pub mod uplink;
