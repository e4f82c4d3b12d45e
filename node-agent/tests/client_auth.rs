//! Client tokens against a real agent process, with real WebSocket and HTTP
//! clients: what is refused at the upgrade and over HTTP, what the claims
//! allow per relay request, and the close at a token's expiry.
//!
//! The PEM files under `tests/fixtures/auth/` are throwaway keys made for
//! these tests (`openssl genpkey`), never used anywhere else.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A service guarded by `auth` (YAML lines, indented for the `auth:` block).
fn config(auth: &str) -> String {
    format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: echo, kind: echo, path: /}}
      - {{name: add, kind: add, path: /add}}
    channels:
      - {{name: chat}}
      - {{name: news}}
      - {{name: sensors.t1}}
    auth:
{auth}
"#
    )
}

fn hs256_config(dir: &Path, extra: &str) -> String {
    let key = dir.join("secret");
    std::fs::write(&key, format!("{SECRET}\n")).unwrap();
    config(&format!(
        "      algorithm: HS256\n      keyFile: {}\n{extra}",
        key.display()
    ))
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign a test token")
}

fn hs256(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        &claims,
    )
}

/// Claims that allow `chat` both ways, publishing under `sensors.`, and `add`.
fn grants(exp: u64) -> Value {
    json!({
        "sub": "device-7",
        "exp": exp,
        "subscribe": ["chat"],
        "publish": ["chat", "sensors.*"],
        "call": ["add"],
    })
}

/// Opens a WebSocket at `path`, sending `token` as a bearer header.
async fn ws_connect(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Client, WsError> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .map(|(ws, _)| ws)
}

/// The HTTP status a refused upgrade answered with.
async fn refused_upgrade(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    match ws_connect(addr, path, token).await {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Ok(_) => panic!("upgrade at {path} accepted"),
        Err(other) => panic!("upgrade at {path} failed otherwise: {other}"),
    }
}

/// A GET with hyper's client; status, `WWW-Authenticate` and body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut request = hyper::Request::get(path).header("host", addr.to_string());
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = tokio::time::timeout(
        WAIT,
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("answer in time")
    .expect("an answer");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        challenge,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn auth_count(metrics: &str, outcome: &str, reason: &str) -> f64 {
    metric_value(
        metrics,
        &format!(r#"edgewire_auth_total{{outcome="{outcome}",reason="{reason}",service="edge"}}"#),
    )
}

#[tokio::test]
async fn bad_tokens_are_refused_at_the_upgrade_and_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&hs256_config(dir.path(), "")).await;
    let addr = agent.service_addr("edge").await;
    let t = now();

    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256-private.pem")).unwrap()).unwrap();
    let other_secret = EncodingKey::from_secret(b"another secret of at least 32 bytes!!").unwrap();
    let cases: [(&str, Option<String>); 6] = [
        ("missing_token", None),
        (
            "bad_signature",
            Some(sign(Algorithm::HS256, &other_secret, &grants(t + 600))),
        ),
        (
            "wrong_algorithm",
            Some(sign(Algorithm::RS256, &rsa, &grants(t + 600))),
        ),
        ("expired", Some(hs256(grants(t - 600)))),
        (
            "not_yet_valid",
            Some(hs256(
                json!({"exp": t + 1200, "nbf": t + 600, "subscribe": ["chat"]}),
            )),
        ),
        ("malformed", Some("not.a.jwt".to_string())),
    ];
    for (reason, token) in &cases {
        let token = token.as_deref();
        assert_eq!(
            refused_upgrade(addr, "/relay", token).await,
            401,
            "{reason}: relay"
        );
        assert_eq!(
            refused_upgrade(addr, "/", token).await,
            401,
            "{reason}: echo"
        );
        let (status, challenge, body) = get(addr, "/add?a=1&b=2", token).await;
        assert_eq!(status, 401, "{reason}: http: {body}");
        assert!(challenge.starts_with("Bearer"), "{reason}: {challenge:?}");
        if *reason != "missing_token" {
            assert!(challenge.contains(reason), "{reason}: {challenge:?}");
        }
    }
    // The query parameter is the browser's way; a bad token is as bad there.
    let expired = hs256(grants(t - 600));
    assert_eq!(
        refused_upgrade(addr, &format!("/relay?token={expired}"), None).await,
        401
    );

    // A good token: the handler it may call answers, the one it may not is 403.
    let good = hs256(grants(t + 600));
    let (status, _, body) = get(addr, "/add?a=1&b=2", Some(&good)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"result":3}"#));
    assert_eq!(
        refused_upgrade(addr, "/", Some(&good)).await,
        403,
        "echo is not granted"
    );

    let metrics = agent.metrics().await;
    for (reason, _) in &cases {
        let expected = if *reason == "expired" { 4.0 } else { 3.0 };
        assert_eq!(
            auth_count(&metrics, "rejected", reason),
            expected,
            "{reason}\n{metrics}"
        );
    }
    assert_eq!(auth_count(&metrics, "accepted", "token"), 2.0);
    assert_eq!(auth_count(&metrics, "denied", "call"), 1.0);
    assert!(
        !metrics.contains(&good) && !metrics.contains("device-7") && !metrics.contains("127.0.0.1"),
        "no token, subject or address in the metrics"
    );
}

