//! At most one leader writes. Two operators share a Lease; the leader is
//! frozen (SIGSTOP) past its lease while EdgeServices keep changing, the
//! other takes over, and the frozen one is resumed. The API server's audit
//! log, which records every write it answered and who sent it, must show no
//! write of the first leader after the second one's first.
//!
//! Each operator runs as its own (impersonated) user, so the audit log tells
//! them apart although both write as field manager `edgewire-operator`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgewire_testenv::{ControlPlane, Options, TestNamespace};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use support::*;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Metadata (who, what, when; no bodies) of every write to what the operator
/// writes: its resources, Services, EndpointSlices, Events and the Lease.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
    resources:
      - group: edgewire.dev
      - group: ""
        resources: [services, events]
      - group: discovery.k8s.io
        resources: [endpointslices]
      - group: events.k8s.io
      - group: coordination.k8s.io
        resources: [leases]
  - level: None
"#;

const SERVICES: usize = 6;
/// At most this many spec changes, one every CHURN_EVERY, whatever happens.
const CHURN_ROUNDS: usize = 1_000;
const CHURN_EVERY: Duration = Duration::from_millis(150);

/// A control plane of this test binary's own, with the audit log on. Torn
/// down when the process exits, like the shared one.
async fn audited_plane() -> &'static ControlPlane {
    static PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
    PLANE
        .get_or_init(|| async {
            ControlPlane::start(Options {
                kwok: true,
                audit_policy: Some(AUDIT_POLICY.to_string()),
                ..Options::default()
            })
            .await
            .expect("control plane with an audit log")
        })
        .await
}

/// The admin kubeconfig, impersonating `user` (still in system:masters), so
/// the audit log names `user` for each request sent with it.
fn kubeconfig_as(plane: &ControlPlane, user: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    let mut doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let creds = &mut doc["users"][0]["user"];
    creds["as"] = json!(user);
    creds["as-groups"] = json!(["system:masters"]);
    let file = dir.join(format!("{user}.kubeconfig"));
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    file
}

fn es_yaml(name: &str, port: usize, max_nodes: u32) -> String {
    format!(
        "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata:\n  name: {name}\nspec:\n  nodeSelector: {{{EDGE_LABEL}: \"true\"}}\n  placement: {{maxNodes: {max_nodes}}}\n  port: {port}\n  handlers:\n    - {{name: echo, kind: echo, path: /}}\n"
    )
}

fn service(i: usize) -> (String, usize) {
    (format!("churn-{i}"), 9100 + i)
}

fn signal(op: &Operator, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &op.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {}", op.pid());
}

async fn wait_metric(op: &Operator, series: &str, want: f64, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while op.metric(series).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}; log:\n{}",
            tail(&op.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// One write the API server answered, as its audit log records it.
struct Write {
    user: String,
    /// When the API server received it (its own clock, the only one used).
    at: Timestamp,
    verb: String,
    what: String,
    code: i64,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} -> {}",
            self.at, self.user, self.verb, self.what, self.code
        )
    }
}

fn audited_writes(log: &Path, users: &[&str]) -> Vec<Write> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut writes: Vec<Write> = text
        .lines()
        .filter_map(|line| {
            let event: Value = serde_json::from_str(line).ok()?;
            if event["stage"] != "ResponseComplete" {
                return None;
            }
            let user = event["impersonatedUser"]["username"].as_str()?;
            if !users.contains(&user) {
                return None;
            }
            let object = &event["objectRef"];
            let field = |key: &str| object[key].as_str().unwrap_or("").to_string();
            Some(Write {
                user: user.to_string(),
                at: event["requestReceivedTimestamp"].as_str()?.parse().ok()?,
                verb: event["verb"].as_str()?.to_string(),
                what: format!(
                    "{}/{}{} {}/{}",
                    field("apiGroup"),
                    field("resource"),
                    if field("subresource").is_empty() {
                        String::new()
                    } else {
                        format!("/{}", field("subresource"))
                    },
                    field("namespace"),
                    field("name"),
                ),
                code: event["responseStatus"]["code"].as_i64().unwrap_or(0),
            })
        })
        .collect();
    writes.sort_by_key(|w| w.at);
    writes
}

