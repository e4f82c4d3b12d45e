//! One configured `wasm` handler: its module (reloaded when the file's
//! content changes, or when its image reference resolves to a new digest,
//! so a fixed module replaces a broken one without a restart), its limits,
//! and the calls into it with their metrics.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use edgewire_api::{HandlerSpec, ModuleSource};
use http_body_util::Full;
use prometheus::Histogram;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::call::{self, Answer, Budget, CallError};
use super::image::{self, ImageSource, Pulled};
use super::module::{self, Loaded, ModuleError};
use super::outbound::Outbound;
use super::store::ModuleStore;
use super::{WasmHost, WasmRuntime};
use crate::metrics::Metrics;

/// How often the module file is checked for new content.
const RELOAD_POLL: Duration = Duration::from_secs(1);
/// The longest a handler's start waits for the first pull of an image
/// module that is not stored yet.
const FIRST_PULL_WAIT: Duration = Duration::from_secs(10);

pub struct WasmHandler {
    name: String,
    service: Arc<str>,
    budget: Budget,
    pub max_request_bytes: usize,
    max_instances: u32,
    instances: Semaphore,
    outbound: Outbound,
    metrics: Metrics,
    /// This handler's series of `edgewire_handler_duration_seconds`, looked
    /// up once rather than by its labels on every call.
    duration: Histogram,
    module: RwLock<Result<Arc<Loaded>, ModuleError>>,
    /// A newer module that was refused (a digest other than the pinned
    /// one) while the loaded one goes on serving.
    refused: RwLock<Option<ModuleError>>,
}