#[tokio::test]
async fn claims_name_the_channels_and_handlers_a_client_may_use() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&hs256_config(dir.path(), "")).await;
    let addr = agent.service_addr("edge").await;
    let token = hs256(grants(now() + 600));
    let mut ws = ws_connect(addr, "/relay", Some(&token))
        .await
        .expect("token accepted");
    // The query parameter carries the same token for clients that cannot set headers.
    let mut watcher = connect(addr, &format!("/relay?token={token}")).await;

    let reply = request(
        &mut watcher,
        json!({"type": "subscribe", "id": 1, "channel": "chat"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    for (ask, what) in [
        (
            json!({"type": "subscribe", "id": 2, "channel": "news"}),
            "subscribe news",
        ),
        (
            json!({"type": "subscribe", "id": 3, "channel": "sensors.t1"}),
            "subscribe sensors.t1",
        ),
        (
            json!({"type": "publish", "id": 4, "channel": "news", "data": 1}),
            "publish news",
        ),
        (
            json!({"type": "call", "id": 5, "handler": "echo", "args": {"text": "x"}}),
            "call echo",
        ),
    ] {
        let reply = request(&mut ws, ask.clone()).await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str(), &reply["id"]),
            (Some("error"), Some("forbidden"), &ask["id"]),
            "{what}: {reply}"
        );
    }
    let reply = request(
        &mut ws,
        json!({"type": "publish", "id": 6, "channel": "sensors.t1", "data": 2}),
    )
    .await;
    assert_eq!(reply["type"], "published", "{reply}");
    let reply = request(
        &mut ws,
        json!({"type": "call", "id": 7, "handler": "add", "args": {"a": 1, "b": 2}}),
    )
    .await;
    assert_eq!(reply["result"], 3, "{reply}");
    let reply = request(
        &mut ws,
        json!({"type": "publish", "id": 8, "channel": "chat", "data": "hi"}),
    )
    .await;
    assert_eq!(reply["type"], "published", "{reply}");
    let delivered = next_json(&mut watcher).await;
    assert_eq!(
        (delivered["channel"].as_str(), &delivered["data"]),
        (Some("chat"), &json!("hi"))
    );

    let metrics = agent.metrics().await;
    assert_eq!(auth_count(&metrics, "denied", "subscribe"), 2.0);
    assert_eq!(auth_count(&metrics, "denied", "publish"), 1.0);
    assert_eq!(auth_count(&metrics, "denied", "call"), 1.0);
    assert_eq!(
        metric_value(
            &metrics,
            r#"edgewire_messages_dropped_total{reason="forbidden",service="edge"}"#
        ),
        4.0
    );
}

