//! Secrets an EdgeService names (`tls.secretName`, `auth.keySecret`, the
//! hub's `tokenSecret`, `caSecret` and `credentialsSecret`, an upstream's
//! `caSecret`): fetched from its namespace by name, one `get` each (the
//! agent may read only these, see the operator's per-namespace Role), and
//! stored in the state directory, readable by the agent alone. The rendered
//! config names the stored files, so a restart without the API server still
//! serves TLS and checks tokens (edge autonomy), and a rotated Secret
//! reaches the service through the files, which it reads again when they
//! change (the hub's token at each connect).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use edgewire_api::crd::EdgeService;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

const DIR: &str = "secrets";

/// Where the state directory keeps `key` of Secret `name` of `namespace`.
/// The parts are a DNS label, a DNS subdomain and a Secret key (checked
/// when rendered), so none can climb out of the directory.
pub fn file(state_dir: &Path, namespace: &str, name: &str, key: &str) -> PathBuf {
    state_dir.join(DIR).join(namespace).join(name).join(key)
}

/// The (Secret, key) pairs an EdgeService's agents need.
pub fn wanted(es: &EdgeService) -> Vec<(String, String)> {
    es.spec.stored_secret_keys()
}

/// Fetches what the EdgeServices in `placed` name and stores each key whose
/// bytes changed. Returns whether any stored file changed, and what could
/// not be fetched (`namespace/name` of the EdgeService, why). A Secret that
/// cannot be fetched now keeps the files last stored from it.
pub async fn sync(
    client: &Client,
    state_dir: &Path,
    placed: &[&EdgeService],
) -> (bool, Vec<(String, String)>) {
    let mut changed = false;
    let mut failures = Vec::new();
    for es in placed {
        let namespace = es.metadata.namespace.as_deref().unwrap_or_default();
        let service = format!(
            "{namespace}/{}",
            es.metadata.name.as_deref().unwrap_or_default()
        );
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let mut by_secret: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, key) in wanted(es) {
            by_secret.entry(name).or_default().push(key);
        }
        for (name, keys) in by_secret {
            let data = match api.get(&name).await {
                Ok(secret) => secret.data.unwrap_or_default(),
                Err(err) => {
                    failures.push((service.clone(), format!("cannot read Secret {name}: {err}")));
                    continue;
                }
            };
            for key in keys {
                let Some(bytes) = data.get(&key) else {
                    failures.push((service.clone(), format!("Secret {name} has no key {key:?}")));
                    continue;
                };
                match store(&file(state_dir, namespace, &name, &key), &bytes.0) {
                    Ok(wrote) => changed |= wrote,
                    Err(err) => failures.push((
                        service.clone(),
                        format!("cannot store Secret {name} key {key:?}: {err}"),
                    )),
                }
            }
        }
    }
    (changed, failures)
}

/// Writes `bytes` to `path` unless it already holds them: mode 0600 in
/// directories of mode 0700, beside and renamed, so a reader sees the old
/// bytes or the new, never half. True when it wrote.
fn store(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    if std::fs::read(path).is_ok_and(|have| have == bytes) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no directory"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let staged = path.with_extension("partial");
    let _ = std::fs::remove_file(&staged);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&staged, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn stores_once_readable_by_the_owner_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), "edge", "web-tls", "tls.key");
        assert!(store(&path, b"key one").unwrap());
        assert!(!store(&path, b"key one").unwrap(), "unchanged bytes");
        assert!(store(&path, b"key two").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"key two");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert!(!path.with_extension("partial").exists());
    }

    #[test]
    fn wants_the_tls_pair_the_auth_key_the_hubs_and_the_upstreams() {
        let es: EdgeService = serde_yaml_ng::from_str(
            "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata: {name: web, namespace: edge}\nspec:\n  port: 8443\n  tls: {secretName: web-tls}\n  auth: {algorithm: HS256, keySecret: {name: jwt, key: hs256}}\n  hub: {url: 'wss://hub/relay', tokenSecret: {name: hub, key: token}, caSecret: {name: hub, key: ca.crt}}\n  channels: [{name: t, uplink: true}]\n  handlers: [{name: u, kind: upstream, upstream: {url: 'https://cloud/u', caSecret: {name: cloud-ca, key: ca.crt}}}]\n",
        )
        .unwrap();
        let pair = |s: &str, k: &str| (s.to_string(), k.to_string());
        assert_eq!(
            wanted(&es),
            [
                pair("web-tls", "tls.crt"),
                pair("web-tls", "tls.key"),
                pair("jwt", "hs256"),
                pair("hub", "token"),
                pair("hub", "ca.crt"),
                pair("cloud-ca", "ca.crt"),
            ]
        );
    }
}
