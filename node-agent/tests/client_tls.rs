//! Client TLS against a real agent process: `wss://` and `https://` with the
//! certificate from files, and a rotated certificate served to new
//! connections while an open one carries on.
//!
//! `tests/fixtures/tls/` holds a throwaway CA certificate and two server
//! certificates it signed (for 127.0.0.1), made for these tests with openssl.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// Replaces `path` in one step, as a Secret volume's update does.
fn replace(path: &Path, from: &Path) {
    let staged = path.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test]
async fn wss_and_https_from_files_and_a_rotation_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    replace(&cert, &tls::fixture("server1.pem"));
    replace(&key, &tls::fixture("server1.key"));
    let agent = AgentProcess::start(&format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: echo, kind: echo, path: /}}
      - {{name: add, kind: add, path: /add}}
    tls:
      certFile: {}
      keyFile: {}
"#,
        cert.display(),
        key.display()
    ))
    .await;
    let addr = agent.service_addr("edge").await;

    let (stream, served) = tls::connect(addr).await;
    assert_eq!(served, tls::leaf_der("server1.pem"));
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/"), stream)
        .await
        .expect("wss upgrade");
    tls::echo_round(&mut ws, "over tls").await;
    assert_eq!(
        tls::https_get(addr, "/add?a=1&b=2", None).await,
        (200, r#"{"result":3}"#.into())
    );

    // Half a rotation (the new certificate, the old key) is not served: the
    // pair that works stays.
    replace(&cert, &tls::fixture("server2.pem"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, served) = tls::connect(addr).await;
    assert_eq!(
        served,
        tls::leaf_der("server1.pem"),
        "a mismatched pair was served"
    );

    replace(&key, &tls::fixture("server2.key"));
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, served) = tls::connect(addr).await;
        if served == tls::leaf_der("server2.pem") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not picked up; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection opened before the rotation was not dropped.
    tls::echo_round(&mut ws, "still here").await;
    assert_eq!(
        tls::https_get(addr, "/add?a=2&b=2", None).await,
        (200, r#"{"result":4}"#.into())
    );
}
