//! Host ports are a privilege: the chart's admission policy refuses
//! EdgeServices outside the allowed range in the real API server, and the
//! operator never places one that got in anyway.

mod support;

use std::time::Duration;

use edgewire_testenv::TestNamespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::*;

fn es(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "edgewire.dev/v1alpha1",
        "kind": "EdgeService",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {EDGE_LABEL: "true"},
            "port": port,
            "handlers": [{"name": "echo", "kind": "echo", "path": "/"}],
        },
    })
}

/// Server-side apply of an EdgeService as a user would; the API's answer.
async fn apply(client: &kube::Client, ns: &str, object: &Value) -> Result<(), kube::Error> {
    let api: Api<edgewire_api::crd::EdgeService> = Api::namespaced(client.clone(), ns);
    let name = object["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn admission_refuses_ports_outside_the_chart_range() {
    let env = Env::new("host-ports").await;
    let privileged = TestNamespace::create(env.plane, "host-ports-priv")
        .await
        .unwrap();
    let release = env.name().to_string();
    let sets = [
        format!("hostPorts.privilegedNamespaces={{{}}}", privileged.name),
        "hostPorts.max=30000".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let mut policy: Vec<Value> = render_chart(&env, &release, &sets)
        .into_iter()
        .filter(|o| {
            o["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
                && o["metadata"]["name"] == format!("{release}-edgeservice-host-ports")
        })
        .collect();
    assert_eq!(policy.len(), 2, "the chart's host-port policy and binding");
    // Bound to this test's namespaces only: other tests' EdgeServices in the
    // same API server are not this test's business.
    for o in &mut policy {
        if o["kind"] == "ValidatingAdmissionPolicyBinding" {
            o["spec"]["matchResources"] = json!({"namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name",
                "operator": "In",
                "values": [env.name(), privileged.name],
            }]}});
        }
    }
    let _policy = Applied::new(env.plane, &policy);

    // A policy takes effect once the API server has loaded it: wait for the
    // first refusal, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    let refusal = loop {
        match apply(&env.client, env.name(), &es("web", 80)).await {
            Err(kube::Error::Api(e)) => break e,
            Err(e) => panic!("{e}"),
            Ok(()) => {
                let api: Api<edgewire_api::crd::EdgeService> =
                    Api::namespaced(env.client.clone(), env.name());
                let _ = api.delete("web", &Default::default()).await;
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "port 80 admitted in a namespace the chart does not list"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(refusal.code, 403, "{refusal:?}");
    assert!(
        refusal.message.contains("port 80 is below 1024")
            && refusal.message.contains("hostPorts.privilegedNamespaces"),
        "{}",
        refusal.message
    );
    apply(&env.client, env.name(), &es("web", 8080))
        .await
        .expect("a port in the range");
    let raised = apply(&env.client, env.name(), &es("web", 443)).await;
    assert!(
        matches!(&raised, Err(kube::Error::Api(e)) if e.code == 403),
        "moving an admitted EdgeService below the range: {raised:?}"
    );
    let above = apply(&env.client, env.name(), &es("high", 40000)).await;
    assert!(
        matches!(&above, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("above 30000")),
        "{above:?}"
    );
    apply(&env.client, &privileged.name, &es("web", 443))
        .await
        .expect("a privileged port in a listed namespace");
    let above_privileged = apply(&env.client, &privileged.name, &es("high", 40000)).await;
    assert!(
        matches!(&above_privileged, Err(kube::Error::Api(e)) if e.code == 403),
        "listed namespaces may go below the range, not above: {above_privileged:?}"
    );
}

#[tokio::test]
async fn the_operator_never_places_a_port_outside_its_range() {
    let env = Env::new("host-ports-op").await;
    let nodes = env.nodes(&["a"], &[(EDGE_LABEL, "true")]).await;
    let operator = Operator::start(&env, "host-ports-operator");
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    // No admission policy here: as if admitted before the chart had one.
    apply(&env.client, env.name(), &es("ssh", 22))
        .await
        .unwrap();
    apply(&env.client, env.name(), &es("web", 18080))
        .await
        .unwrap();

    env.wait_es("web", "an allowed port is placed", |es| {
        es.status.as_ref().is_some_and(|s| s.ready_nodes == 1)
    })
    .await;
    let ssh = env
        .wait_es("ssh", "Placed=False PortNotAllowed", |es| {
            condition(es, "Placed") == Some(("False", "PortNotAllowed"))
        })
        .await;
    assert_eq!(
        condition(&ssh, "Degraded"),
        Some(("True", "PortNotAllowed"))
    );
    assert!(placed(&ssh).is_empty(), "{:?}", ssh.status);
    let message = ssh
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("port 22 is below 1024"), "{message}");

    let events: Api<Event> = Api::namespaced(env.client.clone(), env.name());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = events.list(&ListParams::default()).await.unwrap();
        if listed.items.iter().any(|e| {
            e.reason.as_deref() == Some("PortNotAllowed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ssh")
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no PortNotAllowed Event for ssh; operator log:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Still unplaced a while later: not a transient state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ssh = env.es_api().get("ssh").await.unwrap();
    assert!(placed(&ssh).is_empty(), "{:?}", ssh.status);
    env.cleanup_nodes(&nodes).await;
}
