//! The seed's Python clients, unchanged, against the agent on its built-in
//! default config (the seed's ports: 8765 for echo, 5000 for add).
//!
//! Needs a Python with `websockets` and `requests`: the README's test command
//! installs them in a virtualenv and points `EDGEWIRE_PYTHON` at it.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// `EDGEWIRE_PYTHON`, or a virtualenv in `target/test-venv` that this test
/// creates (once) with the seed clients' packages.
fn python() -> String {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(find_or_make_python).clone()
}

fn find_or_make_python() -> String {
    if let Ok(python) = std::env::var("EDGEWIRE_PYTHON") {
        return python;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("target/test-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv {} failed",
            venv.display()
        );
    }
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed/requirements.txt");
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status();
    assert!(
        installed.is_ok_and(|s| s.success()),
        "installing {} failed",
        requirements.display()
    );
    python.display().to_string()
}

fn run_seed_client(file: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/seed")
        .join(file);
    let out = Command::new(python())
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python(), script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "{file} needs websockets and requests (see tests/seed/requirements.txt):\n{stderr}"
    );
    assert!(out.status.success(), "{file} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
