//! `wasm` handlers: a user's WebAssembly component (the standard
//! `wasi:http/incoming-handler`, WASI 0.2's proxy world) run with wasmtime.
//! `engine` is the agent's one engine, `cache` compiles once per module
//! digest, `module` checks and pre-instantiates, `call` runs one request in a
//! fresh instance, `limits` and `outbound` enforce what a call may use,
//! `handler` ties them to one configured handler and follows its module file.

mod cache;
mod call;
mod engine;
mod handler;
mod limits;
mod module;
mod outbound;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub use cache::digest;
pub use call::{Answer, CallError};
pub use handler::WasmHandler;
pub use module::ModuleError;

use engine::WasmHost;

/// The agent's Wasm runtime, started on the first `wasm` handler so an agent
/// without one pays nothing for it.
#[derive(Clone)]
pub struct WasmRuntime {
    state_dir: Option<PathBuf>,
    host: Arc<OnceLock<Result<Arc<WasmHost>, String>>>,
}

impl WasmRuntime {
    /// `state_dir` holds the compiled-code cache; `None` compiles every time.
    pub fn new(state_dir: Option<PathBuf>) -> WasmRuntime {
        WasmRuntime {
            state_dir,
            host: Arc::new(OnceLock::new()),
        }
    }

    /// The engine, built on first use.
    fn host(&self) -> Result<Arc<WasmHost>, ModuleError> {
        self.host
            .get_or_init(|| WasmHost::new(self.state_dir.clone()).map_err(|err| format!("{err:#}")))
            .clone()
            .map_err(ModuleError::Runtime)
    }
}
