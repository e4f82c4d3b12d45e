//! Wasm modules from ConfigMaps (`module.configMap`): fetched from the
//! EdgeService's namespace when the placement is rendered, stored in the
//! state directory by digest, and the config then names the file. So the
//! config stored for offline restarts still finds its code, and a module
//! that cannot be fetched now keeps the one last fetched. Image modules
//! (`module.image`) are pulled by their handlers; what is read here is the
//! pull Secret each names, and only those Secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgewire_api::{AgentConfig, ConfigMapKey, ModuleSource};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::handlers::wasm::{DockerConfig, ModuleStore};

const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

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
    let store = ModuleStore::new(state_dir);
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
            let file = match fetch(&api, &key).await.and_then(|bytes| {
                store.put(&bytes).map_err(|err| {
                    format!(
                        "cannot store the module in {}: {err}",
                        store.dir().display()
                    )
                })
            }) {
                Ok(file) => file,
                Err(why) => {
                    let kept = previous
                        .and_then(|p| p.service(&service.name))
                        .and_then(|s| s.handler(&handler.name))
                        .and_then(|h| h.module.as_ref()?.file.clone())
                        .map(PathBuf::from);
                    failures.push((service.name.clone(), handler.name.clone(), why));
                    kept.unwrap_or_else(|| {
                        store
                            .dir()
                            .join(format!("unfetched-{namespace}-{}-{}", key.name, key.key))
                    })
                }
            };
            handler.module = Some(ModuleSource::file(file.display().to_string()));
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

/// The pull Secrets the image modules of `config` name, by
/// `namespace/name`: each one's Docker config, or why it cannot be used.
pub async fn pull_secrets(
    client: &Client,
    config: &AgentConfig,
) -> BTreeMap<String, Result<DockerConfig, String>> {
    let mut secrets = BTreeMap::new();
    for service in &config.services {
        let Some((namespace, _)) = service.name.split_once('/') else {
            continue;
        };
        for handler in &service.handlers {
            let Some(name) = handler
                .module
                .as_ref()
                .and_then(|m| m.image_pull_secret.as_deref())
            else {
                continue;
            };
            let key = format!("{namespace}/{name}");
            if secrets.contains_key(&key) {
                continue;
            }
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let read = api
                .get(name)
                .await
                .map_err(|err| format!("cannot read the pull Secret {key}: {err}"))
                .and_then(|secret| docker_config(&key, secret));
            secrets.insert(key, read);
        }
    }
    secrets
}

fn docker_config(key: &str, secret: Secret) -> Result<DockerConfig, String> {
    if secret.type_.as_deref() != Some(DOCKER_CONFIG_TYPE) {
        return Err(format!(
            "the pull Secret {key} is of type {:?}, not {DOCKER_CONFIG_TYPE}",
            secret.type_.unwrap_or_default()
        ));
    }
    let bytes = secret
        .data
        .and_then(|mut data| data.remove(DOCKER_CONFIG_KEY))
        .ok_or_else(|| format!("the pull Secret {key} has no {DOCKER_CONFIG_KEY}"))?;
    DockerConfig::parse(&bytes.0).map_err(|err| format!("the pull Secret {key}: {err}"))
}