#[tokio::test]
async fn an_expiring_token_closes_its_live_connection_at_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&hs256_config(dir.path(), "")).await;
    let addr = agent.service_addr("edge").await;
    // `exp` is in whole seconds: this token ends 2 to 3 seconds from now.
    let exp = now() + 3;
    let token = hs256(grants(exp));
    let mut ws = ws_connect(addr, "/relay", Some(&token))
        .await
        .expect("token accepted");
    let reply = request(
        &mut ws,
        json!({"type": "subscribe", "id": 1, "channel": "chat"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let opened = Instant::now();

    // The client stays silent: the close must come from the expiry alone,
    // long before the idle timeout (60 s).
    let frame = expect_close(&mut ws).await;
    assert_eq!(u16::from(frame.code), 4401, "{frame:?}");
    assert_eq!(frame.reason.as_str(), "token expired");
    assert!(
        now() >= exp && opened.elapsed() >= Duration::from_secs(1),
        "closed before the token expired"
    );
    let metrics = agent
        .wait_metric(
            r#"edgewire_auth_total{outcome="expired",reason="connection_closed",service="edge"}"#,
            1.0,
        )
        .await;
    assert_eq!(metrics, 1.0);
}

#[tokio::test]
async fn public_key_algorithms_and_anonymous_access() {
    let rs = config(&format!(
        "      algorithm: RS256\n      keyFile: {}\n      anonymous: {{subscribe: [news]}}\n",
        fixture("rs256-public.pem").display()
    ));
    let es = config(&format!(
        "      algorithm: ES256\n      keyFile: {}\n      issuer: edge-issuer\n",
        fixture("es256-public.pem").display()
    ));
    let t = now();

    let agent = AgentProcess::start(&rs).await;
    let addr = agent.service_addr("edge").await;
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256-private.pem")).unwrap()).unwrap();
    let mut ws = ws_connect(
        addr,
        "/relay",
        Some(&sign(Algorithm::RS256, &rsa, &grants(t + 600))),
    )
    .await
    .expect("RS256 token accepted");
    let reply = request(
        &mut ws,
        json!({"type": "subscribe", "id": 1, "channel": "chat"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    // The classic confusion: HS256 "signed" with the public key as the secret.
    let public_pem = std::fs::read(fixture("rs256-public.pem")).unwrap();
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem).unwrap(),
        &grants(t + 600),
    );
    assert_eq!(refused_upgrade(addr, "/relay", Some(&forged)).await, 401);
    // Anonymous: only what the service grants, and a bad token is not
    // downgraded to anonymous.
    let mut anonymous = connect(addr, "/relay").await;
    let reply = request(
        &mut anonymous,
        json!({"type": "subscribe", "id": 1, "channel": "news"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let reply = request(
        &mut anonymous,
        json!({"type": "subscribe", "id": 2, "channel": "chat"}),
    )
    .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert_eq!(
        refused_upgrade(addr, "/relay", Some("not.a.jwt")).await,
        401
    );
    let (status, _, _) = get(addr, "/add?a=1&b=2", None).await;
    assert_eq!(status, 403, "anonymous clients may not call add here");
    let metrics = agent.metrics().await;
    assert_eq!(auth_count(&metrics, "accepted", "anonymous"), 2.0);
    assert_eq!(auth_count(&metrics, "rejected", "wrong_algorithm"), 1.0);
    drop(agent);

    let agent = AgentProcess::start(&es).await;
    let addr = agent.service_addr("edge").await;
    let ec =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256-private.pem")).unwrap()).unwrap();
    let mut claims = grants(t + 600);
    claims["iss"] = json!("edge-issuer");
    let token = sign(Algorithm::ES256, &ec, &claims);
    let (status, _, body) = get(addr, "/add?a=2&b=2", Some(&token)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"result":4}"#));
    claims["iss"] = json!("someone-else");
    let token = sign(Algorithm::ES256, &ec, &claims);
    let (status, challenge, _) = get(addr, "/add?a=2&b=2", Some(&token)).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("wrong_issuer"), "{challenge}");
    assert_eq!(
        refused_upgrade(addr, "/relay", None).await,
        401,
        "no anonymous access here"
    );
}

#[tokio::test]
async fn a_service_whose_key_cannot_be_read_does_not_listen() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "too short").unwrap();
    let text = config(&format!(
        "      algorithm: HS256\n      keyFile: {}\n",
        short.display()
    ));
    let agent = AgentProcess::spawn(Some(&text), &[]);
    let deadline = Instant::now() + WAIT;
    while !agent.log().contains("at least 32 bytes") {
        assert!(
            Instant::now() < deadline,
            "no key error logged:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admin endpoint may still be starting; /readyz must not say ready.
    let deadline = Instant::now() + WAIT;
    let (status, ready) = loop {
        if let Ok(answer) = http_get(agent.admin, "/readyz").await {
            break answer;
        }
        assert!(Instant::now() < deadline, "no /readyz answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains("at least 32 bytes"), "{ready}");
}

/// The key file is read again when it changes, as the TLS files are: after
/// a rotation new tokens signed with the new key are accepted and tokens of
/// the old key refused, while a connection opened with an old token stays up.
#[tokio::test]
async fn a_rotated_key_file_is_used_for_new_tokens_and_live_connections_stay() {
    const NEW_SECRET: &str = "fedcba9876543210fedcba9876543210-rotated-secret";
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&hs256_config(dir.path(), "")).await;
    let addr = agent.service_addr("edge").await;
    let old_token = hs256(grants(now() + 600));
    let new_token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(NEW_SECRET.as_bytes()).unwrap(),
        &grants(now() + 600),
    );
    let mut live = ws_connect(addr, "/relay", Some(&old_token))
        .await
        .expect("the old key's token before the rotation");
    assert_eq!(
        refused_upgrade(addr, "/relay", Some(&new_token)).await,
        401,
        "the new key's token before the rotation"
    );

    // Replaced in one step, as a Secret volume's update does.
    let staged = dir.path().join("secret.new");
    std::fs::write(&staged, NEW_SECRET).unwrap();
    std::fs::rename(&staged, dir.path().join("secret")).unwrap();

    let deadline = Instant::now() + WAIT;
    loop {
        if ws_connect(addr, "/relay", Some(&new_token)).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a token of the new key is still refused after the rotation; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        refused_upgrade(addr, "/relay", Some(&old_token)).await,
        401,
        "a token of the old key after the rotation"
    );
    let (status, _, _) = get(addr, "/add?a=1&b=2", Some(&old_token)).await;
    assert_eq!(status, 401, "the old key's token over HTTP");
    let (status, _, body) = get(addr, "/add?a=1&b=2", Some(&new_token)).await;
    assert_eq!(status, 200, "{body}");

    // The connection opened before the rotation keeps its access.
    let reply = request(
        &mut live,
        json!({"type": "subscribe", "id": 1, "channel": "chat"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
}
