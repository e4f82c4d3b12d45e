//! `wasm` handlers with real agent processes and real clients: the example
//! components from `examples/wasm/` (built here for wasm32-wasip2 when the
//! test command has not built them yet) reached over HTTP, the relay's
//! `call` and as a channel processor; hostile components that must fail
//! alone; a broken module replaced by a good one without a restart; every
//! call finding the module's memory as loaded, whatever the calls before it
//! wrote; outbound HTTP to listed hosts only, measured.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

/// Loading (compiling) a few components in a debug agent on two busy cores.
const LOAD_WAIT: Duration = Duration::from_secs(120);

fn component(name: &str) -> String {
    let path = wasm_components().join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} missing", path.display());
    path.display().to_string()
}

/// Starts an agent with its own state directory and waits (long: modules
/// compile before the service is up) until it is ready.
async fn start_agent(config: &str, state: &Path) -> AgentProcess {
    let agent = AgentProcess::spawn(
        Some(config),
        &["--state-dir", state.to_str().expect("UTF-8 temp path")],
    );
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

/// [`start_agent`], and the address of its service `edge`.
async fn start_edge(config: &str, state: &Path) -> (AgentProcess, SocketAddr) {
    let agent = start_agent(config, state).await;
    let addr = agent.service_addr("edge").await;
    (agent, addr)
}

/// One HTTP/1.1 request with hyper's client; status, headers and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    http_with_headers(addr, method, path, &[], body).await
}

async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP handshake");
    let driver = tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    driver.abort();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = http(addr, "GET", path, "").await;
    let value = serde_json::from_str(&body).unwrap_or_else(|_| json!({ "raw": body }));
    (status, value)
}

