//! Talking to an OCI registry (with `oci-client`): a reference resolved to
//! its manifest digest, its manifest, and the one Wasm layer of a manifest
//! fetched, its size bounded before a byte is read and its digest checked.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// The layer media type of the CNCF Wasm OCI artifact layout (what `wkg oci
/// push` writes and `oras push ref module.wasm:application/wasm` asks for),
/// and the one of the older wasm-to-oci layout.
const WASM_LAYER_TYPES: [&str; 2] = [
    "application/wasm",
    oci_client::manifest::WASM_LAYER_MEDIA_TYPE,
];
/// The largest module pulled: beyond it a layer is refused unread.
pub const MAX_MODULE_BYTES: i64 = 128 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two reads of one response: a registry that stops sending fails
/// the pull rather than holding it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Registry {
    client: Client,
    auth: RegistryAuth,
}

impl Registry {
    /// `plain_http` speaks HTTP instead of HTTPS to every registry.
    pub fn new(plain_http: bool, auth: RegistryAuth) -> Result<Registry, String> {
        // The HTTP client takes the process's rustls provider: ring, as for
        // the rest of the agent. Already installed is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            // An image index is not a Wasm artifact: refuse it rather than
            // pick a platform.
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let client = Client::try_from(config)
            .map_err(|err| format!("cannot build the registry client: {err}"))?;
        Ok(Registry { client, auth })
    }

    /// The digest of the manifest `reference` names now: a HEAD request
    /// where the registry answers it with the digest (registries do not
    /// count these as pulls), else a GET.
    pub async fn digest(&self, reference: &Reference) -> Result<String, String> {
        self.client
            .fetch_manifest_digest(reference, &self.auth)
            .await
            .map_err(|err| format!("cannot resolve {reference}: {err}"))
    }

    /// The manifest `reference` names now, and its digest.
    pub async fn resolve(
        &self,
        reference: &Reference,
    ) -> Result<(OciImageManifest, String), String> {
        self.client
            .pull_image_manifest(reference, &self.auth)
            .await
            .map_err(|err| format!("cannot resolve {reference}: {err}"))
    }

    /// The bytes of the manifest's Wasm layer, checked against its digest.
    pub async fn fetch_module(
        &self,
        reference: &Reference,
        manifest: &OciImageManifest,
    ) -> Result<Vec<u8>, String> {
        let layer = wasm_layer(manifest)?;
        let mut bytes = Vec::with_capacity(usize::try_from(layer.size).unwrap_or(0));
        self.client
            .pull_blob(reference, layer, &mut bytes)
            .await
            .map_err(|err| format!("cannot pull the module of {reference}: {err}"))?;
        if i64::try_from(bytes.len()).ok() != Some(layer.size) {
            return Err(format!(
                "the module of {reference} is {} bytes, its manifest says {}",
                bytes.len(),
                layer.size
            ));
        }
        Ok(bytes)
    }
}

/// The one Wasm layer of a Wasm artifact's manifest, within the size budget.
pub fn wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    let wasm: Vec<&OciDescriptor> = manifest
        .layers
        .iter()
        .filter(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
        .collect();
    let [layer] = wasm.as_slice() else {
        let types: Vec<&str> = manifest
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect();
        return Err(format!(
            "not a Wasm artifact: it needs exactly one application/wasm layer, it has [{}]",
            types.join(", ")
        ));
    };
    if !(0..=MAX_MODULE_BYTES).contains(&layer.size) {
        return Err(format!(
            "the module is {} bytes, more than the {MAX_MODULE_BYTES} an agent pulls",
            layer.size
        ));
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: &[(&str, i64)]) -> OciImageManifest {
        OciImageManifest {
            layers: layers
                .iter()
                .map(|(media_type, size)| OciDescriptor {
                    media_type: media_type.to_string(),
                    size: *size,
                    ..OciDescriptor::default()
                })
                .collect(),
            ..OciImageManifest::default()
        }
    }

    #[test]
    fn exactly_one_wasm_layer_within_the_budget() {
        assert!(wasm_layer(&manifest(&[("application/wasm", 10)])).is_ok());
        assert!(
            wasm_layer(&manifest(&[(
                oci_client::manifest::WASM_LAYER_MEDIA_TYPE,
                10
            )]))
            .is_ok()
        );
        let err = wasm_layer(&manifest(&[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            10,
        )]))
        .unwrap_err();
        assert!(err.contains("exactly one application/wasm layer"), "{err}");
        assert!(
            wasm_layer(&manifest(&[
                ("application/wasm", 1),
                ("application/wasm", 1)
            ]))
            .is_err()
        );
        assert!(wasm_layer(&manifest(&[("application/wasm", MAX_MODULE_BYTES + 1)])).is_err());
        assert!(wasm_layer(&manifest(&[])).is_err());
    }
}