/// A handler's module as status reports it: the digest in use, and what is
/// wrong (no usable module, or a newer one refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleReport {
    pub digest: Option<String>,
    pub problem: Option<ModuleError>,
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
        let duration = metrics
            .handler_duration
            .with_label_values(&[&*service, &spec.name]);
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
            duration,
            module: RwLock::new(Err(ModuleError::Unavailable("not loaded yet".into()))),
            refused: RwLock::new(None),
        });
        metrics.init_handler(&handler.service, &handler.name, &CallError::REASONS);
        if !spec.allowed_outbound_hosts.is_empty() {
            for outcome in crate::handlers::upstream::Outcome::LABELS {
                metrics.upstream_attempt_init(&handler.service, &handler.name, outcome);
            }
            metrics.init_upstream_bytes(&handler.service, &handler.name);
        }
        let host = match runtime.host() {
            Ok(host) => host,
            Err(err) => {
                handler.set_module(Err(err));
                return handler;
            }
        };
        match spec.module.clone() {
            Some(ModuleSource {
                file: Some(path), ..
            }) => handler.follow_file(host, PathBuf::from(path), stop).await,
            Some(ModuleSource {
                image: Some(reference),
                digest,
                image_pull_secret,
                plain_http,
                ..
            }) => {
                let source = ImageSource {
                    reference,
                    pin: digest,
                    plain_http,
                };
                Arc::clone(&handler)
                    .follow_image(host, runtime.clone(), source, image_pull_secret, stop)
                    .await;
            }
            _ => handler.set_module(Err(ModuleError::Unavailable(
                "a configMap module is resolved only by an agent in a cluster".into(),
            ))),
        }
        handler
    }

    /// Loads the module file, then reloads it whenever its content changes.
    async fn follow_file(
        self: &Arc<Self>,
        host: Arc<WasmHost>,
        path: PathBuf,
        stop: CancellationToken,
    ) {
        let mut seen = stamp(&path);
        self.set_module(read_and_load(&host, &path).await);
        let following = Arc::clone(self);
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
                let current = following.module_status().digest;
                let changed = match (&loaded, &current) {
                    (Ok(new), Some(old)) => new.digest != *old,
                    _ => true,
                };
                if changed {
                    following.set_module(loaded);
                }
            }
        });
    }

    /// Serves the stored module of the reference at once when there is one
    /// (so a restart without the registry serves what it had), else waits
    /// (bounded) for the first pull; then resolves the reference again
    /// every recheck interval (and when asked) and loads a new digest.
    async fn follow_image(
        self: Arc<Self>,
        host: Arc<WasmHost>,
        runtime: WasmRuntime,
        source: ImageSource,
        pull_secret: Option<String>,
        stop: CancellationToken,
    ) {
        let store = runtime.store();
        let mut image = Following {
            host,
            runtime,
            source,
            pull_secret,
            store,
            running: None,
            failing: false,
        };
        let stored = image
            .store
            .as_ref()
            .and_then(|s| image::cached(&image.source, s));
        let first_pull = match stored {
            Some((manifest, bytes)) => {
                tracing::info!(
                    service = %self.service, handler = %self.name, reference = %image.source.reference,
                    digest = %manifest, "serving the stored module until the registry answers"
                );
                let loaded = load_bytes(&image.host, bytes, manifest.clone()).await;
                image.running = loaded.is_ok().then_some(manifest);
                self.set_module(loaded);
                None
            }
            None => {
                self.set_module(Err(ModuleError::Unavailable(format!(
                    "pulling {}",
                    image.source.reference
                ))));
                Some(Arc::new(Notify::new()))
            }
        };
        let mut recheck = image.runtime.images.recheck.subscribe();
        let interval = image.runtime.images.recheck_interval;
        let mut pulled = first_pull.clone();
        tokio::spawn(async move {
            // The first check at once: the registry may have a newer digest
            // than the stored module, or there is no module yet.
            let mut first = true;
            loop {
                if !first {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(interval) => {}
                        changed = recheck.changed() => if changed.is_err() { break },
                    }
                }
                first = false;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.check_image(&mut image) => {}
                }
                if let Some(done) = pulled.take() {
                    done.notify_one();
                }
            }
        });
        // A service starts once its modules are loaded, but an unanswering
        // registry must not hold it (and the services after it) for long:
        // past this wait the handler answers 503 until its pull ends.
        if let Some(done) = first_pull {
            let _ = tokio::time::timeout(FIRST_PULL_WAIT, done.notified()).await;
        }
    }

    /// Resolves the reference; loads the module when its digest is new.
    async fn check_image(&self, image: &mut Following) {
        let pulled = match image.runtime.auth(
            &self.service,
            &image.source.reference,
            image.pull_secret.as_deref(),
        ) {
            Ok(auth) => {
                image::pull(
                    &image.source,
                    auth,
                    image.store.as_ref(),
                    image.running.as_deref(),
                )
                .await
            }
            Err(err) => Err(err),
        };
        match pulled {
            Ok(Pulled { manifest, bytes }) => {
                if image.failing {
                    tracing::info!(service = %self.service, handler = %self.name, "the registry answers again");
                }
                image.failing = false;
                self.set_refused(None);
                if let Some(bytes) = bytes {
                    let loaded = load_bytes(&image.host, bytes, manifest.clone()).await;
                    image.running = loaded.is_ok().then_some(manifest);
                    self.set_module(loaded);
                }
            }
            Err(err) if image.running.is_some() => {
                if !image.failing {
                    tracing::warn!(
                        service = %self.service, handler = %self.name, reason = err.reason(), %err,
                        "cannot check the module's image; serving the module it had"
                    );
                }
                image.failing = true;
                if matches!(err, ModuleError::DigestMismatch { .. }) {
                    self.set_refused(Some(err));
                }
            }
            Err(err) => self.set_module(Err(err)),
        }
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

    fn set_refused(&self, refused: Option<ModuleError>) {
        if let Ok(mut slot) = self.refused.write() {
            *slot = refused;
        }
    }

    /// The digest of the module in use, and what is wrong.
    pub fn module_status(&self) -> ModuleReport {
        let refused = self.refused.read().ok().and_then(|r| r.clone());
        match self.module.read() {
            Ok(slot) => match &*slot {
                Ok(loaded) => ModuleReport {
                    digest: Some(loaded.digest.clone()),
                    problem: refused,
                },
                Err(err) => ModuleReport {
                    digest: None,
                    problem: Some(err.clone()),
                },
            },
            Err(_) => ModuleReport {
                digest: None,
                problem: Some(ModuleError::Runtime("handler state poisoned".into())),
            },
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
        self.call_since(request, Instant::now()).await
    }

    /// As [`call`](Self::call), for a request that arrived at `started`
    /// (its body read since): its deadline runs from then.
    pub async fn call_since(
        &self,
        request: hyper::Request<Full<Bytes>>,
        started: Instant,
    ) -> Result<Answer, CallError> {
        let deadline = started + self.budget.timeout;
        let result = self.call_uncounted(request, deadline).await;
        self.count(started, result.as_ref().err());
        result
    }

    /// A request refused before it reached the component (its body too
    /// large or too slow), counted as a failed call.
    pub fn refused(&self, started: Instant, err: CallError) -> CallError {
        self.count(started, Some(&err));
        err
    }

    /// Counts a call: its duration, and its failure by reason.
    fn count(&self, started: Instant, failed: Option<&CallError>) {
        self.duration.observe(started.elapsed().as_secs_f64());
        if let Some(err) = failed {
            self.metrics
                .handler_error(&self.service, &self.name, err.reason());
            tracing::debug!(service = %self.service, handler = %self.name, %err, "wasm call failed");
        }
    }

    async fn call_uncounted(
        &self,
        request: hyper::Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let loaded = self.loaded()?;
        // Waiting for a free instance counts against the call's deadline:
        // what is left of it is all the instance gets.
        let permit = tokio::time::timeout_at(deadline.into(), self.instances.acquire())
            .await
            .map_err(|_| CallError::Busy(self.max_instances))?
            .map_err(|_| CallError::Busy(self.max_instances))?;
        // A slot that freed just as the deadline passed: nothing to run.
        if Instant::now() >= deadline {
            return Err(CallError::Timeout(self.budget.timeout));
        }
        let answer = call::run(
            &loaded,
            &self.budget,
            deadline,
            self.outbound.clone(),
            request,
        )
        .await;
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
        module::load(&host, &bytes, None)
    })
    .await
    .unwrap_or_else(|err| Err(ModuleError::Runtime(format!("loader failed: {err}"))))
}

/// An image handler's follower: what it pulls with, and what runs.
struct Following {
    host: Arc<WasmHost>,
    runtime: WasmRuntime,
    source: ImageSource,
    pull_secret: Option<String>,
    store: Option<ModuleStore>,
    /// The manifest digest of the module loaded, if one is.
    running: Option<String>,
    /// The last check failed (logged once until one succeeds).
    failing: bool,
}

async fn load_bytes(
    host: &Arc<WasmHost>,
    bytes: Vec<u8>,
    manifest: String,
) -> Result<Arc<Loaded>, ModuleError> {
    let host = Arc::clone(host);
    tokio::task::spawn_blocking(move || module::load(&host, &bytes, Some(manifest)))
        .await
        .unwrap_or_else(|err| Err(ModuleError::Runtime(format!("loader failed: {err}"))))
}
