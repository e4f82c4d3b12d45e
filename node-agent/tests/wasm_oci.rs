//! `wasm` handlers whose module is an OCI image (`module.image`), pulled by
//! real agent processes from a real registry (distribution's `registry`,
//! built by `testenv/build.sh`, on loopback) to which the tests push with
//! `oras`, as a user does: by tag, pinned by digest, with credentials, a new
//! tag rolling out, and a restart while the registry is down.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgewire_testenv::registry::{Credentials, Registry};
use serde_json::{Value, json};
use support::*;

/// Pulling and compiling a component in a debug agent on two busy cores.
const LOAD_WAIT: Duration = Duration::from_secs(120);

fn component(name: &str) -> PathBuf {
    let path = wasm_components().join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} missing", path.display());
    path
}

fn state_arg(state: &Path) -> &str {
    state.to_str().expect("UTF-8 temp path")
}

/// Starts an agent and waits until its services listen.
async fn start_agent(config: &str, args: &[&str]) -> AgentProcess {
    let agent = AgentProcess::spawn(Some(config), args);
    let deadline = Instant::now() + LOAD_WAIT;
    while !matches!(http_get(agent.admin, "/readyz").await, Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "agent not ready in time; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent
}

/// A service `edge` with one image handler `add` at /add.
fn add_config(reference: &str, extra: &str) -> String {
    format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - name: add
        kind: wasm
        path: /add
        module: {{image: "{reference}", plainHttp: true{extra}}}
"#
    )
}

/// The handler's module as /readyz reports it: (digest, reason).
async fn module_of(agent: &AgentProcess, handler: &str) -> (Option<String>, Option<String>) {
    let (_, ready) = agent.readyz().await;
    let module = ready["services"][0]["modules"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["handler"] == handler))
        .cloned()
        .unwrap_or(Value::Null);
    let text = |key: &str| module[key].as_str().map(str::to_string);
    (text("digest"), text("reason"))
}

/// Waits until the handler reports `want` (digest, reason).
async fn wait_module(
    agent: &AgentProcess,
    handler: &str,
    want: (Option<&str>, Option<&str>),
    registry: &Registry,
) {
    let deadline = Instant::now() + LOAD_WAIT;
    loop {
        let (digest, reason) = module_of(agent, handler).await;
        if (digest.as_deref(), reason.as_deref()) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "handler {handler} reports ({digest:?}, {reason:?}), not {want:?}; agent log:\n{}\nregistry log:\n{}",
            agent.log(),
            registry.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(addr, path).await.expect("HTTP answer");
    let value = serde_json::from_str(&body).unwrap_or_else(|_| json!({ "raw": body }));
    (status, value)
}

#[tokio::test]
async fn the_add_component_is_pulled_by_tag_and_answers() {
    pulled_and_served(|registry, tag| registry.push_wasm(tag, &component("add"))).await;
}

/// The whole CNCF Wasm OCI artifact layout (a config of type
/// `application/vnd.wasm.config.v0+json` beside the `application/wasm`
/// layer, as `wkg oci push` writes it) is pulled and served like the plain
/// one.
#[tokio::test]
async fn a_cncf_wasm_artifact_is_pulled_and_answers() {
    pulled_and_served(|registry, tag| registry.push_wasm_artifact(tag, &component("add"))).await;
}

/// Pushes `add` with `push`, names it by tag, and checks the agent reports
/// the pushed digest and serves it.
async fn pulled_and_served(
    push: impl Fn(&Registry, &str) -> Result<String, edgewire_testenv::Error>,
) {
    let registry = Registry::start(None).await.expect("registry");
    let digest = push(&registry, "edge/add:v1").expect("push add");
    let state = tempfile::tempdir().unwrap();
    let reference = format!("{}/edge/add:v1", registry.address());
    let agent = start_agent(
        &add_config(&reference, ""),
        &["--state-dir", state_arg(state.path())],
    )
    .await;
    wait_module(&agent, "add", (Some(&digest), None), &registry).await;
    let addr = agent.service_addr("edge").await;
    assert_eq!(
        get_json(addr, "/add?a=20&b=22").await,
        (200, json!({"result": 42}))
    );
}

#[tokio::test]
async fn a_pinned_digest_must_be_the_one_the_tag_resolves_to() {
    let registry = Registry::start(None).await.expect("registry");
    let add = registry
        .push_wasm("edge/add:v1", &component("add"))
        .expect("push add");
    let other = registry
        .push_wasm("edge/filter:v1", &component("telemetry_filter"))
        .expect("push the filter");
    let state = tempfile::tempdir().unwrap();
    let reference = format!("{}/edge/add:v1", registry.address());
    let config = format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - name: add
        kind: wasm
        path: /add
        module: {{image: "{reference}", plainHttp: true, digest: "{add}"}}
      - name: pinned-elsewhere
        kind: wasm
        path: /wrong
        module: {{image: "{reference}", plainHttp: true, digest: "{other}"}}
"#
    );
    let agent = start_agent(&config, &["--state-dir", state_arg(state.path())]).await;
    wait_module(&agent, "add", (Some(&add), None), &registry).await;
    wait_module(
        &agent,
        "pinned-elsewhere",
        (None, Some("ModuleDigestMismatch")),
        &registry,
    )
    .await;
    let addr = agent.service_addr("edge").await;
    assert_eq!(
        get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3}))
    );
    let (status, body) = http_get(addr, "/wrong?a=1&b=2").await.expect("answer");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ModuleDigestMismatch"), "{body}");
}

