//! `wasm` handlers: a user's WebAssembly component (the standard
//! `wasi:http/incoming-handler`, WASI 0.2's proxy world) run with wasmtime.
//! `engine` is the agent's one engine, `cache` compiles once per module
//! digest, `module` checks and pre-instantiates, `call` runs one request in a
//! fresh instance, `limits` and `outbound` enforce what a call may use,
//! `handler` ties them to one configured handler and follows its module (a
//! file, or an OCI image: `image` decides, `registry` pulls, `credentials`
//! reads Docker configs, `store` keeps modules by digest for offline starts).

mod cache;
mod call;
mod credentials;
mod engine;
mod handler;
mod image;
mod limits;
mod module;
mod outbound;
mod registry;
mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use oci_client::secrets::RegistryAuth;
use tokio::sync::watch;

pub use cache::digest;
pub use call::{Answer, CallError};
pub use credentials::DockerConfig;
pub use handler::{ModuleReport, WasmHandler};
pub use module::ModuleError;
pub use store::ModuleStore;

use engine::WasmHost;

/// How often an image module's reference is resolved again by default, so
/// that a tag pushed anew rolls out.
pub const DEFAULT_IMAGE_RECHECK: Duration = Duration::from_secs(30);

/// The agent's Wasm runtime, started on the first `wasm` handler so an agent
/// without one pays nothing for it.
#[derive(Clone)]
pub struct WasmRuntime {
    state_dir: Option<PathBuf>,
    host: Arc<OnceLock<Result<Arc<WasmHost>, String>>>,
    images: Arc<Images>,
}

/// What image modules share: where credentials come from and when to look
/// for a new digest.
struct Images {
    /// The standalone agent's Docker config file (`--registry-config`).
    docker_config: Option<PathBuf>,
    /// In a cluster: the pull Secrets the placed services name, by
    /// `namespace/name`, as last read (or why they could not be).
    pull_secrets: RwLock<BTreeMap<String, Result<DockerConfig, String>>>,
    recheck_interval: Duration,
    /// Bumped to make every image handler resolve its reference now.
    recheck: watch::Sender<u64>,
}

impl WasmRuntime {
    /// `state_dir` holds the compiled-code cache and pulled modules; `None`
    /// compiles every time and keeps nothing.
    pub fn new(state_dir: Option<PathBuf>) -> WasmRuntime {
        WasmRuntime::with_images(state_dir, None, DEFAULT_IMAGE_RECHECK)
    }

    /// As `new`, with the standalone agent's registry credentials file and
    /// the interval between checks of an image reference.
    pub fn with_images(
        state_dir: Option<PathBuf>,
        docker_config: Option<PathBuf>,
        recheck_interval: Duration,
    ) -> WasmRuntime {
        WasmRuntime {
            state_dir,
            host: Arc::new(OnceLock::new()),
            images: Arc::new(Images {
                docker_config,
                pull_secrets: RwLock::default(),
                recheck_interval,
                recheck: watch::Sender::new(0),
            }),
        }
    }

    /// The engine, built on first use.
    fn host(&self) -> Result<Arc<WasmHost>, ModuleError> {
        self.host
            .get_or_init(|| WasmHost::new(self.state_dir.clone()).map_err(|err| format!("{err:#}")))
            .clone()
            .map_err(ModuleError::Runtime)
    }

    fn store(&self) -> Option<ModuleStore> {
        self.state_dir.as_deref().map(ModuleStore::new)
    }

    /// Replaces the pull Secrets known (`namespace/name` → its Docker config
    /// or why it could not be read).
    pub fn set_pull_secrets(&self, secrets: BTreeMap<String, Result<DockerConfig, String>>) {
        if let Ok(mut known) = self.images.pull_secrets.write() {
            *known = secrets;
        }
    }

    /// Makes every image handler resolve its reference now.
    pub fn recheck_images(&self) {
        self.images.recheck.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The credentials for pulling `reference` for `service`: from the pull
    /// Secret in the service's namespace when the module names one, else
    /// from the Docker config file, else none.
    fn auth(
        &self,
        service: &str,
        reference: &str,
        pull_secret: Option<&str>,
    ) -> Result<RegistryAuth, ModuleError> {
        let registry = image::registry_of(reference).unwrap_or_default();
        let unavailable = ModuleError::Unavailable;
        if let Some(secret) = pull_secret {
            let namespace = service.split_once('/').map(|(ns, _)| ns).ok_or_else(|| {
                unavailable("imagePullSecret is read only by an agent in a cluster".into())
            })?;
            let key = format!("{namespace}/{secret}");
            let known = self
                .images
                .pull_secrets
                .read()
                .map_err(|_| unavailable("pull secrets poisoned".into()))?;
            return match known.get(&key) {
                Some(Ok(config)) => config.auth_for(&registry).map_err(unavailable),
                Some(Err(why)) => Err(unavailable(why.clone())),
                None => Err(unavailable(format!(
                    "the pull Secret {key} has not been read"
                ))),
            };
        }
        let Some(path) = &self.images.docker_config else {
            return Ok(RegistryAuth::Anonymous);
        };
        let bytes = std::fs::read(path)
            .map_err(|err| unavailable(format!("cannot read {}: {err}", path.display())))?;
        DockerConfig::parse(&bytes)
            .and_then(|config| config.auth_for(&registry))
            .map_err(|err| unavailable(format!("{}: {err}", path.display())))
    }
}
