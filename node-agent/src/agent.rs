//! The agent: the set of running services, brought in line with each new config
//! without disturbing the services that did not change.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use edgewire_api::{AgentConfig, ServiceConfig};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::Arc;

use crate::handlers::wasm::WasmRuntime;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::plan::plan;
use crate::service::{RunningService, Shared};

pub struct Agent {
    bind_ip: IpAddr,
    shared: Shared,
    metrics: Metrics,
    mesh: Option<Arc<Mesh>>,
    root: CancellationToken,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: BTreeMap<String, RunningService>,
    /// Services of the current config that could not start, with the reason.
    failed: BTreeMap<String, String>,
    /// Connections of stopped services that are still closing.
    draining: Vec<TaskTracker>,
    /// Shutdown is near: the services still serve, but report themselves
    /// as not listening, so the operator takes this node out of the
    /// endpoints before the ports close.
    leaving: bool,
    shutting_down: bool,
}

/// One service as `/readyz` and the EdgeNode status report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub name: String,
    pub listening: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub connections: u32,
    /// Each `wasm` handler's module: the digest in use, or why there is none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ModuleStatus>,
}

/// A `wasm` handler's module as the agent runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    pub handler: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `ModuleInvalid`, `ModuleMissingExport`, ... when there is no usable
    /// module; `ModuleDigestMismatch` also beside the digest still served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Agent {
    pub fn new(bind_ip: IpAddr, shared: Shared) -> Agent {
        Agent {
            bind_ip,
            metrics: shared.metrics.clone(),
            mesh: shared.mesh.clone(),
            shared,
            root: CancellationToken::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// The Wasm runtime every service's handlers run in.
    pub fn wasm(&self) -> &WasmRuntime {
        &self.shared.wasm
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Brings the running services in line with `config`: removed services
    /// close their clients with 1001, changed ones with 1012 (service restart)
    /// and start again; unchanged ones are not touched. A service whose port
    /// cannot be bound is reported in its status and retried on the next apply.
    pub async fn apply(&self, config: &AgentConfig) {
        let mut state = self.state.lock().await;
        if state.shutting_down || state.leaving {
            return;
        }
        let current: BTreeMap<String, ServiceConfig> = state
            .running
            .iter()
            .map(|(name, s)| (name.clone(), s.runtime.config.clone()))
            .collect();
        let plan = plan(&current, config);
        if plan.is_noop() {
            self.update_mesh(&state, config);
            return;
        }
        for (names, code, reason) in [
            (&plan.stop, CloseCode::Away, "service removed"),
            (&plan.restart, CloseCode::Restart, "service config changed"),
        ] {
            for name in names {
                if let Some(service) = state.running.remove(name) {
                    tracing::info!(service = %name, reason, "stopping service");
                    if let Some(mesh) = &self.mesh {
                        mesh.remove_service(name);
                    }
                    let tracker = service.stop(code, reason).await;
                    state.draining.push(tracker);
                }
            }
        }
        state.draining.retain(|t| !t.is_empty());
        state.failed.clear();
        for name in plan.restart.iter().chain(&plan.start) {
            let Some(service) = config.service(name) else {
                continue;
            };
            match RunningService::start(service.clone(), self.bind_ip, &self.shared, &self.root)
                .await
            {
                Ok(running) => {
                    state.running.insert(name.clone(), running);
                }
                Err(err) => {
                    tracing::error!(service = %name, %err, "service cannot start");
                    state.failed.insert(name.clone(), err.to_string());
                }
            }
        }
        self.update_mesh(&state, config);
    }

    /// Hands the mesh each running service's current peers; a peer change
    /// needs no restart of the service.
    fn update_mesh(&self, state: &State, config: &AgentConfig) {
        let Some(mesh) = &self.mesh else { return };
        for (name, running) in &state.running {
            let peers = config
                .service(name)
                .map(|s| s.peers.as_slice())
                .unwrap_or_default();
            mesh.set_service(name, &running.runtime, peers);
        }
    }

    pub async fn status(&self) -> Vec<ServiceStatus> {
        let state = self.state.lock().await;
        let listening = !state.leaving;
        let mut out: Vec<ServiceStatus> = state
            .running
            .values()
            .map(|s| ServiceStatus {
                name: s.runtime.name().to_string(),
                listening,
                address: Some(s.local_addr),
                error: None,
                connections: s.runtime.open_connections(),
                modules: s
                    .runtime
                    .handlers
                    .modules()
                    .into_iter()
                    .map(|(handler, module)| ModuleStatus {
                        handler,
                        digest: module.digest,
                        reason: module.problem.as_ref().map(|p| p.reason().to_string()),
                        error: module.problem.as_ref().map(ToString::to_string),
                    })
                    .collect(),
            })
            .chain(state.failed.iter().map(|(name, error)| ServiceStatus {
                name: name.clone(),
                listening: false,
                address: None,
                error: Some(error.clone()),
                connections: 0,
                modules: Vec::new(),
            }))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Ready when every configured service listens and no shutdown has begun.
    pub async fn is_ready(&self) -> bool {
        let state = self.state.lock().await;
        !state.shutting_down && !state.leaving && state.failed.is_empty()
    }

    /// The first step of a clean exit: from now on the status reports every
    /// service as not listening (and `/readyz` fails), while the services
    /// keep accepting and serving until [`Agent::shutdown`].
    pub async fn leave(&self) {
        self.state.lock().await.leaving = true;
    }

    /// Whether some configured service failed to start (so a retry is due).
    pub async fn has_failed_services(&self) -> bool {
        !self.state.lock().await.failed.is_empty()
    }

    pub async fn local_addr(&self, service: &str) -> Option<SocketAddr> {
        let state = self.state.lock().await;
        state.running.get(service).map(|s| s.local_addr)
    }

    /// Stops accepting on every port, closes every client with 1001, and waits
    /// up to `drain` for the connections to finish. True when all finished.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        let mut trackers = {
            let mut state = self.state.lock().await;
            state.shutting_down = true;
            // Before any service sees the cancellation (see
            // `ServiceRuntime::close_forwarding`).
            for service in state.running.values() {
                service.runtime.close_forwarding().await;
            }
            self.root.cancel();
            if let Some(mesh) = &self.mesh {
                mesh.shutdown();
            }
            let mut trackers = std::mem::take(&mut state.draining);
            let running = std::mem::take(&mut state.running);
            for (_, service) in running {
                trackers.push(service.stop(CloseCode::Away, "agent shutting down").await);
            }
            trackers
        };
        let all = async {
            for tracker in trackers.drain(..) {
                tracker.wait().await;
            }
        };
        tokio::time::timeout(drain, all).await.is_ok()
    }
}