#[tokio::test]
async fn a_restarted_agent_serves_the_stored_module_while_the_registry_is_down() {
    let mut registry = Registry::start(None).await.expect("registry");
    let digest = registry
        .push_wasm("edge/add:v1", &component("add"))
        .expect("push add");
    let state = tempfile::tempdir().unwrap();
    let reference = format!("{}/edge/add:v1", registry.address());
    let config = add_config(&reference, "");
    let args = ["--state-dir", state_arg(state.path())];
    let first = start_agent(&config, &args).await;
    wait_module(&first, "add", (Some(&digest), None), &registry).await;
    drop(first);

    registry.stop();
    let again = start_agent(&config, &args).await;
    wait_module(&again, "add", (Some(&digest), None), &registry).await;
    let addr = again.service_addr("edge").await;
    assert_eq!(
        get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3}))
    );
    assert!(
        again.log().contains("serving the stored module"),
        "{}",
        again.log()
    );

    // Without a stored module, the same registry outage is a pull failure
    // that the handler reports and answers 503 for, until the registry is
    // back.
    let empty = tempfile::tempdir().unwrap();
    let fresh = start_agent(
        &config,
        &[
            "--state-dir",
            state_arg(empty.path()),
            "--image-recheck-interval",
            "1",
        ],
    )
    .await;
    wait_module(&fresh, "add", (None, Some("ModulePullFailed")), &registry).await;
    let addr = fresh.service_addr("edge").await;
    let (status, body) = http_get(addr, "/add?a=1&b=2").await.expect("answer");
    assert_eq!(status, 503, "{body}");
    registry.restart().await.expect("registry back");
    wait_module(&fresh, "add", (Some(&digest), None), &registry).await;
    assert_eq!(
        get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3}))
    );
}

#[tokio::test]
async fn a_protected_registry_needs_the_credentials_file() {
    let credentials = Credentials {
        username: "edge".into(),
        password: "pull-secret-42".into(),
    };
    let registry = Registry::start(Some(credentials)).await.expect("registry");
    let digest = registry
        .push_wasm("edge/add:v1", &component("add"))
        .expect("push add");
    let reference = format!("{}/edge/add:v1", registry.address());
    let config = add_config(&reference, "");

    let state = tempfile::tempdir().unwrap();
    let anonymous = start_agent(&config, &["--state-dir", state_arg(state.path())]).await;
    wait_module(
        &anonymous,
        "add",
        (None, Some("ModulePullFailed")),
        &registry,
    )
    .await;
    drop(anonymous);

    let docker = tempfile::tempdir().unwrap();
    let file = docker.path().join("config.json");
    std::fs::write(&file, registry.docker_config()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let agent = start_agent(
        &config,
        &[
            "--state-dir",
            state_arg(state.path()),
            "--registry-config",
            file.to_str().unwrap(),
        ],
    )
    .await;
    wait_module(&agent, "add", (Some(&digest), None), &registry).await;
    let addr = agent.service_addr("edge").await;
    assert_eq!(
        get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3}))
    );
}

#[tokio::test]
async fn a_tag_pushed_anew_rolls_out() {
    let registry = Registry::start(None).await.expect("registry");
    let first = registry
        .push_wasm("edge/add:stable", &component("add"))
        .expect("push add");
    let state = tempfile::tempdir().unwrap();
    let reference = format!("{}/edge/add:stable", registry.address());
    let agent = start_agent(
        &add_config(&reference, ""),
        &[
            "--state-dir",
            state_arg(state.path()),
            "--image-recheck-interval",
            "1",
        ],
    )
    .await;
    wait_module(&agent, "add", (Some(&first), None), &registry).await;
    let addr = agent.service_addr("edge").await;
    assert_eq!(
        get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3}))
    );

    // The same tag now names another component: the filter, which answers a
    // POST of a reading with the readings it keeps.
    let second = registry
        .push_wasm("edge/add:stable", &component("telemetry_filter"))
        .expect("push the filter under the same tag");
    assert_ne!(first, second);
    wait_module(&agent, "add", (Some(&second), None), &registry).await;
    let (status, body) = get_json(addr, "/add?a=1&b=2").await;
    assert_ne!(
        (status, &body),
        (200, &json!({"result": 3})),
        "still the old module"
    );
}

/// A registry that takes connections and never answers must not hold the
/// service: past a bounded wait it listens, its other handlers answer, and
/// the image handler answers 503 while its pull goes on.
#[tokio::test]
async fn an_unanswering_registry_does_not_hold_the_service() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback listener");
    let port = silent.local_addr().expect("its address").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let config = format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: native, kind: add, path: /native}}
      - name: add
        kind: wasm
        path: /add
        module: {{image: "127.0.0.1:{port}/edge/add:v1", plainHttp: true}}
"#
    );
    let state = tempfile::tempdir().unwrap();
    let agent = start_agent(&config, &["--state-dir", state_arg(state.path())]).await;
    let (_, ready) = agent.readyz().await;
    let module = ready["services"][0]["modules"][0].clone();
    assert_eq!(module["reason"], "ModulePullFailed", "{ready}");
    assert!(
        module["error"]
            .as_str()
            .is_some_and(|e| e.contains("pulling 127.0.0.1")),
        "the service waited for the pull to fail: {ready}"
    );
    let addr = agent.service_addr("edge").await;
    assert_eq!(
        get_json(addr, "/native?a=1&b=2").await,
        (200, json!({"result": 3}))
    );
    let (status, body) = http_get(addr, "/add?a=1&b=2").await.expect("answer");
    assert_eq!(status, 503, "{body}");
    holder.abort();
}
