//! Modules kept in the state directory by digest, so an agent restarted
//! without its registry or API server still finds the code it ran:
//! `modules/<sha256>.wasm` holds a module's bytes (named by their own
//! digest); for OCI images, `modules/oci/manifests/<sha256>` names the
//! module of a manifest digest and `modules/oci/refs/<sha256 of the
//! reference>` the manifest a reference last resolved to.

use std::path::{Path, PathBuf};

use super::cache::digest;

const DIR: &str = "modules";

#[derive(Clone, Debug)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    pub fn new(state_dir: &Path) -> ModuleStore {
        ModuleStore {
            dir: state_dir.join(DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the module as `<sha256>.wasm` (once) and returns its path.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let name = digest(bytes);
        let file = self.dir.join(format!("{}.wasm", hex(&name)));
        if !file.is_file() {
            write_atomically(&file, bytes)?;
        }
        Ok(file)
    }

    /// Records that `manifest` (a manifest digest) carries `bytes`, and
    /// that `reference` resolved to it.
    pub fn put_image(&self, reference: &str, manifest: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.put(bytes)?;
        write_atomically(&self.manifest_link(manifest), digest(bytes).as_bytes())?;
        self.remember(reference, manifest)
    }

    /// Records that `reference` resolved to `manifest`.
    pub fn remember(&self, reference: &str, manifest: &str) -> std::io::Result<()> {
        let link = self.reference_link(reference);
        if std::fs::read_to_string(&link).ok().as_deref() == Some(manifest) {
            return Ok(());
        }
        write_atomically(&link, manifest.as_bytes())
    }

    /// The manifest digest `reference` last resolved to, if known here.
    pub fn remembered(&self, reference: &str) -> Option<String> {
        std::fs::read_to_string(self.reference_link(reference)).ok()
    }

    /// The module of a manifest digest, if stored here intact.
    pub fn image(&self, manifest: &str) -> Option<Vec<u8>> {
        let module = std::fs::read_to_string(self.manifest_link(manifest)).ok()?;
        let bytes = std::fs::read(self.dir.join(format!("{}.wasm", hex(&module)))).ok()?;
        // A damaged file is as good as none: it is pulled again.
        (digest(&bytes) == module).then_some(bytes)
    }

    fn manifest_link(&self, manifest: &str) -> PathBuf {
        self.dir.join("oci/manifests").join(hex(manifest))
    }

    fn reference_link(&self, reference: &str) -> PathBuf {
        self.dir
            .join("oci/refs")
            .join(hex(&digest(reference.as_bytes())))
    }
}

/// The hex part of `sha256:<hex>`; anything else is made safe as a file name.
fn hex(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Writes beside and renames, so a reader never sees half a file.
fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = file.with_extension(format!("partial.{}", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_by_manifest_and_reference() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(dir.path());
        let manifest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(store.image(&manifest), None);
        store
            .put_image("127.0.0.1:5000/edge/add:v1", &manifest, b"module")
            .unwrap();
        assert_eq!(store.image(&manifest).as_deref(), Some(&b"module"[..]));
        assert_eq!(
            store.remembered("127.0.0.1:5000/edge/add:v1").as_deref(),
            Some(manifest.as_str())
        );
        assert_eq!(store.remembered("127.0.0.1:5000/edge/add:v2"), None);

        // Damaged bytes are not served.
        let file = store.put(b"module").unwrap();
        std::fs::write(file, b"tampered").unwrap();
        assert_eq!(store.image(&manifest), None);
    }
}