#[tokio::test]
async fn a_resumed_leader_never_writes_after_its_successor() {
    let plane = audited_plane().await;
    let client = plane.client().await.unwrap();
    edgewire_testenv::install_crds(&client, &committed_crds())
        .await
        .unwrap();
    let ns = TestNamespace::create(plane, "fence").await.unwrap();
    let env = Env { plane, ns, client };
    let nodes = env
        .nodes(&["a", "b", "c", "d"], &[(EDGE_LABEL, "true")])
        .await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let creds = tempfile::tempdir().unwrap();

    let first =
        Operator::start_with_kubeconfig(&env, "op-a", &kubeconfig_as(plane, "op-a", creds.path()));
    wait_metric(&first, "edgewire_operator_leader", 1.0, "op-a leads").await;
    for i in 0..SERVICES {
        let (name, port) = service(i);
        env.apply_es(&es_yaml(&name, port, 2)).await;
    }
    for i in 0..SERVICES {
        env.wait_es(&service(i).0, "placed on 2 nodes", |es| {
            placed(es).len() == 2 && condition(es, "Ready").is_some_and(|c| c.0 == "True")
        })
        .await;
    }
    let second =
        Operator::start_with_kubeconfig(&env, "op-b", &kubeconfig_as(plane, "op-b", creds.path()));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !second.log().contains("standing by") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "op-b never stood by; log:\n{}",
            tail(&second.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Churn: every service flips between 2 and 3 nodes in turn, so whoever
    // leads has placements, EndpointSlices and Events to write all along.
    let churning = CancellationToken::new();
    let churn = tokio::spawn({
        let (api, stop) = (env.es_api(), churning.clone());
        async move {
            let mut rounds = 0;
            while rounds < CHURN_ROUNDS && !stop.is_cancelled() {
                let (name, port) = service(rounds % SERVICES);
                let max_nodes = 2 + ((rounds / SERVICES) % 2) as u32;
                let es: edgewire_api::crd::EdgeService =
                    serde_yaml_ng::from_str(&es_yaml(&name, port, max_nodes)).unwrap();
                let _ = api
                    .patch(
                        &name,
                        &kube::api::PatchParams::apply("test").force(),
                        &kube::api::Patch::Apply(&es),
                    )
                    .await;
                rounds += 1;
                tokio::time::sleep(CHURN_EVERY).await;
            }
            rounds
        }
    });

    // Freeze the leader in the middle of the churn, past its lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&first, "-STOP");
    wait_metric(
        &second,
        "edgewire_operator_leader",
        1.0,
        "op-b takes over from the frozen op-a",
    )
    .await;
    // Let the new leader write, and changes pile up in the frozen one's watches.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&first, "-CONT");
    tokio::time::sleep(Duration::from_secs(10)).await;
    churning.cancel();
    let rounds = churn.await.unwrap();

    wait_metric(&first, "edgewire_operator_leader", 0.0, "op-a stands down").await;
    assert_eq!(
        second.metric("edgewire_operator_leader").await,
        1.0,
        "op-b still leads; log:\n{}",
        tail(&second.log())
    );
    assert!(
        first.log().contains("standing by"),
        "op-a's log says it stood down:\n{}",
        tail(&first.log())
    );

    let writes = audited_writes(&plane.audit_log(), &["op-a", "op-b"]);
    let is_lease = |w: &&Write| w.what.starts_with("coordination.k8s.io/leases");
    let takeover = writes
        .iter()
        .find(|w| w.user == "op-b")
        .expect("op-b wrote (took the Lease)");
    assert!(
        is_lease(&takeover),
        "op-b's first write is the Lease: {takeover:?}"
    );
    let before: Vec<&Write> = writes
        .iter()
        .filter(|w| w.user == "op-a" && w.at < takeover.at && !is_lease(w))
        .collect();
    let successor: Vec<&Write> = writes
        .iter()
        .filter(|w| w.user == "op-b" && !is_lease(w))
        .collect();
    assert!(!before.is_empty(), "op-a wrote while it led");
    assert!(
        !successor.is_empty(),
        "op-b wrote after taking over ({rounds} spec changes)"
    );
    let late: Vec<&Write> = writes
        .iter()
        .filter(|w| w.user == "op-a" && w.at > takeover.at)
        .collect();
    assert!(
        late.is_empty(),
        "op-a wrote {} times after op-b took the Lease at {} ({} writes of op-b); \
         the first ones: {:#?}\nop-a's log:\n{}",
        late.len(),
        takeover.at,
        successor.len(),
        &late[..late.len().min(10)],
        tail(&first.log())
    );
    drop((first, second));
    env.cleanup_nodes(&nodes).await;
}
