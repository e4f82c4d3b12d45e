//! From a module's bytes to something callable: compiled (or loaded from the
//! cache), checked for the `wasi:http/incoming-handler` export, linked to the
//! proxy world and pre-instantiated. Each failure is named by the reason a
//! user sees in status conditions and Events.

use std::sync::Arc;

use thiserror::Error;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::cache;
use super::call::CallState;
use super::engine::WasmHost;

/// The interface a component must export, at any WASI 0.2 version.
const HANDLER_EXPORT: &str = "wasi:http/incoming-handler@0.2.";

/// A component ready to be instantiated once per request.
pub struct Loaded {
    /// How the module is named in status: the SHA-256 of its bytes, or for
    /// an image module its manifest digest (what a tag resolves to).
    pub digest: String,
    pub pre: ProxyPre<CallState>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModuleError {
    /// The bytes could not be had: a missing file, a missing ConfigMap key.
    #[error("cannot fetch the module: {0}")]
    Unavailable(String),
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component does not export wasi:http/incoming-handler (it exports: {0})")]
    MissingExport(String),
    #[error("the component imports what the wasi:http proxy world does not provide: {0}")]
    UnsupportedImport(String),
    #[error("the image resolved to {actual}, not the pinned digest {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("the Wasm runtime cannot start: {0}")]
    Runtime(String),
}

impl ModuleError {
    /// The reason of the `Degraded` condition and of the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            ModuleError::Unavailable(_) => "ModulePullFailed",
            ModuleError::Invalid(_) => "ModuleInvalid",
            ModuleError::MissingExport(_) => "ModuleMissingExport",
            ModuleError::UnsupportedImport(_) => "ModuleUnsupportedImport",
            ModuleError::DigestMismatch { .. } => "ModuleDigestMismatch",
            ModuleError::Runtime(_) => "WasmRuntimeUnavailable",
        }
    }
}

/// Compiles and links `bytes`, to be reported as `name` (by default the
/// bytes' own digest). CPU-bound: call it off the async workers.
pub fn load(
    host: &WasmHost,
    bytes: &[u8],
    name: Option<String>,
) -> Result<Arc<Loaded>, ModuleError> {
    let digest = cache::digest(bytes);
    let component = cache::component(&host.engine, host.cache_dir.as_deref(), &digest, bytes)
        .map_err(|err| ModuleError::Invalid(format!("{err:#}")))?;
    let exports: Vec<String> = component
        .component_type()
        .exports(&host.engine)
        .map(|(name, _)| name.to_string())
        .collect();
    if !exports.iter().any(|name| name.starts_with(HANDLER_EXPORT)) {
        let listed = if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports.join(", ")
        };
        return Err(ModuleError::MissingExport(listed));
    }
    let instance_pre = host
        .linker
        .instantiate_pre(&component)
        .map_err(|err| ModuleError::UnsupportedImport(format!("{err:#}")))?;
    let pre = ProxyPre::new(instance_pre)
        .map_err(|err| ModuleError::MissingExport(format!("{err:#}")))?;
    Ok(Arc::new(Loaded {
        digest: name.unwrap_or(digest),
        pre,
    }))
}
