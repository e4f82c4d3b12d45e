//! The seed's Python clients, unchanged, against the agent on its built-in
//! default config (the seed's ports: 8765 for echo, 5000 for add).
//!
//! Needs a Python with `websockets` and `requests`: the README's test command
//! installs them in a virtualenv and points `EDGEWIRE_PYTHON` at it.

mod support;

use support::*;

#[tokio::test]
async fn the_seed_clients_work_unchanged_against_the_default_config() {
    let agent = AgentProcess::spawn(None, &[]);
    agent.wait_ready().await;
    let (_, ready) = agent.readyz().await;
    let ports: Vec<u64> = ready["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["address"].as_str())
        .filter_map(|a| a.rsplit(':').next()?.parse().ok())
        .collect();
    assert_eq!(ports, vec![5000, 8765], "the seed's ports: {ready}");

    let ws = run_seed_client("ws_client.py");
    assert_eq!(ws, "Received data: Echo: Hello, WebSocket!\n");
    let http = run_seed_client("http_client.py");
    assert_eq!(http, "Result: 3\n");

    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_connections_total{outcome="accepted",service="echo"}"#
        ),
        1.0
    );
    assert!(
        metric_value(
            &metrics,
            r#"edgewire_handler_duration_seconds_count{handler="add",service="compute"}"#
        ) >= 1.0
    );
}
