//! `upstream` handlers against real upstreams on loopback: the seed's Flask
//! server, unchanged, as the cloud behind the seed's `/add` (stopped and
//! started again for the circuit breaker), and a small hyper server in the
//! test for what Flask cannot show: relay calls as JSON POSTs, pass-through
//! of methods, headers and bodies, a slow upstream, retries counted at the
//! server, the concurrency cap, and HTTPS with a CA file.
//!
//! The agent serves the seed's client on the seed's port 5000; the Flask
//! app runs with `flask run` on a free loopback port instead of its own
//! 5000.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

// ---------------------------------------------------------------- clients

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| json!({ "raw": self.body }))
    }
}

/// One HTTP/1.1 request with hyper's client on a fresh connection.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    let _conn = AbortOnDropHandle::new(tokio::spawn(conn));
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, &[], "").await
}

fn series(name: &str, upstream: &str, extra: &str) -> String {
    format!(r#"{name}{{{extra}service="edge",upstream="{upstream}"}}"#)
}

// ------------------------------------------------------- the Flask cloud

/// The seed's Flask app served by `flask run` on `port`; stopped on drop.
struct FlaskCloud {
    child: Child,
}

impl FlaskCloud {
    async fn start(port: u16) -> FlaskCloud {
        let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed/flask_server.py");
        let child = Command::new(python())
            .args(["-m", "flask", "--app"])
            .arg(&app)
            .args(["run", "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("FLASK_DEBUG", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", app.display()));
        let cloud = FlaskCloud { child };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(addr, "/add?a=1&b=1").await {
                return cloud;
            }
            assert!(
                Instant::now() < deadline,
                "the Flask cloud did not answer on {addr} (needs flask: tests/seed/requirements.txt)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for FlaskCloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------- the test's own upstream

/// A small upstream: `/sum` adds a JSON POST's `a` and `b`; `/echo`
/// describes the request it got; `/slow` answers after `SLOW`; `/flaky`
/// always answers 503; `/big` answers 64 KiB; anything else 404. It counts
/// the requests each path got.
#[derive(Default)]
struct Counts {
    sum: AtomicU32,
    echo: AtomicU32,
    slow: AtomicU32,
    flaky: AtomicU32,
}

const SLOW: Duration = Duration::from_secs(4);

struct TestUpstream {
    addr: SocketAddr,
    counts: Arc<Counts>,
    _task: AbortOnDropHandle<()>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

impl TestUpstream {
    async fn start(tls: bool) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let acceptor = tls.then(|| {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(fixture("server1.pem"))
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect();
            let key = PrivateKeyDer::from_pem_file(fixture("server1.key")).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let served = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            // Bounded by the test's life: the task is aborted on drop.
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let counts = Arc::clone(&served);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let counts = Arc::clone(&counts);
                        async move { Ok::<_, Infallible>(answer(&counts, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        TestUpstream {
            addr,
            counts,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

async fn answer(counts: &Counts, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = |status: u16, value: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-upstream", "test")
            .header("keep-alive", "timeout=5")
            .body(Full::new(Bytes::from(value.to_string())))
            .unwrap()
    };
    match parts.uri.path() {
        "/sum" => {
            counts.sum.fetch_add(1, Ordering::SeqCst);
            let args: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            match (args["a"].as_i64(), args["b"].as_i64()) {
                (Some(a), Some(b)) => reply(200, json!({ "sum": a + b })),
                _ => reply(422, json!({ "error": "a and b must be integers" })),
            }
        }
        "/echo" => {
            counts.echo.fetch_add(1, Ordering::SeqCst);
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
                .collect();
            reply(
                201,
                json!({
                    "method": parts.method.as_str(),
                    "query": parts.uri.query(),
                    "headers": headers,
                    "body": String::from_utf8_lossy(&body),
                }),
            )
        }
        "/slow" => {
            counts.slow.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(SLOW).await;
            reply(200, json!({ "slow": true }))
        }
        "/flaky" => {
            counts.flaky.fetch_add(1, Ordering::SeqCst);
            reply(503, json!({ "error": "try later" }))
        }
        "/big" => reply(200, json!({ "big": "x".repeat(64 * 1024) })),
        _ => reply(404, json!({ "error": "no such path" })),
    }
}

/// An agent serving one service `edge` with `handlers` (YAML list items).
async fn agent_with(handlers: &str) -> (AgentProcess, SocketAddr) {
    let config = format!(
        "services:\n  - name: edge\n    port: 0\n    handlers:\n{}",
        handlers
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    );
    let agent = AgentProcess::start(&config).await;
    let addr = agent.service_addr("edge").await;
    (agent, addr)
}

// ------------------------------------------------------------------ tests

/// The seed's client, unchanged, gets the cloud's sum through the edge; with
/// the cloud stopped it gets a clear 502 quickly, the breaker opens after
/// three failures (503 at once, the metric says open), and once the cloud is
/// back the half-open probe closes it.
#[tokio::test]
async fn the_seed_client_reaches_the_flask_cloud_and_the_breaker_follows_its_outages() {
    let cloud_port = free_port();
    let mut cloud = Some(FlaskCloud::start(cloud_port).await);
    let config = format!(
        r#"
services:
  - name: edge
    port: 5000
    handlers:
      - name: add
        kind: upstream
        path: /add
        upstream:
          url: http://127.0.0.1:{cloud_port}/add
          retries: 0
          breaker: {{failures: 3, cooldownMs: 1500}}
"#
    );
    let agent = AgentProcess::start(&config).await;
    let addr = agent.service_addr("edge").await;

    let out = tokio::task::spawn_blocking(|| run_seed_client("http_client.py"))
        .await
        .unwrap();
    assert_eq!(out, "Result: 3\n");
    let metrics = agent.metrics().await;
    let ok = series(
        "edgewire_upstream_duration_seconds_count",
        "add",
        r#"outcome="ok","#,
    );
    assert_eq!(metric_value(&metrics, &ok), 1.0, "{metrics}");
    let received = series(
        "edgewire_upstream_bytes_total",
        "add",
        r#"direction="received","#,
    );
    assert!(metric_value(&metrics, &received) > 0.0);

    drop(cloud.take());
    for n in 1..=3 {
        let started = Instant::now();
        let reply = get(addr, "/add?a=1&b=2").await;
        assert_eq!(reply.status, 502, "request {n}: {}", reply.body);
        // Refused; or, for a pooled connection that Flask's exit closed
        // just as the forward took it, lost.
        let reason = reply.json()["reason"].clone();
        assert!(
            reason == "connect_failed" || reason == "connection_lost",
            "request {n}: {}",
            reply.body
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "request {n}: a refused connection took {:?}, not well under the 10 s timeout",
            started.elapsed()
        );
    }
    let refused = get(addr, "/add?a=1&b=2").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["reason"], "breaker_open", "{}", refused.body);
    assert_eq!(refused.headers["retry-after"], "1");
    let metrics = agent.metrics().await;
    let state = series("edgewire_upstream_breaker_state", "add", "");
    assert_eq!(metric_value(&metrics, &state), 2.0, "open");
    let errors = |reason: &str| {
        series(
            "edgewire_upstream_errors_total",
            "add",
            &format!(r#"reason="{reason}","#),
        )
    };
    assert_eq!(
        metric_value(&metrics, &errors("connect_failed"))
            + metric_value(&metrics, &errors("connection_lost")),
        3.0
    );
    assert_eq!(metric_value(&metrics, &errors("breaker_open")), 1.0);

    let _cloud = FlaskCloud::start(cloud_port).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = get(addr, "/add?a=2&b=5").await;
        if reply.status == 200 {
            assert_eq!(reply.json(), json!({"result": 7}));
            break;
        }
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert!(
            Instant::now() < deadline,
            "the breaker never let a probe through"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = agent.metrics().await;
    assert_eq!(
        metric_value(&metrics, &state),
        0.0,
        "closed after the probe"
    );
    let out = tokio::task::spawn_blocking(|| run_seed_client("http_client.py"))
        .await
        .unwrap();
    assert_eq!(out, "Result: 3\n");
}

#[tokio::test]
async fn a_relay_call_is_a_json_post_whose_answer_is_the_result() {
    let upstream = TestUpstream::start(false).await;
    let (_agent, addr) = agent_with(&format!(
        "- {{name: sum, kind: upstream, upstream: {{url: \"http://{0}/sum\"}}}}\n\
         - {{name: gone, kind: upstream, upstream: {{url: \"http://{0}/gone\"}}}}",
        upstream.addr
    ))
    .await;
    let mut ws = connect(addr, "/relay").await;
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": 1, "handler": "sum", "args": {"a": 2, "b": 3}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"type": "result", "id": 1, "handler": "sum", "result": {"sum": 5}})
    );
    for (id, handler, args, status) in [
        (2, "sum", json!({"a": "two"}), 422),
        (3, "gone", json!({}), 404),
    ] {
        let reply = request(
            &mut ws,
            json!({"type": "call", "id": id, "handler": handler, "args": args}),
        )
        .await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "handler_failed", "{reply}");
        assert_eq!(reply["status"], status, "{reply}");
        assert_eq!(reply["id"], id, "{reply}");
    }
}

#[tokio::test]
async fn http_passes_method_headers_query_and_body_through_within_the_caps() {
    let upstream = TestUpstream::start(false).await;
    let (agent, addr) = agent_with(&format!(
        "- name: fwd\n  kind: upstream\n  path: /fwd\n  upstream: {{url: \"http://{0}/echo\", maxRequestBytes: 64}}\n\
         - name: big\n  kind: upstream\n  path: /big\n  upstream: {{url: \"http://{0}/big\", maxResponseBytes: 1024}}",
        upstream.addr
    ))
    .await;
    let reply = send(
        addr,
        "PUT",
        "/fwd?x=1&y=two",
        &[
            ("x-custom", "kept"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "dropped"),
            ("content-type", "text/plain"),
        ],
        "hello upstream",
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.headers["x-upstream"], "test");
    assert!(!reply.headers.contains_key("keep-alive"), "hop-by-hop");
    let seen = reply.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body"], "hello upstream");
    assert_eq!(seen["headers"]["x-custom"], "kept");
    assert_eq!(seen["headers"]["content-type"], "text/plain");
    assert_eq!(seen["headers"]["host"], upstream.addr.to_string());
    assert!(seen["headers"].get("x-private").is_none(), "{seen}");

    let too_big = send(addr, "POST", "/fwd", &[], &"x".repeat(100)).await;
    assert_eq!(too_big.status, 413, "{}", too_big.body);
    assert_eq!(too_big.json()["reason"], "request_too_large");
    assert_eq!(upstream.counts.echo.load(Ordering::SeqCst), 1);

    let reply = get(addr, "/big").await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["reason"], "response_too_large");

    let metrics = agent.metrics().await;
    let sent = series(
        "edgewire_upstream_bytes_total",
        "fwd",
        r#"direction="sent","#,
    );
    assert_eq!(metric_value(&metrics, &sent), "hello upstream".len() as f64);
    // Refused before a forward, and counted all the same.
    let refused = series(
        "edgewire_upstream_errors_total",
        "fwd",
        r#"reason="request_too_large","#,
    );
    assert_eq!(metric_value(&metrics, &refused), 1.0, "{metrics}");
}

#[tokio::test]
async fn a_slow_upstream_answers_504_at_the_deadline() {
    let upstream = TestUpstream::start(false).await;
    let (agent, addr) = agent_with(&format!(
        "- {{name: slow, kind: upstream, path: /slow, upstream: {{url: \"http://{}/slow\", timeoutMs: 500}}}}",
        upstream.addr
    ))
    .await;
    let started = Instant::now();
    let reply = get(addr, "/slow").await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert_eq!(reply.json()["reason"], "timeout");
    assert!(
        started.elapsed() < SLOW,
        "the deadline did not cut the wait: {:?}",
        started.elapsed()
    );
    assert_eq!(
        upstream.counts.slow.load(Ordering::SeqCst),
        1,
        "a timed-out attempt is not retried"
    );
    let metrics = agent.metrics().await;
    let timed_out = series(
        "edgewire_upstream_duration_seconds_count",
        "slow",
        r#"outcome="timeout","#,
    );
    assert_eq!(metric_value(&metrics, &timed_out), 1.0);
}

#[tokio::test]
async fn idempotent_requests_are_retried_and_posts_only_when_the_handler_says_so() {
    let upstream = TestUpstream::start(false).await;
    let (_agent, addr) = agent_with(&format!(
        "- name: flaky\n  kind: upstream\n  path: /flaky\n  upstream: {{url: \"http://{0}/flaky\", retries: 2, breaker: {{failures: 100}}}}\n\
         - name: repeatable\n  kind: upstream\n  path: /repeatable\n  upstream: {{url: \"http://{0}/flaky\", retries: 2, idempotent: true, breaker: {{failures: 100}}}}",
        upstream.addr
    ))
    .await;
    let count = || upstream.counts.flaky.load(Ordering::SeqCst);

    let reply = get(addr, "/flaky").await;
    assert_eq!(
        reply.status, 503,
        "the upstream's own answer: {}",
        reply.body
    );
    assert_eq!(reply.json()["error"], "try later");
    assert_eq!(count(), 3, "a GET: one attempt and two retries");

    let reply = send(addr, "POST", "/flaky", &[], "{}").await;
    assert_eq!(reply.status, 503);
    assert_eq!(count(), 4, "a POST is not retried");

    let mut ws = connect(addr, "/relay").await;
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": 1, "handler": "flaky", "args": {}}),
    )
    .await;
    assert_eq!(reply["status"], 503, "{reply}");
    assert_eq!(count(), 5, "a relay call is a POST");

    let reply = send(addr, "POST", "/repeatable", &[], "{}").await;
    assert_eq!(reply.status, 503);
    assert_eq!(count(), 8, "idempotent: true retries a POST");
}

#[tokio::test]
async fn forwards_beyond_the_concurrency_cap_answer_503_at_once() {
    let upstream = TestUpstream::start(false).await;
    let (agent, addr) = agent_with(&format!(
        "- {{name: slow, kind: upstream, path: /slow, upstream: {{url: \"http://{}/slow\", maxConcurrent: 1}}}}",
        upstream.addr
    ))
    .await;
    let first = tokio::spawn(async move { get(addr, "/slow").await.status });
    let deadline = Instant::now() + WAIT;
    while upstream.counts.slow.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the first forward never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let refused = get(addr, "/slow").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["reason"], "concurrency");
    assert!(started.elapsed() < SLOW, "refused at once, not queued");
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(upstream.counts.slow.load(Ordering::SeqCst), 1);
    let metrics = agent.metrics().await;
    let refusals = series(
        "edgewire_upstream_errors_total",
        "slow",
        r#"reason="concurrency","#,
    );
    assert_eq!(metric_value(&metrics, &refusals), 1.0);
}

/// HTTPS to an upstream whose certificate a CA file vouches for; without
/// the CA file the system's roots refuse it and the client is told so.
#[tokio::test]
async fn https_upstreams_are_checked_against_the_ca_file() {
    let upstream = TestUpstream::start(true).await;
    let (agent, addr) = agent_with(&format!(
        "- name: trusted\n  kind: upstream\n  path: /trusted\n  upstream: {{url: \"https://{0}/sum\", caFile: \"{1}\"}}\n\
         - name: untrusted\n  kind: upstream\n  path: /untrusted\n  upstream: {{url: \"https://{0}/sum\", retries: 0}}\n\
         - name: unreadable\n  kind: upstream\n  path: /unreadable\n  upstream: {{url: \"https://{0}/sum\", caFile: \"{2}\"}}",
        upstream.addr,
        fixture("ca.pem").display(),
        fixture("no-such-ca.pem").display()
    ))
    .await;
    let reply = send(addr, "POST", "/trusted", &[], r#"{"a": 40, "b": 2}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"sum": 42}));

    let reply = send(addr, "POST", "/untrusted", &[], r#"{"a": 1, "b": 1}"#).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["reason"], "tls", "{}", reply.body);
    let reply = send(addr, "POST", "/unreadable", &[], r#"{"a": 1, "b": 1}"#).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["reason"], "unavailable", "{}", reply.body);
    assert_eq!(upstream.counts.sum.load(Ordering::SeqCst), 1);
    let metrics = agent.metrics().await;
    let tls = series(
        "edgewire_upstream_duration_seconds_count",
        "untrusted",
        r#"outcome="tls","#,
    );
    assert_eq!(metric_value(&metrics, &tls), 1.0);
}

/// The dashboard's edge-and-cloud row, its own queries read from the chart,
/// answered by a real Prometheus scraping an agent whose upstream handler
/// is busy: T_edge, T_cloud and their sum per service, bytes per node; and
/// the chart's alert for an open breaker, on a handler whose upstream is
/// down.
#[tokio::test]
async fn the_dashboards_edge_and_cloud_row_answers_from_a_real_prometheus() {
    let upstream = TestUpstream::start(false).await;
    let (agent, addr) = agent_with(&format!(
        "- {{name: sum, kind: upstream, path: /sum, upstream: {{url: \"http://{}/sum\"}}}}\n\
         - {{name: down, kind: upstream, path: /down, upstream: {{url: \"http://127.0.0.1:{}/\", retries: 0, breaker: {{failures: 1, cooldownMs: 600000}}}}}}",
        upstream.addr,
        free_port()
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: edgewire-agents\n    static_configs: [{{targets: ['{}']}}]\n",
        agent.admin
    );
    let prom = support::prometheus::Prometheus::start(&config, work.path()).await;
    prom.wait_value(r#"up{job="edgewire-agents"}"#, |v| v == 1.0)
        .await;
    // Traffic while Prometheus scrapes, so rates see the counters move;
    // bounded in count, and stopped when the test ends.
    let _traffic = AbortOnDropHandle::new(tokio::spawn(async move {
        for _ in 0..1200 {
            send(addr, "POST", "/sum", &[], r#"{"a": 1, "b": 2}"#).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }));

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../charts/edgewire/dashboards/edgewire.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let first = panels
        .iter()
        .position(|p| {
            p["type"] == "row" && p["title"].as_str().is_some_and(|t| t.contains("T_total"))
        })
        .expect("the edge-and-cloud row");
    let row: Vec<(String, String)> = panels[first + 1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| {
            Some((
                t["expr"].as_str()?.to_string(),
                t["legendFormat"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert!(row.len() >= 9, "{row:?}");
    for (expr, legend) in &row {
        if expr.contains("edgewire_upstream_errors_total") {
            continue; // no errors here: the series stay at zero
        }
        if expr.contains("edgewire_uplink_") {
            continue; // no hub here: the uplink's panels are read in `uplink.rs`
        }
        let value = prom.wait_value(expr, |v| v.is_finite()).await;
        if !expr.contains("breaker_state") {
            assert!(value > 0.0, "{legend}: {expr} = {value}");
        }
    }
    let t_edge = "sum by (service) (rate(edgewire_handler_duration_seconds_sum[5m]))";
    let t_cloud = "sum by (service) (rate(edgewire_upstream_duration_seconds_sum[5m]))";
    let (total, _) = row
        .iter()
        .find(|(_, legend)| legend.contains("T_total"))
        .expect("a T_total query");
    let sum = prom
        .wait_value(&format!("({total}) - ({t_edge}) - ({t_cloud})"), |v| {
            v.is_finite()
        })
        .await;
    assert!(
        sum.abs() < 1e-9,
        "T_total is T_edge + T_cloud: off by {sum}"
    );

    assert_eq!(get(addr, "/down").await.status, 502);
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/edgewire/templates/monitoring.yaml"),
    )
    .unwrap();
    let alert = rules
        .lines()
        .skip_while(|l| !l.contains("alert: EdgewireUpstreamBreakerOpen"))
        .find_map(|l| l.trim().strip_prefix("expr: "))
        .expect("the breaker alert's expression");
    prom.wait_value(&format!("count({alert})"), |v| v == 1.0)
        .await;
    let firing = prom.series(alert).await;
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(firing[0]["metric"]["upstream"], "down", "{firing:?}");
}

/// An upstream that takes the connection and closes it without an answer
/// (a crashing or resetting server): 502 `connection_lost`, after the
/// retries a GET is allowed.
#[tokio::test]
async fn a_connection_closed_without_an_answer_is_502_after_the_retries() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&accepted);
    let _server = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            // Read the request head, then close without a word.
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
            drop(tcp);
        }
    }));
    let (agent, addr) = agent_with(&format!(
        "- {{name: lost, kind: upstream, path: /lost, upstream: {{url: \"http://{upstream}/x\", retries: 2}}}}"
    ))
    .await;
    let reply = get(addr, "/lost").await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.json()["reason"], "connection_lost", "{}", reply.body);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "one attempt and two retries"
    );
    let metrics = agent.metrics().await;
    let lost = series(
        "edgewire_upstream_duration_seconds_count",
        "lost",
        r#"outcome="connection_lost","#,
    );
    assert_eq!(metric_value(&metrics, &lost), 3.0);
}
