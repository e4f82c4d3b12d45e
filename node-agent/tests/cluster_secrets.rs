//! Client TLS and tokens of an EdgeService from Secrets, on the real control
//! plane with the operator and an agent in cluster mode: `wss://` and
//! `https://` with the certificate of a `kubernetes.io/tls` Secret; a
//! rotated Secret served to new connections while an open one stays up; a
//! token key from a Secret refusing a bad token and accepting a good one;
//! a missing Secret marks the EdgeService `Degraded` (`SecretMissing`) with
//! an Event and its port serves nothing. The agents' own token may `get`
//! the Secrets EdgeServices name, and is refused (403) on any other Secret,
//! in the same namespace or another; the grant goes when no EdgeService
//! names them any more.
//!
//! The certificates are the throwaway ones of `tests/fixtures/tls/`
//! (`support::tls`).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgewire_api::crd::EdgeService;
use edgewire_testenv::NodeSpec;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta};
use serde_json::json;
use support::cluster::*;
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const NAMESPACE: &str = "sec";
const OTHER_NAMESPACE: &str = "sec-other";
const AGENT_ACCOUNT: &str = "agent";
const HS256_SECRET: &str = "0123456789abcdef0123456789abcdef-cluster-secret";

fn token(secret: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "device-1", "exp": exp, "call": ["echo", "add"], "subscribe": ["chat"]}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A `wss://` upgrade at `/` with `token` as a bearer header.
async fn wss_connect(
    addr: SocketAddr,
    token: &str,
) -> Result<WebSocketStream<TlsStream<TcpStream>>, WsError> {
    let (stream, _) = tls::connect(addr).await;
    let mut request = format!("wss://localhost:{}/", addr.port())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("upgrade answered in time")
        .map(|(ws, _)| ws)
}

fn tls_secret(cert: &str, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("web-tls".into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(std::fs::read(tls::fixture(cert)).unwrap()),
            ),
            (
                "tls.key".to_string(),
                ByteString(std::fs::read(tls::fixture(key)).unwrap()),
            ),
        ])),
        ..Secret::default()
    }
}

