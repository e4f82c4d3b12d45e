//! A real OCI registry for the Wasm module tests: `registry` from
//! distribution (built by `testenv/build.sh`) on a loopback port with a
//! temporary storage directory, optionally behind an htpasswd user, and the
//! `oras` CLI to push to it. It can be stopped and started again on the same
//! port with the same storage (an unreachable registry, then a returning
//! one); it is killed and its directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{self, Component};
use crate::{Error, binary, free_port, listeners};

const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts tried when another program takes the port first.
const PORT_ATTEMPTS: u32 = 5;
/// The media type `oras push` gives a Wasm module's layer.
pub const WASM_MEDIA_TYPE: &str = "application/wasm";
/// The config media type of the CNCF Wasm OCI artifact layout.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";

/// A user the registry requires, and their password.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    credentials: Option<Credentials>,
    process: Option<Component>,
}

impl Registry {
    /// Starts a registry, open to all, or requiring `credentials`.
    pub async fn start(credentials: Option<Credentials>) -> Result<Registry, Error> {
        let dir = tempfile::Builder::new()
            .prefix("edgewire-registry-")
            .tempdir()
            .map_err(|e| Error::io("creating the registry's directory", e))?;
        if let Some(c) = &credentials {
            let hash = bcrypt::hash(&c.password, 5)
                .map_err(|e| Error::Setup(format!("hashing the registry password: {e}")))?;
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("{}:{hash}\n", c.username),
            )
            .map_err(|e| Error::io("writing htpasswd", e))?;
        }
        let mut registry = Registry {
            dir,
            port: 0,
            credentials,
            process: None,
        };
        for _ in 0..PORT_ATTEMPTS {
            registry.port = free_port()?;
            if registry.launch().await? {
                return Ok(registry);
            }
        }
        Err(Error::Setup(format!(
            "the registry lost its port to another program {PORT_ATTEMPTS} times"
        )))
    }

    /// `127.0.0.1:PORT`, the registry part of a reference.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the registry (its storage is kept).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process::stop_all(std::slice::from_mut(&mut process), Duration::from_secs(5));
        }
    }

    /// Starts the stopped registry again, on the same port and storage.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        if self.launch().await? {
            Ok(())
        } else {
            Err(Error::Setup(format!(
                "port {} was taken while the registry was stopped",
                self.port
            )))
        }
    }

    /// A Docker config (`docker login`'s format) with the registry's
    /// credentials: a file for the standalone agent, the data of a
    /// `kubernetes.io/dockerconfigjson` Secret.
    pub fn docker_config(&self) -> String {
        let auths = match &self.credentials {
            Some(c) => serde_json::json!({
                self.address(): {"username": c.username, "password": c.password}
            }),
            None => serde_json::json!({}),
        };
        serde_json::json!({ "auths": auths }).to_string()
    }

    /// Pushes `module` as `repository:tag` the way a user does (`oras push
    /// REF module.wasm:application/wasm`) and returns the manifest digest.
    pub fn push_wasm(&self, repository_tag: &str, module: &Path) -> Result<String, Error> {
        self.push(repository_tag, module, None)
    }

    /// Pushes `module` in the whole CNCF Wasm OCI artifact layout (what
    /// `wkg oci push` writes): its `application/wasm` layer beside a config
    /// of type `application/vnd.wasm.config.v0+json`; the manifest digest.
    pub fn push_wasm_artifact(&self, repository_tag: &str, module: &Path) -> Result<String, Error> {
        let bytes = std::fs::read(module).map_err(|e| Error::io("reading the module", e))?;
        let layer = crate::realnode::images::sha256(&bytes);
        let config = serde_json::json!({
            "created": "2026-01-01T00:00:00Z",
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer],
            "component": {"target": "wasi:http/proxy@0.2.0"},
        });
        let path = self.dir.path().join("wasm-config.json");
        std::fs::write(&path, config.to_string())
            .map_err(|e| Error::io("writing the artifact's config", e))?;
        self.push(repository_tag, module, Some(&path))
    }

    fn push(
        &self,
        repository_tag: &str,
        module: &Path,
        config: Option<&Path>,
    ) -> Result<String, Error> {
        let (dir, file) = match (module.parent(), module.file_name()) {
            (Some(dir), Some(file)) => (dir, file.to_string_lossy().into_owned()),
            _ => return Err(Error::Setup(format!("{} is not a file", module.display()))),
        };
        let reference = format!("{}/{repository_tag}", self.address());
        let mut oras = Command::new(binary("oras")?);
        oras.current_dir(dir)
            .args(["push", "--plain-http", "--format", "json"])
            .arg(&reference)
            .arg(format!("{file}:{WASM_MEDIA_TYPE}"))
            // oras keeps nothing of its own outside this registry's directory.
            .env("HOME", self.dir.path())
            .env("DOCKER_CONFIG", self.dir.path().join("oras-client"));
        if let Some(config) = config {
            oras.arg("--config")
                .arg(format!("{}:{WASM_CONFIG_MEDIA_TYPE}", config.display()));
        }
        if let Some(c) = &self.credentials {
            oras.args(["--username", &c.username, "--password", &c.password]);
        }
        let out = oras
            .output()
            .map_err(|e| Error::io("running oras push", e))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "oras push {reference} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            Error::Setup(format!(
                "oras push printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })?;
        answer["digest"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Setup(format!("oras push printed no digest: {answer}")))
    }

    /// The registry's log so far, for failure messages.
    pub fn log(&self) -> String {
        process::log_tail(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Starts the registry on `self.port`; false when the port was taken.
    async fn launch(&mut self) -> Result<bool, Error> {
        let config = self.dir.path().join("config.yml");
        std::fs::write(&config, self.config())
            .map_err(|e| Error::io("writing the registry config", e))?;
        let mut component = process::start(
            "registry",
            &binary("registry")?,
            &["serve".to_string(), config.display().to_string()],
            self.log_path(),
            false,
        )?;
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&component.log).unwrap_or_default();
            if listeners::lost_port_race(&log) {
                process::stop_all(std::slice::from_mut(&mut component), Duration::from_secs(1));
                return Ok(false);
            }
            if let Ok(Some(status)) = component.child.try_wait() {
                return Err(Error::Exited {
                    name: "registry".into(),
                    status: status.to_string(),
                    log: component.log_tail(),
                });
            }
            if listeners::process_listens(component.pid(), self.port) {
                self.process = Some(component);
                return Ok(true);
            }
            if started.elapsed() > START_TIMEOUT {
                let log = component.log_tail();
                process::stop_all(std::slice::from_mut(&mut component), Duration::from_secs(1));
                return Err(Error::Timeout {
                    what: format!("registry listening on {}", self.port),
                    last: String::new(),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn config(&self) -> String {
        let dir = self.dir.path().display();
        let auth = match &self.credentials {
            Some(_) => {
                format!("auth:\n  htpasswd:\n    realm: edgewire-test\n    path: {dir}/htpasswd\n")
            }
            None => String::new(),
        };
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {dir}/storage\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n{auth}",
            port = self.port
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
