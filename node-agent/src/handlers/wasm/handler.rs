//! One configured `wasm` handler: its module (reloaded when the file's
//! content changes, so a fixed module replaces a broken one without a
//! restart), its limits, and the calls into it with their metrics.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use edgewire_api::HandlerSpec;
use http_body_util::Full;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::call::{self, Answer, Budget, CallError};
use super::module::{self, Loaded, ModuleError};
use super::outbound::Outbound;
use super::{WasmHost, WasmRuntime};
use crate::metrics::Metrics;

/// How often the module file is checked for new content.
const RELOAD_POLL: Duration = Duration::from_secs(1);

pub struct WasmHandler {
    name: String,
    service: Arc<str>,
    budget: Budget,
    pub max_request_bytes: usize,
    max_instances: u32,
    instances: Semaphore,
    outbound: Outbound,
    metrics: Metrics,
    module: RwLock<Result<Arc<Loaded>, ModuleError>>,
}

/// The file's identity as the file system tells it, to notice a new version
/// without reading it each time.
type Stamp = Option<(u64, Option<SystemTime>)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

impl WasmHandler {
    /// Loads the module (off the async workers) and follows its file until
    /// `stop`. Never fails: a handler without a usable module answers 503
    /// and reports why in [`WasmHandler::module_status`].
    pub async fn start(
        spec: &HandlerSpec,
        service: &str,
        metrics: &Metrics,
        runtime: &WasmRuntime,
        stop: CancellationToken,
    ) -> Arc<WasmHandler> {
        let limits = spec.wasm_limits();
        let service: Arc<str> = Arc::from(service);
        let handler = Arc::new(WasmHandler {
            name: spec.name.clone(),
            service: Arc::clone(&service),
            budget: Budget {
                timeout: Duration::from_millis(limits.timeout_ms.into()),
                max_memory_bytes: limits.max_memory_bytes,
                max_response_bytes: limits.max_response_bytes as usize,
            },
            max_request_bytes: limits.max_request_bytes as usize,
            max_instances: limits.max_instances,
            instances: Semaphore::new(limits.max_instances as usize),
            outbound: Outbound {
                allowed: spec.allowed_outbound_hosts.clone().into(),
                service,
                handler: Arc::from(spec.name.as_str()),
                metrics: metrics.clone(),
            },
            metrics: metrics.clone(),
            module: RwLock::new(Err(ModuleError::Unavailable("not loaded yet".into()))),
        });
        metrics.init_handler(&handler.service, &handler.name, &CallError::REASONS);
        if !spec.allowed_outbound_hosts.is_empty() {
            for outcome in crate::handlers::upstream::Outcome::LABELS {
                metrics.upstream_attempt_init(&handler.service, &handler.name, outcome);
            }
        }
        let path = spec.module.as_ref().and_then(|m| m.file.clone());
        let (Some(path), Ok(host)) = (path, runtime.host()) else {
            let why = match runtime.host() {
                Err(err) => err,
                Ok(_) => ModuleError::Unavailable(
                    "a configMap module is resolved only by an agent in a cluster".into(),
                ),
            };
            handler.set_module(Err(why));
            return handler;
        };
        let path = PathBuf::from(path);
        let mut seen = stamp(&path);
        handler.set_module(read_and_load(&host, &path).await);
        let following = Arc::clone(&handler);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(RELOAD_POLL) => {}
                }
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                let loaded = read_and_load(&host, &path).await;
                let current = following.module_status();
                let changed = match (&loaded, &current) {
                    (Ok(new), Ok(old)) => new.digest != *old,
                    _ => true,
                };
                if changed {
                    following.set_module(loaded);
                }
            }
        });
        handler
    }

    fn set_module(&self, module: Result<Arc<Loaded>, ModuleError>) {
        match &module {
            Ok(loaded) => tracing::info!(
                service = %self.service, handler = %self.name, digest = %loaded.digest,
                "wasm module loaded"
            ),
            Err(err) => tracing::warn!(
                service = %self.service, handler = %self.name, reason = err.reason(), %err,
                "wasm module unusable; the handler answers 503"
            ),
        }
        if let Ok(mut slot) = self.module.write() {
            *slot = module;
        }
    }

    /// The digest of the module in use, or why there is none.
    pub fn module_status(&self) -> Result<String, ModuleError> {
        match self.module.read() {
            Ok(slot) => slot
                .as_ref()
                .map(|m| m.digest.clone())
                .map_err(Clone::clone),
            Err(_) => Err(ModuleError::Runtime("handler state poisoned".into())),
        }
    }

    fn loaded(&self) -> Result<Arc<Loaded>, CallError> {
        let slot = self
            .module
            .read()
            .map_err(|_| CallError::Unavailable("handler state poisoned".into()))?;
        match &*slot {
            Ok(loaded) => Ok(Arc::clone(loaded)),
            Err(err) => Err(CallError::Unavailable(format!("{} ({err})", err.reason()))),
        }
    }

    /// Runs one request in a fresh instance, within the handler's limits,
    /// and counts it: its duration, and its failure by reason.
    pub async fn call(&self, request: hyper::Request<Full<Bytes>>) -> Result<Answer, CallError> {
        let started = Instant::now();
        let result = self.call_uncounted(request).await;
        self.metrics
            .handler_duration
            .with_label_values(&[&*self.service, &self.name])
            .observe(started.elapsed().as_secs_f64());
        if let Err(err) = &result {
            self.metrics
                .handler_error(&self.service, &self.name, err.reason());
            tracing::debug!(service = %self.service, handler = %self.name, %err, "wasm call failed");
        }
        result
    }

    async fn call_uncounted(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<Answer, CallError> {
        let loaded = self.loaded()?;
        // Waiting for a free instance counts against the call's deadline.
        let permit = tokio::time::timeout(self.budget.timeout, self.instances.acquire())
            .await
            .map_err(|_| CallError::Busy(self.max_instances))?
            .map_err(|_| CallError::Busy(self.max_instances))?;
        let answer = call::run(&loaded, &self.budget, self.outbound.clone(), request).await;
        drop(permit);
        answer
    }

    /// How long a call may take in all: for the callers' own read deadlines.
    pub fn timeout(&self) -> Duration {
        self.budget.timeout
    }
}

async fn read_and_load(host: &Arc<WasmHost>, path: &Path) -> Result<Arc<Loaded>, ModuleError> {
    let host = Arc::clone(host);
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path).map_err(|err| {
            ModuleError::Unavailable(format!("cannot read {}: {err}", path.display()))
        })?;
        module::load(&host, &bytes)
    })
    .await
    .unwrap_or_else(|err| Err(ModuleError::Runtime(format!("loader failed: {err}"))))
}
