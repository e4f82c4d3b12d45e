//! Wasm modules from ConfigMaps (`module.configMap`): fetched from the
//! EdgeService's namespace when the placement is rendered, stored in the
//! state directory by digest, and the config then names the file. So the
//! config stored for offline restarts still finds its code, and a module
//! that cannot be fetched now keeps the one last fetched.

use std::path::{Path, PathBuf};

use edgewire_api::{AgentConfig, ConfigMapKey, ModuleSource};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

const DIR: &str = "modules";

/// Replaces each `configMap` module source in `config` with the file it was
/// stored as. Returns what could not be fetched (service, handler, why);
/// such a handler keeps the file of `previous` if it had one, else names a
/// file that does not exist (it answers 503 and its status says so).
pub async fn resolve(
    client: &Client,
    state_dir: &Path,
    config: &mut AgentConfig,
    previous: Option<&AgentConfig>,
) -> Vec<(String, String, String)> {
    let mut failures = Vec::new();
    for service in &mut config.services {
        let Some((namespace, _)) = service.name.split_once('/') else {
            continue;
        };
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        for handler in &mut service.handlers {
            let Some(key) = handler.module.as_ref().and_then(|m| m.config_map.clone()) else {
                continue;
            };
            let file = match fetch(&api, &key)
                .await
                .and_then(|bytes| store(state_dir, &bytes))
            {
                Ok(file) => file,
                Err(why) => {
                    let kept = previous
                        .and_then(|p| p.service(&service.name))
                        .and_then(|s| s.handler(&handler.name))
                        .and_then(|h| h.module.as_ref()?.file.clone())
                        .map(PathBuf::from);
                    failures.push((service.name.clone(), handler.name.clone(), why));
                    kept.unwrap_or_else(|| {
                        state_dir
                            .join(DIR)
                            .join(format!("unfetched-{namespace}-{}-{}", key.name, key.key))
                    })
                }
            };
            handler.module = Some(ModuleSource {
                file: Some(file.display().to_string()),
                config_map: None,
            });
        }
    }
    failures
}

async fn fetch(api: &Api<ConfigMap>, key: &ConfigMapKey) -> Result<Vec<u8>, String> {
    let map = api
        .get(&key.name)
        .await
        .map_err(|err| format!("cannot read ConfigMap {}: {err}", key.name))?;
    map.binary_data
        .and_then(|mut data| data.remove(&key.key))
        .map(|bytes| bytes.0)
        .ok_or_else(|| format!("ConfigMap {} has no binaryData key {:?}", key.name, key.key))
}

/// Writes the module as `modules/<sha256>.wasm` (once; beside and renamed).
fn store(state_dir: &Path, bytes: &[u8]) -> Result<PathBuf, String> {
    let digest = crate::handlers::wasm::digest(bytes);
    let hex = digest.trim_start_matches("sha256:");
    let dir = state_dir.join(DIR);
    let file = dir.join(format!("{hex}.wasm"));
    if file.is_file() {
        return Ok(file);
    }
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let partial = dir.join(format!("{hex}.partial"));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, &file)
    };
    write().map_err(|err| format!("cannot store the module in {}: {err}", dir.display()))?;
    Ok(file)
}
