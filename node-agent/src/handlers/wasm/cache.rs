//! Compile once per module digest: precompiled code is kept in the state
//! directory under the engine's compatibility key (wasmtime's version and
//! settings) and the module's SHA-256, so a restart or a second service with
//! the same module loads machine code instead of compiling again.

use std::hash::{Hash, Hasher};
use std::path::Path;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// `sha256:<hex>` of a module's bytes: how modules are named everywhere.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in hash {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// A directory name that changes whenever precompiled code from another
/// engine (another wasmtime version or other settings) could not be loaded.
pub fn engine_key(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The component for `bytes`: from the cache when it holds a loadable copy,
/// else compiled (and stored, best effort: a read-only state directory only
/// costs a compile per start).
pub fn component(
    engine: &Engine,
    cache_dir: Option<&Path>,
    digest: &str,
    bytes: &[u8],
) -> wasmtime::Result<Component> {
    let Some(dir) = cache_dir else {
        return Component::new(engine, bytes);
    };
    let file = dir.join(format!("{}.cwasm", digest.trim_start_matches("sha256:")));
    if file.is_file() {
        // SAFETY: the file is machine code that this agent compiled and wrote
        // into its own state directory, under a key that names the engine
        // that can load it; wasmtime still checks its header and version.
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(component) => return Ok(component),
            Err(err) => {
                tracing::warn!(file = %file.display(), %err, "cached Wasm code unusable; compiling again");
            }
        }
    }
    let component = Component::new(engine, bytes)?;
    if let Err(err) = store(dir, &file, &component) {
        tracing::warn!(dir = %dir.display(), %err, "cannot cache compiled Wasm code");
    }
    Ok(component)
}

/// Writes beside and renames, so a reader never sees half a file.
fn store(dir: &Path, file: &Path, component: &Component) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let code = component.serialize()?;
    let partial = file.with_extension(format!("partial.{}", std::process::id()));
    std::fs::write(&partial, code)?;
    std::fs::rename(&partial, file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