async fn module_reasons(agent: &AgentProcess, service: &str) -> Vec<(String, String)> {
    let (_, ready) = agent.readyz().await;
    ready["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == service))
        .and_then(|s| s["modules"].as_array())
        .map(|modules| {
            modules
                .iter()
                .map(|m| {
                    let handler = m["handler"].as_str().unwrap_or_default().to_string();
                    let state = m["reason"]
                        .as_str()
                        .or(m["digest"].as_str().map(|_| "Loaded"))
                        .unwrap_or_default()
                        .to_string();
                    (handler, state)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_add_component_answers_http_and_relay_calls() {
    let state = tempfile::tempdir().unwrap();
    let config = add_service("edge", 0);
    let (agent, addr) = start_edge(&config, state.path()).await;

    assert_eq!(
        get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3}))
    );
    let (status, headers, body) = http(addr, "POST", "/add", r#"{"a": 40, "b": 2}"#).await;
    assert_eq!((status, body.as_str()), (200, r#"{"result":42}"#));
    assert_eq!(headers["content-type"], "application/json");
    let (status, bad) = get_json(addr, "/add?a=x&b=2").await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap_or_default().contains("\"a\""),
        "{bad}"
    );

    let mut ws = connect(addr, "/relay").await;
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": 7, "handler": "add", "args": {"a": 2, "b": 3}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"type": "result", "id": 7, "handler": "add", "result": {"result": 5}})
    );
    let refused = request(
        &mut ws,
        json!({"type": "call", "id": 8, "handler": "add", "args": {"a": "two"}}),
    )
    .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "handler_failed", "{refused}");
    assert_eq!(refused["status"], 400, "{refused}");
    assert_eq!(refused["id"], 8, "{refused}");

    // Compiled once, kept by digest for the next start.
    let cached = cached_code(state.path());
    assert_eq!(cached.len(), 1, "{cached:?}");
    let metrics = agent.metrics().await;
    assert!(
        metric_value(
            &metrics,
            r#"edgewire_handler_duration_seconds_count{handler="add",service="edge"}"#
        ) >= 4.0,
        "{metrics}"
    );
}

/// Compiled code is kept by digest: a restart loads it rather than
/// compiling again (the file is not rewritten), and a damaged copy is
/// compiled again, with a warning, instead of failing the handler.
#[tokio::test]
async fn compiled_code_is_reused_after_a_restart_and_a_damaged_copy_is_replaced() {
    use std::os::unix::fs::MetadataExt;
    let state = tempfile::tempdir().unwrap();
    let config = add_service("edge", 0);
    let cached = || -> PathBuf {
        let files = cached_code(state.path());
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    };
    let stamp = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (meta.ino(), meta.mtime_nsec(), meta.len())
    };

    let (agent, addr) = start_edge(&config, state.path()).await;
    assert_eq!(get_json(addr, "/add?a=1&b=2").await.0, 200);
    drop(agent);
    let file = cached();
    let first = stamp(&file);

    let (agent, addr) = start_edge(&config, state.path()).await;
    assert_eq!(
        get_json(addr, "/add?a=2&b=2").await,
        (200, json!({"result": 4}))
    );
    assert_eq!(
        stamp(&cached()),
        first,
        "the stored code was loaded, not rewritten"
    );
    drop(agent);

    std::fs::write(&file, b"not machine code").unwrap();
    let (agent, addr) = start_edge(&config, state.path()).await;
    assert_eq!(
        get_json(addr, "/add?a=3&b=2").await,
        (200, json!({"result": 5}))
    );
    let log = agent.log();
    assert!(
        log.contains("cached Wasm code unusable; compiling again"),
        "{log}"
    );
    assert!(
        std::fs::metadata(cached()).unwrap().len() > 1024,
        "the damaged copy was replaced"
    );
}

/// The service `name` on `port` with the `add` component at `/add`.
fn add_service(name: &str, port: u16) -> String {
    format!(
        r#"
services:
  - name: {name}
    port: {port}
    handlers:
      - {{name: add, kind: wasm, path: /add, module: {{file: "{add}"}}}}
"#,
        add = component("add")
    )
}

/// The compiled code kept in the state directory `state`.
fn cached_code(state: &Path) -> Vec<PathBuf> {
    walk(&state.join("wasm-cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The seed's HTTP client, unchanged, asks `http://0.0.0.0:5000/add`: the
/// component serves it on the seed's port.
#[tokio::test]
async fn the_seed_http_client_works_against_the_add_component() {
    let state = tempfile::tempdir().unwrap();
    let config = add_service("compute", 5000);
    let agent = start_agent(&config, state.path()).await;
    let out = tokio::task::spawn_blocking(|| run_seed_client("http_client.py"))
        .await
        .unwrap();
    assert_eq!(out, "Result: 3\n");
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_handler_duration_seconds_count{handler="add",service="compute"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn hostile_components_fail_alone_and_the_next_call_is_served() {
    let state = tempfile::tempdir().unwrap();
    let modules = tempfile::tempdir().unwrap();
    let broken = modules.path().join("broken.wasm");
    std::fs::write(&broken, b"\0asm this is not a component").unwrap();
    let config = format!(
        r#"
services:
  - name: hostile
    port: 0
    handlers:
      - {{name: add, kind: wasm, path: /add, module: {{file: "{add}"}}}}
      - name: spin
        kind: wasm
        path: /spin
        module: {{file: "{spin}"}}
        limits: {{timeoutMs: 500}}
      - name: bomb
        kind: wasm
        path: /bomb
        module: {{file: "{bomb}"}}
        limits: {{maxMemoryBytes: 16777216}}
      - {{name: command, kind: wasm, path: /command, module: {{file: "{command}"}}}}
      - {{name: broken, kind: wasm, path: /broken, module: {{file: "{broken}"}}}}
      - {{name: echo, kind: echo, path: /echo}}
"#,
        add = component("add"),
        spin = component("infinite_loop"),
        bomb = component("memory_bomb"),
        command = component("missing-export"),
        broken = broken.display(),
    );
    let agent = start_agent(&config, state.path()).await;
    let addr = agent.service_addr("hostile").await;

    let mut reasons = module_reasons(&agent, "hostile").await;
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("add".to_string(), "Loaded".to_string()),
            ("bomb".into(), "Loaded".into()),
            ("broken".into(), "ModuleInvalid".into()),
            ("command".into(), "ModuleMissingExport".into()),
            ("spin".into(), "Loaded".into()),
        ]
    );

    for round in 0..2 {
        let started = Instant::now();
        let (status, body) = get_json(addr, "/spin").await;
        assert_eq!(status, 504, "round {round}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "round {round}: the deadline did not stop the loop"
        );
        assert_eq!(
            get_json(addr, "/add?a=1&b=2").await,
            (200, json!({"result": 3})),
            "round {round}: after the loop"
        );

        let (status, body) = get_json(addr, "/bomb").await;
        assert_eq!(status, 500, "round {round}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("memory"),
            "round {round}: {body}"
        );
        assert_eq!(
            get_json(addr, "/add?a=2&b=2").await,
            (200, json!({"result": 4})),
            "round {round}: after the bomb"
        );

        for (path, reason) in [
            ("/command", "ModuleMissingExport"),
            ("/broken", "ModuleInvalid"),
        ] {
            let (status, headers, body) = http(addr, "GET", path, "").await;
            assert_eq!(status, 503, "{path}: {body}");
            assert!(body.contains(reason), "{path}: {body}");
            assert_eq!(headers["retry-after"], "1", "{path}");
        }
    }
    let (status, _, body) = http(addr, "GET", "/echo?text=still", "").await;
    assert_eq!((status, body.as_str()), (200, "Echo: still"));

    let metrics = agent.metrics().await;
    for (handler, reason, count) in [
        ("spin", "timeout", 2.0),
        ("bomb", "memory", 2.0),
        ("command", "unavailable", 2.0),
        ("broken", "unavailable", 2.0),
        ("add", "trap", 0.0),
    ] {
        let series = format!(
            r#"edgewire_handler_errors_total{{handler="{handler}",reason="{reason}",service="hostile"}}"#
        );
        assert_eq!(metric_value(&metrics, &series), count, "{series}");
    }

    // A good module arrives at the broken one's path: served without a restart.
    let staged = modules.path().join("staged.wasm");
    std::fs::copy(component("add"), &staged).unwrap();
    std::fs::rename(&staged, &broken).unwrap();
    let deadline = Instant::now() + LOAD_WAIT;
    loop {
        let (status, body) = get_json(addr, "/broken?a=5&b=5").await;
        if status == 200 {
            assert_eq!(body, json!({"result": 10}));
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "the new module was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ready, _) = agent.readyz().await;
    assert_eq!(ready, 200, "the agent stayed ready throughout");
}

#[tokio::test]
async fn a_processor_filters_and_enriches_published_messages() {
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
services:
  - name: sensors
    port: 0
    handlers:
      - {{name: filter, kind: wasm, module: {{file: "{filter}"}}}}
    channels:
      - {{name: telemetry, processor: filter}}
      - {{name: raw}}
"#,
        filter = component("telemetry_filter")
    );
    let agent = start_agent(&config, state.path()).await;
    let addr = agent.service_addr("sensors").await;

    let mut subscriber = connect(addr, "/relay").await;
    for channel in ["telemetry", "raw"] {
        let ack = request(
            &mut subscriber,
            json!({"type": "subscribe", "id": channel, "channel": channel}),
        )
        .await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    let mut publisher = connect(addr, "/relay").await;
    for (i, data) in [
        json!({"sensor": "s1", "t": 21.5}),
        json!({"sensor": "s1", "t": 999}),
        json!({"sensor": "s2"}),
        json!({"sensor": "s2", "t": 35}),
    ]
    .into_iter()
    .enumerate()
    {
        let ack = request(
            &mut publisher,
            json!({"type": "publish", "id": i, "channel": "telemetry", "data": data}),
        )
        .await;
        assert_eq!(
            ack,
            json!({"type": "published", "id": i, "channel": "telemetry"})
        );
    }
    // A channel without a processor delivers as it always did.
    send_text(
        &mut publisher,
        json!({"type": "publish", "channel": "raw", "data": {"t": 999}}).to_string(),
    )
    .await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_json(&mut subscriber).await);
    }
    assert_eq!(
        got,
        [
            json!({"type": "message", "channel": "telemetry", "data": {"sensor": "s1", "t": 21.5, "alert": false}}),
            json!({"type": "message", "channel": "telemetry", "data": {"sensor": "s2", "t": 35, "alert": true}}),
            json!({"type": "message", "channel": "raw", "data": {"t": 999}}),
        ]
    );
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_handler_duration_seconds_count{handler="filter",service="sensors"}"#
        ),
        4.0
    );
}

/// What a component is given: its request (method, path and query, headers,
/// body), and nothing of the host: no file, no directory, no socket, no
/// environment.
#[tokio::test]
async fn a_component_sees_its_request_and_nothing_of_the_host() {
    // A listener the component is asked to connect to: nothing may arrive.
    let bait = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: probe, kind: wasm, path: /probe, module: {{file: "{probe}"}}}}
"#,
        probe = component("probe")
    );
    let (_agent, addr) = start_edge(&config, state.path()).await;

    let path = format!("/probe?tcp={}&x=1", bait.local_addr().unwrap());
    let (status, _, body) =
        http_with_headers(addr, "POST", &path, &[("x-probe", "hello")], "12345").await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["method"], "POST", "{report}");
    assert_eq!(report["path"], path.as_str(), "{report}");
    assert_eq!(report["header"], "hello", "{report}");
    assert_eq!(report["bodyBytes"], 5, "{report}");
    assert_eq!(report["env"], 0, "{report}");
    for reach in ["file", "dir", "tcp"] {
        let text = report[reach].as_str().unwrap_or_default();
        assert!(text.starts_with("error"), "{reach} reached: {report}");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(300), bait.accept()).await;
    assert!(accepted.is_err(), "the component connected out");
}

