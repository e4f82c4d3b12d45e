//! An EdgeService linked to a hub, on the real control plane with the
//! operator and an edge agent in cluster mode; the hub a standalone agent
//! process on loopback that checks the edge's token. The token comes from a
//! Secret (`hub.tokenSecret`): a message published at the edge reaches a
//! subscriber at the hub once, one published at the hub reaches the edge's
//! subscriber once, and with a wrong token in the Secret the edge says so
//! (log line and metric) and still serves its local clients. An upstream
//! handler reaches an HTTPS server whose CA is only in a Secret
//! (`upstream.caSecret`); while that Secret is missing the EdgeService is
//! `Degraded` (`SecretMissing`) and the handler answers 503, and once it
//! exists the handler forwards.
//!
//! The hub agent also serves the HTTPS "cloud" (an `add` handler with the
//! throwaway certificate of `tests/fixtures/tls/`, for 127.0.0.1).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgewire_api::crd::EdgeService;
use edgewire_testenv::NodeSpec;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::{Value, json};
use support::cluster::*;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const NAMESPACE: &str = "hubs";
const SERVICE: &str = "hubs/linked";
const EDGE_IP: &str = "127.0.0.76";
const HUB_SECRET: &str = "0123456789abcdef0123456789abcdef-hub-of-the-cluster";

