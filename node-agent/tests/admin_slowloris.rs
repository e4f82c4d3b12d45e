//! The admin endpoint against slowloris: clients that open connections and
//! never finish a request head. Raw TCP on purpose: an HTTP client always
//! finishes its request.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CAP: usize = 8;
const HEADER_TIMEOUT_SECS: u64 = 2;
/// More half-requests than the cap, held open.
const HELD: usize = 3 * CAP;
/// One service on a free port, so the agent is ready without fixed ports.
const CONFIG: &str = "services:\n  - name: edge\n    port: 0\n    handlers:\n      - {name: echo, kind: echo, path: /}\n";

/// Whether the server closed `tcp` (EOF or reset) by `deadline`.
async fn closed_by(tcp: &mut TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn half_requests_beyond_the_cap_do_not_starve_metrics_and_are_closed() {
    let agent = AgentProcess::spawn_with_env(
        "127.0.0.1",
        Some(CONFIG),
        &[],
        &[
            ("EDGEWIRE_ADMIN_MAX_CONNECTIONS", &CAP.to_string()),
            (
                "EDGEWIRE_ADMIN_HEADER_TIMEOUT",
                &HEADER_TIMEOUT_SECS.to_string(),
            ),
        ],
    );
    agent.wait_ready().await;

    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut tcp = tokio::time::timeout(WAIT, TcpStream::connect(agent.admin))
            .await
            .expect("connect in time")
            .expect("connect");
        // A request head that never ends.
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
            .await
            .unwrap();
        held.push(tcp);
    }

    // A scrape while they are held answers: once the half-requests time out
    // their slots go to the waiting connections, the scrape among them.
    let started = Instant::now();
    let scrape_deadline = started + Duration::from_secs(60);
    let metrics = loop {
        match http_get(agent.admin, "/metrics").await {
            Ok((200, body)) => break body,
            other => assert!(
                Instant::now() < scrape_deadline,
                "/metrics did not answer under {HELD} held half-requests: {other:?}; log:\n{}",
                agent.log()
            ),
        }
    };
    assert!(metrics.contains("edgewire_"), "{metrics}");

    // Every held half-request is closed by the server, none is kept: a
    // bound of many header timeouts for a loaded machine, not a timing test.
    let mut open = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for tcp in &mut held {
        if !closed_by(tcp, deadline).await {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "{open} of {HELD} half-requests still open well after the {HEADER_TIMEOUT_SECS} s header timeout"
    );

    // And the endpoint serves as before.
    let (status, _) = http_get(agent.admin, "/healthz").await.expect("healthz");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_too() {
    let agent = AgentProcess::spawn_with_env(
        "127.0.0.1",
        Some(CONFIG),
        &[],
        &[(
            "EDGEWIRE_ADMIN_HEADER_TIMEOUT",
            &HEADER_TIMEOUT_SECS.to_string(),
        )],
    );
    agent.wait_ready().await;
    let mut tcp = TcpStream::connect(agent.admin).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        .await
        .unwrap();
    // The answer, then nothing more from the client: the connection must
    // not stay open for ever.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_by(
            &mut tcp,
            tokio::time::Instant::now() + Duration::from_secs(30)
        )
        .await,
        "an idle kept-alive admin connection stayed open"
    );
}