/// Each limit answers for itself, is counted by its reason, and leaves the
/// next call served: a trap (500), a request body over `maxRequestBytes`
/// (413), a response over `maxResponseBytes` (502), and a call that waits
/// for one of `maxInstances` within its deadline, not beside it (504 at
/// its own deadline).
#[tokio::test]
async fn traps_body_caps_and_waiting_for_an_instance_answer_for_themselves() {
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: probe, kind: wasm, path: /probe, module: {{file: "{probe}"}}}}
      - {{name: small-in, kind: wasm, path: /small-in, module: {{file: "{add}"}}, limits: {{maxRequestBytes: 64}}}}
      - {{name: small-out, kind: wasm, path: /small-out, module: {{file: "{add}"}}, limits: {{maxResponseBytes: 8}}}}
      - {{name: one, kind: wasm, path: /one, module: {{file: "{spin}"}}, limits: {{maxInstances: 1, timeoutMs: 3000}}}}
"#,
        probe = component("probe"),
        add = component("add"),
        spin = component("infinite_loop"),
    );
    let (agent, addr) = start_edge(&config, state.path()).await;

    let (status, body) = get_json(addr, "/probe?do=trap").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(get_json(addr, "/probe").await.0, 200, "after the trap");

    let big = format!(r#"{{"a": 1, "b": 2, "pad": "{}"}}"#, "x".repeat(64));
    let (status, _, body) = http(addr, "POST", "/small-in", &big).await;
    assert_eq!(status, 413, "{body}");
    let (status, _, body) = http(addr, "POST", "/small-in", r#"{"a": 1, "b": 2}"#).await;
    assert_eq!((status, body.as_str()), (200, r#"{"result":3}"#));

    // `{"result":3}` is 12 bytes.
    let (status, body) = get_json(addr, "/small-out?a=1&b=2").await;
    assert_eq!(status, 502, "{body}");

    // The second call, sent 1 s after the first, waits for the only
    // instance; the wait counts against its deadline, so it ends at its own
    // deadline (3 s after it was sent), not a whole deadline after the first
    // call's (5 s).
    let (first, (second, waited)) = tokio::join!(get_json(addr, "/one"), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sent = Instant::now();
        (get_json(addr, "/one").await, sent.elapsed())
    });
    assert_eq!((first.0, second.0), (504, 504), "{first:?} {second:?}");
    assert!(
        waited < Duration::from_millis(4200),
        "the wait for an instance was not counted against the deadline: {waited:?}"
    );

    let metrics = agent.metrics().await;
    let errors = |handler: &str, reason: &str| {
        metric_value(
            &metrics,
            &format!(
                r#"edgewire_handler_errors_total{{handler="{handler}",reason="{reason}",service="edge"}}"#
            ),
        )
    };
    assert_eq!(errors("probe", "trap"), 1.0, "{metrics}");
    assert_eq!(errors("small-in", "request_too_large"), 1.0, "{metrics}");
    assert_eq!(errors("small-out", "response_too_large"), 1.0, "{metrics}");
    assert_eq!(errors("one", "timeout"), 2.0, "{metrics}");
    let (ready, _) = agent.readyz().await;
    assert_eq!(ready, 200, "the agent stayed ready throughout");
}

/// A processor that answers several messages fans each out in order; one
/// that fails delivers nothing of that publish, whose publisher is told, and
/// the next publish is processed as before.
#[tokio::test]
async fn a_processor_fans_out_and_a_failing_one_delivers_nothing() {
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: probe, kind: wasm, module: {{file: "{probe}"}}}}
    channels:
      - {{name: fan, processor: probe}}
"#,
        probe = component("probe")
    );
    let (agent, addr) = start_edge(&config, state.path()).await;
    let mut subscriber = connect(addr, "/relay").await;
    let ack = request(
        &mut subscriber,
        json!({"type": "subscribe", "id": 1, "channel": "fan"}),
    )
    .await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    let mut publisher = connect(addr, "/relay").await;

    let ack = request(
        &mut publisher,
        json!({"type": "publish", "id": 1, "channel": "fan", "data": {"copies": 3}}),
    )
    .await;
    assert_eq!(ack["type"], "published", "{ack}");
    let failed = request(
        &mut publisher,
        json!({"type": "publish", "id": 2, "channel": "fan", "data": {"trap": true}}),
    )
    .await;
    assert_eq!(failed["type"], "error", "{failed}");
    assert_eq!(failed["code"], "handler_failed", "{failed}");
    assert_eq!(failed["id"], 2, "{failed}");
    let ack = request(
        &mut publisher,
        json!({"type": "publish", "id": 3, "channel": "fan", "data": {"copies": 1}}),
    )
    .await;
    assert_eq!(ack["type"], "published", "{ack}");

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_json(&mut subscriber).await["data"].clone());
    }
    assert_eq!(
        got,
        [
            json!({"copy": 0}),
            json!({"copy": 1}),
            json!({"copy": 2}),
            json!({"copy": 0})
        ]
    );
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_messages_dropped_total{reason="handler_failed",service="edge"}"#
        ),
        1.0,
        "{metrics}"
    );
}

