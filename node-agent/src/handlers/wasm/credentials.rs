//! Registry credentials for image modules, in the Docker config format that
//! `docker login`, `oras login` and `kubernetes.io/dockerconfigjson` Secrets
//! share: `{"auths": {"registry:port": {"auth": base64("user:password")}}}`
//! (or `username` and `password`). The standalone agent reads them from a
//! file; in a cluster they come from the Secret a module names.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl DockerConfig {
    pub fn parse(bytes: &[u8]) -> Result<DockerConfig, String> {
        serde_json::from_slice(bytes).map_err(|err| format!("not a Docker config: {err}"))
    }

    /// The credentials for `registry` (`host` or `host:port`), anonymous when
    /// none are listed. Keys may be written as URLs (`https://host/v1/`).
    pub fn auth_for(&self, registry: &str) -> Result<RegistryAuth, String> {
        let Some(entry) = self
            .auths
            .iter()
            .find(|(key, _)| registry_of(key) == registry)
            .map(|(_, entry)| entry)
        else {
            return Ok(RegistryAuth::Anonymous);
        };
        if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
        }
        let Some(auth) = &entry.auth else {
            return Ok(RegistryAuth::Anonymous);
        };
        let decoded = STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| {
                format!("the credentials for {registry} are not base64 user:password")
            })?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| format!("the credentials for {registry} are not user:password"))?;
        Ok(RegistryAuth::Basic(user.into(), password.into()))
    }
}

/// `host[:port]` of a Docker config key, which may be a bare host or a URL;
/// Docker Hub under the one name references use for it.
fn registry_of(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    match key.split('/').next().unwrap_or(key) {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        host => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(auth: RegistryAuth) -> (String, String) {
        match auth {
            RegistryAuth::Basic(user, password) => (user, password),
            other => panic!("expected basic credentials, got {other:?}"),
        }
    }

    #[test]
    fn credentials_by_registry_in_both_forms() {
        let config = DockerConfig::parse(
            br#"{"auths": {
                "127.0.0.1:5000": {"auth": "ZWRnZTpzM2NyZXQ="},
                "https://registry.example.com/v1/": {"username": "u", "password": "p"},
                "broken.example.com": {"auth": "%%%"},
                "https://index.docker.io/v1/": {"username": "hub", "password": "h"}
            }}"#,
        )
        .unwrap();
        assert_eq!(
            basic(config.auth_for("127.0.0.1:5000").unwrap()),
            ("edge".into(), "s3cret".into())
        );
        assert_eq!(
            basic(config.auth_for("registry.example.com").unwrap()),
            ("u".into(), "p".into())
        );
        assert!(matches!(
            config.auth_for("127.0.0.1:5001").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(config.auth_for("broken.example.com").is_err());
        assert_eq!(
            basic(config.auth_for("docker.io").unwrap()),
            ("hub".into(), "h".into())
        );
        assert!(DockerConfig::parse(b"not json").is_err());
    }
}
