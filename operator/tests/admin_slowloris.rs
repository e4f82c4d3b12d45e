//! The operator's metrics endpoint against slowloris: clients that open
//! connections and never finish a request head. The admin server starts
//! before the operator reaches the API, so no control plane is needed: the
//! operator points at an address where nothing listens. Raw TCP on purpose:
//! an HTTP client always finishes its request.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const CAP: usize = 4;
const HEADER_TIMEOUT_SECS: u64 = 2;
const HELD: usize = 3 * CAP;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(port: u16, path: &str) -> String {
    tokio::time::timeout(
        Duration::from_secs(15),
        edgewire_testenv::http_get(port, path),
    )
    .await
    .unwrap_or_default()
}

#[tokio::test]
async fn half_requests_beyond_the_cap_do_not_starve_metrics_and_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // An API server that is not there: the operator keeps trying to lead
    // while its metrics endpoint serves.
    let unused = edgewire_testenv::free_port().unwrap();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{unused}', insecure-skip-tls-verify: true}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let port = edgewire_testenv::free_port().unwrap();
    let log = dir.path().join("operator.log");
    let _operator = Killed(
        Command::new(env!("CARGO_BIN_EXE_edgewire-operator"))
            .args(["run", "--metrics-address", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", &kubeconfig)
            .env("EDGEWIRE_ADMIN_MAX_CONNECTIONS", CAP.to_string())
            .env(
                "EDGEWIRE_ADMIN_HEADER_TIMEOUT",
                HEADER_TIMEOUT_SECS.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(port, "/healthz").await.starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "operator metrics endpoint not up; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: op\r\nX-Slow: ")
            .await
            .unwrap();
        held.push(tcp);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = get(port, "/metrics").await;
        if answer.starts_with("HTTP/1.1 200") {
            assert!(answer.contains("edgewire_operator_"), "{answer}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics did not answer under {HELD} held half-requests"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = 0;
    for tcp in &mut held {
        let mut buf = [0u8; 512];
        let closed = loop {
            match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
            }
        };
        if !closed {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "{open} of {HELD} half-requests still open well after the {HEADER_TIMEOUT_SECS} s header timeout"
    );
}
