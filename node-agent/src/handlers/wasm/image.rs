//! Image modules (`module.image`): a reference resolved to a manifest
//! digest, checked against the pin (`module.digest`), and the module pulled
//! only when the store does not hold that digest yet. What was pulled is
//! kept by digest, so `cached` finds the code again without the registry.

use std::time::Duration;

use oci_client::Reference;
use oci_client::secrets::RegistryAuth;

use super::module::ModuleError;
use super::registry::Registry;
use super::store::ModuleStore;

/// The longest one check may take, resolving and pulling together.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// What a handler's `module.image` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSource {
    pub reference: String,
    pub pin: Option<String>,
    pub plain_http: bool,
}

/// A module a reference resolved to: its manifest digest, and its bytes
/// unless it is the one already running.
pub struct Pulled {
    pub manifest: String,
    pub bytes: Option<Vec<u8>>,
}

/// Refuses a manifest digest other than the pinned one.
pub fn check_pin(pin: Option<&str>, resolved: &str) -> Result<(), ModuleError> {
    match pin {
        Some(pin) if pin != resolved => Err(ModuleError::DigestMismatch {
            expected: pin.to_string(),
            actual: resolved.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The module to serve before (or without) the registry: the pinned digest,
/// else the one the reference last resolved to, if the store holds it.
pub fn cached(source: &ImageSource, store: &ModuleStore) -> Option<(String, Vec<u8>)> {
    let manifest = source
        .pin
        .clone()
        .or_else(|| store.remembered(&source.reference))?;
    let bytes = store.image(&manifest)?;
    Some((manifest, bytes))
}

/// Resolves the reference now; pulls the module unless `running` is its
/// digest. Pull failures are `Unavailable` (reason `ModulePullFailed`), a
/// digest other than the pin is `DigestMismatch`.
pub async fn pull(
    source: &ImageSource,
    auth: RegistryAuth,
    store: Option<&ModuleStore>,
    running: Option<&str>,
) -> Result<Pulled, ModuleError> {
    match tokio::time::timeout(PULL_TIMEOUT, pull_within(source, auth, store, running)).await {
        Ok(result) => result,
        Err(_) => Err(ModuleError::Unavailable(format!(
            "pulling {} took longer than {}s",
            source.reference,
            PULL_TIMEOUT.as_secs()
        ))),
    }
}

async fn pull_within(
    source: &ImageSource,
    auth: RegistryAuth,
    store: Option<&ModuleStore>,
    running: Option<&str>,
) -> Result<Pulled, ModuleError> {
    let reference: Reference = source.reference.parse().map_err(|err| {
        ModuleError::Unavailable(format!(
            "{:?} is not an OCI reference: {err}",
            source.reference
        ))
    })?;
    let registry = Registry::new(source.plain_http, auth).map_err(ModuleError::Unavailable)?;
    // The digest alone first: most checks find the module already running.
    let digest = registry
        .digest(&reference)
        .await
        .map_err(ModuleError::Unavailable)?;
    check_pin(source.pin.as_deref(), &digest)?;
    let remember = |store: &ModuleStore| {
        if let Err(err) = store.remember(&source.reference, &digest) {
            tracing::warn!(dir = %store.dir().display(), %err, "cannot record the module's digest");
        }
    };
    if running == Some(digest.as_str()) {
        if let Some(store) = store {
            remember(store);
        }
        return Ok(Pulled {
            manifest: digest,
            bytes: None,
        });
    }
    if let Some(store) = store
        && let Some(bytes) = store.image(&digest)
    {
        remember(store);
        return Ok(Pulled {
            manifest: digest,
            bytes: Some(bytes),
        });
    }
    // By digest from here on: a tag moved meanwhile cannot mix two pushes.
    let by_digest = reference.clone_with_digest(digest.clone());
    let (manifest, _) = registry
        .resolve(&by_digest)
        .await
        .map_err(ModuleError::Unavailable)?;
    let bytes = registry
        .fetch_module(&by_digest, &manifest)
        .await
        .map_err(ModuleError::Unavailable)?;
    if let Some(store) = store
        && let Err(err) = store.put_image(&source.reference, &digest, &bytes)
    {
        // Served all the same; only an offline restart would miss it.
        tracing::warn!(dir = %store.dir().display(), %err, "cannot store the pulled module");
    }
    Ok(Pulled {
        manifest: digest,
        bytes: Some(bytes),
    })
}

/// The registry's `host[:port]` as credentials are keyed.
pub fn registry_of(reference: &str) -> Option<String> {
    reference
        .parse::<Reference>()
        .ok()
        .map(|r| r.registry().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pinned_digest_passes() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert!(check_pin(None, &a).is_ok());
        assert!(check_pin(Some(&a), &a).is_ok());
        let err = check_pin(Some(&a), &b).unwrap_err();
        assert_eq!(err.reason(), "ModuleDigestMismatch");
        assert!(err.to_string().contains(&b), "{err}");
    }

    #[test]
    fn the_cache_serves_the_pin_or_the_last_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(dir.path());
        let v1 = format!("sha256:{}", "1".repeat(64));
        let v2 = format!("sha256:{}", "2".repeat(64));
        let reference = "127.0.0.1:5000/edge/add:latest";
        store.put_image(reference, &v1, b"one").unwrap();
        store.put_image(reference, &v2, b"two").unwrap();
        let mut source = ImageSource {
            reference: reference.into(),
            pin: None,
            plain_http: true,
        };
        assert_eq!(cached(&source, &store), Some((v2.clone(), b"two".to_vec())));
        source.pin = Some(v1.clone());
        assert_eq!(cached(&source, &store), Some((v1, b"one".to_vec())));
        source.pin = Some(format!("sha256:{}", "3".repeat(64)));
        assert_eq!(cached(&source, &store), None);
    }
}