#[tokio::test]
async fn tls_and_tokens_come_from_the_secrets_an_edge_service_names() {
    let (plane, client) = start_plane(&[NAMESPACE, OTHER_NAMESPACE]).await;
    let ip = "127.0.0.74";
    edgewire_testenv::add_nodes(
        &client,
        &[NodeSpec::new("edge-s")
            .label("edgewire.dev/test", NAMESPACE)
            .internal_ip(ip)],
    )
    .await
    .unwrap();
    create_service_account(&client, NAMESPACE, AGENT_ACCOUNT).await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    apply(
        &secrets,
        "web-tls",
        &tls_secret("server1.pem", "server1.key"),
    )
    .await;
    apply(
        &secrets,
        "jwt",
        &opaque_secret("jwt", "hs256", HS256_SECRET.as_bytes()),
    )
    .await;
    apply(
        &secrets,
        "unnamed",
        &opaque_secret("unnamed", "password", b"not for the agents"),
    )
    .await;
    let elsewhere: Api<Secret> = Api::namespaced(client.clone(), OTHER_NAMESPACE);
    apply(
        &elsewhere,
        "web-tls",
        &tls_secret("server2.pem", "server2.key"),
    )
    .await;

    let logs = tempfile::tempdir().unwrap();
    let account = format!("{NAMESPACE}/{AGENT_ACCOUNT}");
    let _operator = spawn_operator(
        &plane.kubeconfig,
        NAMESPACE,
        &logs.path().join("operator.log"),
        &[
            "--heartbeat-timeout",
            "10",
            "--status-interval",
            "2",
            "--log-level",
            "edgewire_operator=debug,info",
            "--agent-service-account",
            &account,
        ],
    );
    let operator_log =
        || std::fs::read_to_string(logs.path().join("operator.log")).unwrap_or_default();
    let state = tempfile::tempdir().unwrap();
    let agent = spawn_cluster_agent(
        &plane.kubeconfig,
        NAMESPACE,
        "edge-s",
        (ip, ip),
        state.path(),
        &[],
    );

    let (port, broken_port) = (free_port(), free_port());
    let services: Api<EdgeService> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, yaml) in [
        (
            "web",
            format!(
                "port: {port}\n  handlers:\n    - {{name: echo, kind: echo, path: /}}\n    - {{name: add, kind: add, path: /add}}\n  tls: {{secretName: web-tls}}\n  auth: {{algorithm: HS256, keySecret: {{name: jwt, key: hs256}}}}\n"
            ),
        ),
        (
            "broken",
            format!(
                "port: {broken_port}\n  handlers:\n    - {{name: add, kind: add, path: /add}}\n  tls: {{secretName: absent}}\n"
            ),
        ),
    ] {
        let es: EdgeService = serde_yaml_ng::from_str(&format!(
            "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  {yaml}"
        ))
        .unwrap();
        apply(&services, name, &es).await;
    }
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let broken_addr: SocketAddr = format!("{ip}:{broken_port}").parse().unwrap();

    // wss:// with the Secret's certificate, and the token key from the other.
    let good = token(HS256_SECRET);
    let forged = token("another-secret-of-enough-length-to-be-an-hs256-key");
    eventually(
        "wss:// with the Secret's certificate never answered",
        || agent.log(),
        || async { tls::try_connect(addr).await.is_ok() && wss_connect(addr, &good).await.is_ok() },
    )
    .await;
    let (_, served) = tls::try_connect(addr).await.unwrap();
    assert_eq!(
        served,
        tls::leaf_der("server1.pem"),
        "the Secret's certificate"
    );
    let mut live = wss_connect(addr, &good).await.expect("a good token");
    tls::echo_round(&mut live, "over tls, with a token").await;
    match wss_connect(addr, &forged).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 401),
        Ok(_) => panic!("a token signed with another key was accepted"),
        Err(other) => panic!("the forged token's upgrade failed otherwise: {other}"),
    }
    assert_eq!(
        tls::https_get(addr, "/add?a=1&b=2", Some(&good)).await.0,
        200
    );
    assert_eq!(tls::https_get(addr, "/add?a=1&b=2", None).await.0, 401);
    assert_eq!(
        tls::https_get(addr, "/add?a=1&b=2", Some(&forged)).await.0,
        401
    );
    // Plain HTTP on the TLS port gets no answer from a handler.
    let plain = http_get(addr, "/add?a=1&b=2").await;
    assert!(
        !matches!(plain, Ok((200, _))),
        "plaintext served where TLS was asked: {plain:?}"
    );
    let stored = state.path().join("secrets").join(NAMESPACE);
    for file in ["web-tls/tls.key", "web-tls/tls.crt", "jwt/hs256"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(stored.join(file))
            .unwrap_or_else(|e| panic!("{file} stored for offline restarts: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // A missing Secret: Degraded with its reason, an Event, and the port
    // serves nothing (never plaintext in place of TLS).
    eventually(
        "the EdgeService naming a missing Secret is not Degraded/SecretMissing",
        operator_log,
        || async {
            let es = services.get("broken").await.unwrap();
            let (status, reason, message) = degraded(&es);
            status == "True" && reason == "SecretMissing" && message.contains("absent")
        },
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    eventually("no SecretMissing Event", operator_log, || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("SecretMissing")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
            })
    })
    .await;
    let answer = http_get(broken_addr, "/add?a=1&b=2").await;
    assert!(
        answer.is_err(),
        "the service without its Secret answered plaintext: {answer:?}"
    );

    // The agents' own token may get the named Secrets and nothing else.
    let agent_client = service_account_client(&plane, NAMESPACE, AGENT_ACCOUNT).await;
    let roles: Api<Role> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let code = get_secret_code(&agent_client, NAMESPACE, "web-tls").await;
        if code == "ok" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agents' token cannot get the named Secret: {code}; their Role: {:?}\noperator log:\n{}",
            roles
                .get_opt("agent-secrets")
                .await
                .map(|r| r.map(|r| r.rules)),
            operator_log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut holes = Vec::new();
    for (namespace, name, want) in [
        (NAMESPACE, "jwt", "ok"),
        (NAMESPACE, "unnamed", "403"),
        (OTHER_NAMESPACE, "web-tls", "403"),
    ] {
        let got = get_secret_code(&agent_client, namespace, name).await;
        eprintln!("agent token, get Secret {namespace}/{name}: {got}");
        if got != want {
            holes.push(format!("get {namespace}/{name}: {got}, want {want}"));
        }
    }
    let listed = Api::<Secret>::namespaced(agent_client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await;
    if !matches!(&listed, Err(kube::Error::Api(e)) if e.code == 403) {
        holes.push(format!("list Secrets: {:?}", listed.map(|l| l.items.len())));
    }
    assert!(holes.is_empty(), "the agents' token reaches: {holes:?}");

    // A rotated Secret: new connections get the new certificate, the open
    // connection stays up.
    apply(
        &secrets,
        "web-tls",
        &tls_secret("server2.pem", "server2.key"),
    )
    .await;
    eventually(
        "the rotated Secret's certificate is not served",
        || agent.log(),
        || async {
            tls::try_connect(addr)
                .await
                .is_ok_and(|(_, leaf)| leaf == tls::leaf_der("server2.pem"))
        },
    )
    .await;
    tls::echo_round(&mut live, "still here after the rotation").await;

    // No EdgeService names a Secret any more: the grant is gone.
    for name in ["web", "broken"] {
        services
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    eventually(
        "the agents' Role outlived the EdgeServices",
        operator_log,
        || async { roles.get_opt("agent-secrets").await.unwrap().is_none() },
    )
    .await;
    eventually(
        "the agents' token still reads a Secret no EdgeService names",
        operator_log,
        || async { get_secret_code(&agent_client, NAMESPACE, "web-tls").await == "403" },
    )
    .await;
}