/// A token the hub accepts when signed with `HUB_SECRET`: publish and
/// subscribe on every channel, forwarding as node `edge-h`.
fn edge_token(secret: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "edge-h", "exp": exp, "publish": ["*"], "subscribe": ["*"], "origins": ["edge-h"]}),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The hub (edges need a token; test clients subscribe to anything and
/// publish commands anonymously) and the HTTPS cloud, both on 127.0.0.1.
fn hub_config(dir: &Path, hub_port: u16, cloud_port: u16) -> String {
    let key = dir.join("hub-secret");
    std::fs::write(&key, HUB_SECRET).unwrap();
    format!(
        r#"
services:
  - name: hub
    port: {hub_port}
    channels: [{{name: telemetry}}, {{name: commands}}]
    auth:
      algorithm: HS256
      keyFile: {key}
      anonymous: {{subscribe: ["*"], publish: [commands]}}
  - name: cloud
    port: {cloud_port}
    handlers: [{{name: add, kind: add, path: /add}}]
    tls: {{certFile: {cert}, keyFile: {cert_key}}}
"#,
        key = key.display(),
        cert = tls::fixture("server1.pem").display(),
        cert_key = tls::fixture("server1.key").display(),
    )
}

fn spawn_hub(dir: &Path, hub_port: u16, cloud_port: u16) -> AgentProcess {
    let state = dir.join("hub-state").display().to_string();
    AgentProcess::spawn(
        Some(&hub_config(dir, hub_port, cloud_port)),
        &["--state-dir", &state],
    )
}

/// The Degraded condition's reason, keeping the whole condition in `last`.
async fn last_degraded(services: &Api<EdgeService>, last: &mut (String, String, String)) -> String {
    *last = degraded(&services.get("linked").await.unwrap());
    last.1.clone()
}

async fn metric(agent: &AgentProcess, series: &str) -> f64 {
    match http_get(agent.admin, "/metrics").await {
        Ok((200, body)) => metric_value(&body, series),
        _ => 0.0,
    }
}

async fn subscribe(ws: &mut Client, channel: &str) {
    let reply = request(
        ws,
        json!({"type": "subscribe", "channel": channel, "id": channel}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
}

async fn publish(ws: &mut Client, channel: &str, data: Value) {
    let reply = request(
        ws,
        json!({"type": "publish", "channel": channel, "data": data, "id": "p"}),
    )
    .await;
    assert_eq!(reply["type"], "published", "{reply}");
}

/// The `data` of every message `ws` receives until a second passes without
/// one, waiting up to `SLOW_WAIT` for the first.
async fn messages(ws: &mut Client) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let wait = if got.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(1)
        };
        let Ok(next) = tokio::time::timeout(wait, ws.next()).await else {
            return got;
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] == "message" {
                    got.push(value["data"].clone());
                }
            }
            Some(Ok(_)) => {}
            other => panic!("subscriber lost: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_and_an_upstream_ca_come_from_the_secrets_an_edge_service_names() {
    let (plane, client) = start_plane(&[NAMESPACE]).await;
    edgewire_testenv::add_nodes(
        &client,
        &[NodeSpec::new("edge-h")
            .label("edgewire.dev/test", NAMESPACE)
            .internal_ip(EDGE_IP)],
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (hub_port, cloud_port) = (free_port(), free_port());
    let mut hub = spawn_hub(dir.path(), hub_port, cloud_port);
    hub.wait_ready().await;
    let hub_addr: SocketAddr = format!("127.0.0.1:{hub_port}").parse().unwrap();

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let good = edge_token(HUB_SECRET);
    apply(
        &secrets,
        "hub-token",
        &opaque_secret("hub-token", "token", good.as_bytes()),
    )
    .await;

    let _operator = spawn_operator(
        &plane.kubeconfig,
        NAMESPACE,
        &dir.path().join("operator.log"),
        &["--heartbeat-timeout", "10", "--status-interval", "2"],
    );
    let operator_log =
        || std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
    let state = tempfile::tempdir().unwrap();
    let edge = spawn_cluster_agent(
        &plane.kubeconfig,
        NAMESPACE,
        "edge-h",
        (EDGE_IP, EDGE_IP),
        state.path(),
        &[],
    );

    let port = free_port();
    let es: EdgeService = serde_yaml_ng::from_str(&format!(
        r#"
apiVersion: edgewire.dev/v1alpha1
kind: EdgeService
metadata: {{name: linked, namespace: {NAMESPACE}}}
spec:
  port: {port}
  channels:
    - {{name: telemetry, uplink: true}}
    - {{name: commands, downlink: true}}
  hub:
    url: ws://127.0.0.1:{hub_port}/relay
    tokenSecret: {{name: hub-token, key: token}}
  handlers:
    - name: add
      kind: upstream
      path: /add
      upstream:
        url: https://127.0.0.1:{cloud_port}/add
        retries: 0
        caSecret: {{name: cloud-ca, key: ca.pem}}
"#
    ))
    .unwrap();
    let services: Api<EdgeService> = Api::namespaced(client.clone(), NAMESPACE);
    apply(&services, "linked", &es).await;
    let stored = services.get("linked").await.unwrap();
    assert!(
        stored.spec.hub.is_some() && stored.spec.channels.iter().any(|c| c.uplink),
        "the API server kept neither the hub nor the uplink channel: {:?}",
        stored.spec
    );
    let edge_addr: SocketAddr = format!("{EDGE_IP}:{port}").parse().unwrap();

    // The link comes up with the Secret's token.
    let connected = format!(r#"edgewire_uplink_link{{service="{SERVICE}",state="connected"}}"#);
    eventually(
        "the edge's link to the hub never came up",
        || format!("edge:\n{}\nhub:\n{}", edge.log(), hub.log()),
        || async { metric(&edge, &connected).await == 1.0 },
    )
    .await;

    // Up: published at the edge, delivered at the hub once.
    let mut at_hub = connect(hub_addr, "/relay").await;
    subscribe(&mut at_hub, "telemetry").await;
    let mut at_edge = connect(edge_addr, "/relay").await;
    publish(&mut at_edge, "telemetry", json!({"t": 21.5})).await;
    assert_eq!(
        messages(&mut at_hub).await,
        [json!({"t": 21.5})],
        "the hub's subscriber gets the edge's message once"
    );

    // Down: published at the hub, delivered at the edge once.
    let mut edge_subscriber = connect(edge_addr, "/relay").await;
    subscribe(&mut edge_subscriber, "commands").await;
    let mut hub_publisher = connect(hub_addr, "/relay").await;
    publish(&mut hub_publisher, "commands", json!({"cmd": "reboot"})).await;
    assert_eq!(
        messages(&mut edge_subscriber).await,
        [json!({"cmd": "reboot"})],
        "the edge's subscriber gets the hub's command once"
    );

    // The upstream's CA Secret is missing: Degraded, and the handler cannot
    // forward (the system's roots do not know the test CA).
    eventually(
        "the EdgeService naming a missing CA Secret is not Degraded/SecretMissing",
        operator_log,
        || async {
            let (status, reason, message) = degraded(&services.get("linked").await.unwrap());
            status == "True" && reason == "SecretMissing" && message.contains("cloud-ca")
        },
    )
    .await;
    let (status, body) = http_get(edge_addr, "/add?a=1&b=2").await.unwrap();
    assert_ne!(status, 200, "forwarded without the CA: {body}");

    // With the CA in its Secret, the upstream handler reaches the cloud.
    let ca = std::fs::read(tls::fixture("ca.pem")).unwrap();
    apply(
        &secrets,
        "cloud-ca",
        &opaque_secret("cloud-ca", "ca.pem", &ca),
    )
    .await;
    eventually(
        "the upstream never reached the cloud with the CA from its Secret",
        || edge.log(),
        || async {
            matches!(http_get(edge_addr, "/add?a=1&b=2").await,
                Ok((200, body)) if serde_json::from_str::<Value>(&body).ok() == Some(json!({"result": 3})))
        },
    )
    .await;
    // (A loopback node address keeps it Degraded for another reason.)
    let mut last = Default::default();
    let deadline = Instant::now() + SLOW_WAIT;
    while last_degraded(&services, &mut last)
        .await
        .starts_with("Secret")
    {
        assert!(
            Instant::now() < deadline,
            "the EdgeService stays Degraded for its Secrets once they are right: {last:?}\n{}",
            operator_log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A wrong token in the Secret: once stored, the next connect (the hub
    // restarts) is refused, the edge says so and serves its local clients.
    let wrong = edge_token("another-secret-that-the-hub-does-not-know-0123");
    apply(
        &secrets,
        "hub-token",
        &opaque_secret("hub-token", "token", wrong.as_bytes()),
    )
    .await;
    let token_file = state
        .path()
        .join("secrets")
        .join(NAMESPACE)
        .join("hub-token")
        .join("token");
    eventually(
        "the edge never stored the changed token",
        || edge.log(),
        || async { std::fs::read_to_string(&token_file).is_ok_and(|t| t == wrong) },
    )
    .await;
    hub.signal("KILL");
    assert!(hub.wait_exit(WAIT).is_some(), "the hub did not die");
    let hub = spawn_hub(dir.path(), hub_port, cloud_port);
    hub.wait_ready().await;
    let refused = format!(
        r#"edgewire_uplink_connect_failures_total{{reason="unauthorized",service="{SERVICE}"}}"#
    );
    eventually(
        "the wrong token is not counted",
        || edge.log(),
        || async { metric(&edge, &refused).await >= 1.0 },
    )
    .await;
    let log = edge.log();
    assert!(
        log.contains("the hub refused the credential (HTTP 401)"),
        "no line about the refused token in the edge's log:\n{log}"
    );
    let mut local = connect(edge_addr, "/relay").await;
    subscribe(&mut local, "telemetry").await;
    publish(&mut at_edge, "telemetry", json!({"t": 22.0})).await;
    assert_eq!(
        messages(&mut local).await,
        [json!({"t": 22.0})],
        "a local subscriber is served while the hub refuses the edge"
    );
    assert_eq!(
        metric(&edge, &connected).await,
        0.0,
        "the link is not up with a wrong token"
    );
}
