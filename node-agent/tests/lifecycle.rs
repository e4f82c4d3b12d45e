//! The agent as a process: health and metrics endpoints, config reloads that
//! spare unchanged services, refused configs, and shutdown on SIGTERM.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const TWO_SERVICES: &str = r#"
services:
  - name: steady
    port: 0
    handlers: [{name: echo, kind: echo, path: /}]
  - name: changing
    port: 0
    handlers: [{name: echo, kind: echo, path: /}]
"#;

/// Every agent metric of DESIGN.md, present before any traffic.
const CONTRACT_METRICS: &[&str] = &[
    "edgewire_connections",
    "edgewire_connections_total",
    "edgewire_handshake_duration_seconds",
    "edgewire_message_latency_seconds",
    "edgewire_handler_duration_seconds",
    "edgewire_upstream_duration_seconds",
    "edgewire_upstream_bytes_total",
    "edgewire_messages_total",
    "edgewire_messages_dropped_total",
    "edgewire_mesh_peers",
];

#[tokio::test]
async fn health_readiness_and_every_contract_metric() {
    // The upstream series exist per upstream handler (labelled with its
    // name, never its URL): one that is never called shows them.
    let config = TWO_SERVICES.replace(
        "handlers: [{name: echo, kind: echo, path: /}]\n",
        "handlers: [{name: echo, kind: echo, path: /}, {name: cloud, kind: upstream, upstream: {url: \"http://127.0.0.1:9/\"}}]\n",
    );
    let agent = AgentProcess::start(&config).await;
    let (status, body) = http_get(agent.admin, "/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, ready) = agent.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["services"].as_array().map(Vec::len), Some(2));

    // Drive one message so the handler histogram has its series too.
    let mut ws = connect(agent.service_addr("steady").await, "/").await;
    send_text(&mut ws, "x").await;
    next_text(&mut ws).await;
    let metrics = agent.metrics().await;
    for name in CONTRACT_METRICS {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    // Labels stay bounded: no addresses or ids.
    assert!(!metrics.contains("127.0.0.1"), "{metrics}");
}

#[tokio::test]
async fn a_port_in_use_is_reported_and_the_other_services_run() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = format!(
        "services:\n  - {{name: blocked, port: {port}, handlers: [{{name: echo, kind: echo, path: /}}]}}\n  - {{name: free, port: 0, handlers: [{{name: echo, kind: echo, path: /}}]}}\n"
    );
    let agent = AgentProcess::spawn(Some(&config), &[]);
    let deadline = std::time::Instant::now() + WAIT;
    let body = loop {
        if let Ok((503, body)) = http_get(agent.admin, "/readyz").await {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never said 503; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let blocked = body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "blocked")
        .unwrap();
    assert_eq!(blocked["listening"], false);
    assert!(
        blocked["error"].as_str().unwrap().contains("in use"),
        "{blocked}"
    );
    let mut ws = connect(agent.service_addr("free").await, "/").await;
    send_text(&mut ws, "hi").await;
    assert_eq!(next_text(&mut ws).await, "Echo: hi");

    // Once the port is free, the agent binds it on its next check.
    drop(taken);
    agent.wait_ready().await;
    let mut ws = connect(agent.service_addr("blocked").await, "/").await;
    send_text(&mut ws, "now").await;
    assert_eq!(next_text(&mut ws).await, "Echo: now");
}

#[tokio::test]
async fn reload_spares_unchanged_services() {
    let agent = AgentProcess::start(TWO_SERVICES).await;
    let mut steady = connect(agent.service_addr("steady").await, "/").await;
    let mut changing = connect(agent.service_addr("changing").await, "/").await;

    let new_config = r#"
services:
  - name: steady
    port: 0
    handlers: [{name: echo, kind: echo, path: /}]
  - name: changing
    port: 0
    handlers: [{name: echo, kind: echo, path: /}]
    limits: {maxConnections: 7}
  - name: added
    port: 0
    handlers: [{name: add, kind: add, path: /add}]
"#;
    agent.write_config(new_config);
    let frame = expect_close(&mut changing).await;
    assert_eq!(frame.code, CloseCode::Restart, "{frame:?}");
    agent
        .wait_metric(r#"edgewire_config_reloads_total{outcome="applied"}"#, 1.0)
        .await;
    agent.wait_ready().await;

    send_text(&mut steady, "still connected").await;
    assert_eq!(next_text(&mut steady).await, "Echo: still connected");
    let (status, body) = http_get(agent.service_addr("added").await, "/add?a=2&b=3")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"result":5}"#));

    // Removing a service closes its clients with 1001 and frees its port.
    let mut changing = connect(agent.service_addr("changing").await, "/").await;
    agent.write_config(TWO_SERVICES.replace("  - name: changing\n    port: 0\n    handlers: [{name: echo, kind: echo, path: /}]\n", "").as_str());
    let frame = expect_close(&mut changing).await;
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    send_text(&mut steady, "again").await;
    assert_eq!(next_text(&mut steady).await, "Echo: again");
}

#[tokio::test]
async fn a_bad_config_is_refused_and_the_last_good_one_keeps_running() {
    let agent = AgentProcess::start(TWO_SERVICES).await;
    let mut steady = connect(agent.service_addr("steady").await, "/").await;
    agent.write_config("services:\n  - name: steady\n    port: 70000\n");
    agent
        .wait_metric(r#"edgewire_config_reloads_total{outcome="rejected"}"#, 1.0)
        .await;
    assert!(
        agent.log().contains("services[0].port"),
        "the log names the field:\n{}",
        agent.log()
    );
    send_text(&mut steady, "unharmed").await;
    assert_eq!(next_text(&mut steady).await, "Echo: unharmed");
    let (status, _) = agent.readyz().await;
    assert_eq!(status, 200);

    // Duplicate handler paths: a validation error, also named.
    agent.write_config("services:\n  - name: steady\n    port: 0\n    handlers: [{name: a, kind: echo, path: /}, {name: b, kind: add, path: /}]\n");
    agent
        .wait_metric(r#"edgewire_config_reloads_total{outcome="rejected"}"#, 2.0)
        .await;
    assert!(
        agent.log().contains("services[0].handlers[1].path"),
        "{}",
        agent.log()
    );
    send_text(&mut steady, "still").await;
    assert_eq!(next_text(&mut steady).await, "Echo: still");
}

#[test]
fn a_bad_config_at_start_exits_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "services:\n  - name: Edge_1\n    port: 80\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgewire-agent"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("services[0].name"), "{stderr}");

    let missing = Command::new(env!("CARGO_BIN_EXE_edgewire-agent"))
        .arg("--config")
        .arg(dir.path().join("absent.yaml"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config"));
}

#[test]
fn the_example_config_is_the_builtin_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgewire-agent"))
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = edgewire_api::AgentConfig::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let example_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/agent.yaml");
    let example =
        edgewire_api::AgentConfig::parse(&std::fs::read_to_string(example_path).unwrap()).unwrap();
    assert_eq!(printed, edgewire_api::AgentConfig::builtin_default());
    assert_eq!(
        example, printed,
        "examples/agent.yaml drifted from the built-in default"
    );

    let check = Command::new(env!("CARGO_BIN_EXE_edgewire-agent"))
        .args(["--check", "--config", example_path])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits() {
    let mut agent = AgentProcess::start(TWO_SERVICES).await;
    let addr = agent.service_addr("steady").await;
    let mut relay_clients = Vec::new();
    for _ in 0..3 {
        relay_clients.push(connect(addr, "/").await);
    }
    agent.signal("TERM");
    for ws in &mut relay_clients {
        let frame = expect_close(ws).await;
        assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    }
    let status = agent
        .wait_exit(Duration::from_secs(12))
        .expect("the agent exits within its drain time");
    assert!(status.success(), "{status:?}");
    assert!(
        agent.log().contains("all connections closed"),
        "{}",
        agent.log()
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after exit"
    );
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_drain_time_when_clients_do_not_answer() {
    let mut agent = AgentProcess::spawn(Some(TWO_SERVICES), &["--drain-timeout", "0.3"]);
    agent.wait_ready().await;
    // A client that never reads cannot answer the close handshake, so its
    // session waits out the close handshake (2 s), longer than the drain.
    let _stuck = connect(agent.service_addr("steady").await, "/").await;
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
    assert!(
        agent.log().contains("drain time ran out"),
        "{}",
        agent.log()
    );
}
