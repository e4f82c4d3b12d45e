//! A real Kubernetes control plane for edgewire's tests: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok, built
//! from their Go modules at pinned versions (`testenv/build.sh`) and run on
//! 127.0.0.1.
//!
//! ```no_run
//! # async fn demo() -> Result<(), edgewire_testenv::Error> {
//! let plane = edgewire_testenv::shared().await?;          // one per test binary
//! let ns = edgewire_testenv::TestNamespace::create(plane, "demo").await?;
//! // ... use ns.client and ns.name; the namespace is deleted on drop.
//! # Ok(()) }
//! ```

mod controlplane;
mod kubeconfig;
mod listeners;
pub mod nodes;
mod pki;
mod process;
pub mod realnode;
pub mod registry;

use std::time::Duration;

pub use controlplane::{
    ControlPlane, KUBERNETES_SERVICE_IP, NodeAccess, Options, Ports, State, bin_dir, binary,
    client_for, free_port, listening, stop_detached,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
pub use nodes::{NodeSpec, add_nodes};
pub use process::is_alive;
use tokio::sync::OnceCell;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); its log ends:\n{log}")]
    Exited {
        name: String,
        status: String,
        log: String,
    },
    #[error("{what} not ready in time (last error: {last}); {log}")]
    Timeout {
        what: String,
        last: String,
        log: String,
    },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The control plane shared by every test of one test binary, with kwok. It
/// is started on first use and torn down when the process exits, even when a
/// test failed.
pub async fn shared() -> Result<&'static ControlPlane, Error> {
    static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();
    SHARED
        .get_or_try_init(|| async {
            ControlPlane::start(Options {
                kwok: true,
                ..Options::default()
            })
            .await
        })
        .await
}

/// Creates the namespace `name`: for a test or benchmark with a control
/// plane of its own, where a fixed name will do.
pub async fn create_namespace(client: &kube::Client, name: &str) -> Result<(), Error> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(())
}

/// A namespace of its own for one test, deleted when dropped (also when the
/// test panics). Deletion goes through kubectl so it needs no async runtime.
pub struct TestNamespace {
    pub name: String,
    pub client: kube::Client,
    kubectl: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
}

impl TestNamespace {
    pub async fn create(plane: &ControlPlane, prefix: &str) -> Result<TestNamespace, Error> {
        let client = plane.client().await?;
        let api: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some([("edgewire.dev/test".to_string(), prefix.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = api.create(&PostParams::default(), &namespace).await?;
        let name = created
            .metadata
            .name
            .ok_or_else(|| Error::Setup("the created namespace has no name".into()))?;
        Ok(TestNamespace {
            name,
            client,
            kubectl: binary("kubectl")?,
            kubeconfig: plane.kubeconfig.clone(),
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The whole response (status line, headers, body) to `GET path` on
/// 127.0.0.1:`port`, or an empty string when nothing answers there: how
/// tests and benchmarks read a process' `/metrics`.
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out).await;
    out
}

/// The CRDs in the YAML files of `dir` (one per file), e.g. the repository's
/// `crds/`.
pub fn read_crds(dir: &std::path::Path) -> Result<Vec<CustomResourceDefinition>, Error> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    let mut crds = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io("listing CRDs", e))?.path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        crds.push(
            serde_yaml_ng::from_str(&text)
                .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?,
        );
    }
    Ok(crds)
}

/// Installs CRDs with server-side apply and waits until each is Established.
pub async fn install_crds(
    client: &kube::Client,
    crds: &[CustomResourceDefinition],
) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("edgewire-testenv").force();
    for crd in crds {
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::Setup("a CRD without a name".into()))?;
        api.patch(&name, &params, &Patch::Apply(crd)).await?;
        wait_established(&api, &name, Duration::from_secs(60)).await?;
    }
    Ok(())
}

async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let crd = api.get(name).await?;
        let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Setup(format!(
                "CRD {name} not Established in {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
