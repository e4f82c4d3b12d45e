//! For the tests on the real control plane: the plane with the CRDs, the
//! operator and cluster-mode agents scoped to one test's namespace, objects
//! written by server-side apply, Secrets, the EdgeService's Degraded
//! condition, and bounded waits sized for a control plane, an operator and
//! agents on a loaded machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgewire_api::crd::EdgeService;
use edgewire_testenv::{ControlPlane, Options};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use super::prometheus::Killed;
use super::{AgentProcess, free_port, workspace_binary};

/// The longest wait for the cluster to act: a Secret change waits for the
/// agents' periodic fetch (15 s) on top of the operator's and agents' work.
pub const SLOW_WAIT: Duration = Duration::from_secs(120);

/// The CRDs as committed in `crds/`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    edgewire_testenv::read_crds(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds")))
        .expect("the committed CRDs")
}

/// A control plane of the test's own, with kwok for its fake Nodes, the
/// CRDs installed and `namespaces` created.
pub async fn start_plane(namespaces: &[&str]) -> (ControlPlane, kube::Client) {
    let plane = ControlPlane::start(Options {
        kwok: true,
        ..Options::default()
    })
    .await
    .expect("start the control plane");
    let client = plane.client().await.expect("a client of the control plane");
    edgewire_testenv::install_crds(&client, &crds())
        .await
        .expect("install the CRDs");
    for namespace in namespaces {
        edgewire_testenv::create_namespace(&client, namespace)
            .await
            .expect("create the namespace");
    }
    (plane, client)
}

/// The label a test puts on its Nodes: its operator and agents select by it.
pub fn test_label(namespace: &str) -> String {
    format!("edgewire.dev/test={namespace}")
}

/// The operator of one test: its lease and EdgeServices in `namespace`, the
/// Nodes labelled with `test_label(namespace)`, `flags` added; its log in
/// `log`. Killed when dropped.
pub fn spawn_operator(kubeconfig: &Path, namespace: &str, log: &Path, flags: &[&str]) -> Killed {
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = Command::new(workspace_binary("edgewire-operator"))
        .args(["run", "--metrics-address", &metrics])
        .args([
            "--lease-namespace",
            namespace,
            "--watch-namespace",
            namespace,
        ])
        .args(["--node-selector", &test_label(namespace)])
        .args(flags)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("the operator's log file"))
        .spawn()
        .expect("start the operator");
    Killed(child)
}

/// An agent in cluster mode for Node `node` of the test of `namespace`:
/// listening on `listen`, advertising `advertise`, renewing its node Lease
/// in `namespace` (the test operator's) every second, its state in `state`,
/// `flags` added.
pub fn spawn_cluster_agent(
    kubeconfig: &Path,
    namespace: &str,
    node: &str,
    addresses: (&str, &str),
    state: &Path,
    flags: &[&str],
) -> AgentProcess {
    spawn_cluster_agent_with_env(kubeconfig, namespace, node, addresses, state, flags, &[])
}

/// `spawn_cluster_agent` with `env` added to the agent's environment (a
/// shifted clock, say).
pub fn spawn_cluster_agent_with_env(
    kubeconfig: &Path,
    namespace: &str,
    node: &str,
    (listen, advertise): (&str, &str),
    state: &Path,
    flags: &[&str],
    env: &[(&str, &str)],
) -> AgentProcess {
    let label = test_label(namespace);
    let state = state.to_str().expect("a UTF-8 state directory");
    let mut args = vec![
        "--cluster",
        "--node-name",
        node,
        "--advertise-address",
        advertise,
        "--state-dir",
        state,
        "--heartbeat-interval",
        "1",
        "--lease-namespace",
        namespace,
        "--edge-node-label",
        &label,
    ];
    args.extend_from_slice(flags);
    let mut vars = vec![("KUBECONFIG", kubeconfig.to_str().expect("a UTF-8 path"))];
    vars.extend_from_slice(env);
    AgentProcess::spawn_with_env(listen, None, &args, &vars)
}

/// Server-side applies `object` as field manager `test`, taking over fields.
pub async fn apply<K>(api: &Api<K>, name: &str, object: &K)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// An Opaque Secret with one key.
pub fn opaque_secret(name: &str, key: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The EdgeService's Degraded condition: (status, reason, message).
pub fn degraded(es: &EdgeService) -> (String, String, String) {
    es.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Degraded")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Waits (at most `SLOW_WAIT`) until `check` holds; `what` and `log`
/// explain a failure.
pub async fn eventually<F, Fut>(what: &str, log: impl Fn() -> String, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SLOW_WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}\n{}", log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Makes the ServiceAccount `namespace/name` (the agents' identity the
/// operator grants Secrets to, with `--agent-service-account`).
pub async fn create_service_account(client: &kube::Client, namespace: &str, name: &str) {
    let mut account = ServiceAccount::default();
    account.metadata.name = Some(name.into());
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &account)
        .await
        .expect("create the ServiceAccount");
}

/// A client of `plane` that authenticates as the ServiceAccount
/// `namespace/name` only (a token requested for it, valid 10 minutes).
pub async fn service_account_client(
    plane: &ControlPlane,
    namespace: &str,
    name: &str,
) -> kube::Client {
    let admin = plane.client().await.expect("an admin client");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin, namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("a token request")
        .status
        .expect("a token")
        .token;
    let raw = kube::config::Kubeconfig::read_from(&plane.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(raw, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    kube::Client::try_from(config).unwrap()
}

/// What a `get` of a Secret answers: "ok", or the API's status code.
pub async fn get_secret_code(client: &kube::Client, namespace: &str, name: &str) -> String {
    match Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
    {
        Ok(_) => "ok".into(),
        Err(kube::Error::Api(e)) => e.code.to_string(),
        Err(e) => format!("error: {e}"),
    }
}