/// A "cloud" for outbound calls: `POST /sum` with `{"a":..,"b":..}`
/// answers `{"sum":..}`; it counts what it was asked. Stops on drop.
struct Cloud {
    addr: SocketAddr,
    asked: Arc<AtomicU32>,
    _task: AbortOnDropHandle<()>,
}

impl Cloud {
    async fn start() -> Cloud {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&asked);
        let task = tokio::spawn(async move {
            // Bounded by the test's life: aborted on drop.
            while let Ok((tcp, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let counter = Arc::clone(&counter);
                        async move {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let body = req.into_body().collect().await?.to_bytes();
                            let args: Value = serde_json::from_slice(&body).unwrap_or_default();
                            let sum =
                                args["a"].as_i64().unwrap_or(0) + args["b"].as_i64().unwrap_or(0);
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                                json!({ "sum": sum }).to_string(),
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Cloud {
            addr,
            asked,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

/// Outbound HTTP from a component reaches only the hosts its handler's
/// `allowedOutboundHosts` lists (none by default): a refused request fails
/// inside the component, which answers for itself, and never reaches the
/// upstream. What goes out is measured like an `upstream` handler's
/// attempts: each request timed in T_cloud, its body bytes both ways in
/// C_data.
#[tokio::test]
async fn outbound_http_reaches_only_allowed_hosts_and_is_measured() {
    let cloud = Cloud::start().await;
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: ask, kind: wasm, path: /ask, module: {{file: "{module}"}}, allowedOutboundHosts: ["{cloud}"]}}
      - {{name: closed, kind: wasm, path: /closed, module: {{file: "{module}"}}}}
"#,
        module = component("ask_cloud"),
        cloud = cloud.addr
    );
    let (agent, addr) = start_edge(&config, state.path()).await;
    let args = r#"{"a": 40, "b": 2}"#;

    let (status, _, body) =
        http(addr, "POST", &format!("/ask?upstream={}", cloud.addr), args).await;
    assert_eq!((status, body.as_str()), (200, r#"{"sum":42}"#));

    // Denied: the same host from a handler without the list, and another
    // port of the listed host.
    let (status, _, body) = http(
        addr,
        "POST",
        &format!("/closed?upstream={}", cloud.addr),
        args,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let elsewhere = format!("127.0.0.1:{}", free_port());
    let (status, _, body) = http(addr, "POST", &format!("/ask?upstream={elsewhere}"), args).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    assert_eq!(
        cloud.asked.load(Ordering::SeqCst),
        1,
        "only the allowed call went out"
    );

    let metrics = agent.metrics().await;
    let value = |series: &str| metric_value(&metrics, series);
    assert_eq!(
        value(
            r#"edgewire_upstream_duration_seconds_count{outcome="ok",service="edge",upstream="ask"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value(r#"edgewire_upstream_bytes_total{direction="sent",service="edge",upstream="ask"}"#),
        args.len() as f64,
        "{metrics}"
    );
    assert_eq!(
        value(
            r#"edgewire_upstream_bytes_total{direction="received",service="edge",upstream="ask"}"#
        ),
        r#"{"sum":42}"#.len() as f64,
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"upstream="closed""#),
        "a handler that may not call out has no upstream series: {metrics}"
    );
}

#[tokio::test]
async fn every_call_finds_the_module_as_loaded_never_what_a_call_before_left() {
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
services:
  - name: fresh
    port: 0
    handlers:
      - {{name: fresh, kind: wasm, path: /fresh, module: {{file: "{fresh}"}}, limits: {{maxInstances: 4}}}}
"#,
        fresh = component("fresh_state")
    );
    let agent = start_agent(&config, state.path()).await;
    let addr = agent.service_addr("fresh").await;
    let pristine = json!({"data": 7, "bss": 0, "pages": 0, "heap": 0});

    // One after another, so each call takes the slot the last one left
    // (the pool prefers the slot a module ran in), then a few at once.
    for call in 0..40 {
        assert_eq!(
            get_json(addr, "/fresh").await,
            (200, pristine.clone()),
            "call {call}"
        );
    }
    let callers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..10 {
                    seen.push(get_json(addr, "/fresh").await);
                }
                seen
            })
        })
        .collect();
    for caller in callers {
        for (status, body) in caller.await.expect("caller") {
            // Four callers and four instances: none is ever refused.
            assert_eq!((status, &body), (200, &pristine));
        }
    }
}
