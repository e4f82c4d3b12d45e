//! A `wasm` handler whose module is an OCI image, on the real control plane
//! with the operator and an agent in cluster mode, pulling from a real
//! registry that requires credentials (given as the EdgeService's
//! `imagePullSecret`, which the agents' identity may read and no other
//! Secret beside it): the service becomes Ready, the EdgeNode and the
//! EdgeService report the digest, a tag pushed anew rolls out, a pin to
//! another digest is refused (Degraded, an Event) while the pinned module
//! serves, and an agent restarted with neither the registry nor the API
//! server still serves.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeService};
use edgewire_testenv::NodeSpec;
use edgewire_testenv::registry::{Credentials, Registry};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, ObjectMeta};
use serde_json::json;
use support::cluster::*;
use support::*;

fn condition(es: &EdgeService, type_: &str) -> (String, String) {
    es.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

/// (digest, nodes) of the handler `add` in the EdgeService's status.
fn service_digests(es: &EdgeService) -> Vec<(String, i32)> {
    es.status
        .iter()
        .flat_map(|s| &s.modules)
        .filter(|m| m.handler == "add")
        .map(|m| (m.digest.clone(), m.nodes))
        .collect()
}

async fn node_digest(client: &kube::Client, node: &str) -> Option<String> {
    let node = Api::<EdgeNode>::all(client.clone()).get(node).await.ok()?;
    node.status?
        .services
        .first()?
        .modules
        .iter()
        .find(|m| m.handler == "add")?
        .digest
        .clone()
}

fn spawn_agent(ip: &str, state: &std::path::Path, kubeconfig: &std::path::Path) -> AgentProcess {
    spawn_cluster_agent(
        kubeconfig,
        "wasm-oci",
        "edge-oci",
        (ip, ip),
        state,
        &["--image-recheck-interval", "1"],
    )
}

#[tokio::test]
async fn an_image_module_is_served_reported_rolled_out_and_kept_offline() {
    let namespace = "wasm-oci";
    let (mut plane, client) = start_plane(&[namespace]).await;
    let ip = "127.0.0.71";
    edgewire_testenv::add_nodes(
        &client,
        &[NodeSpec::new("edge-oci")
            .label("edgewire.dev/test", namespace)
            .internal_ip(ip)],
    )
    .await
    .unwrap();

    let mut registry = Registry::start(Some(Credentials {
        username: "puller".into(),
        password: "cluster-secret-7".into(),
    }))
    .await
    .expect("registry");
    let add = wasm_components().join("add.wasm");
    let first = registry
        .push_wasm("edge/add:stable", &add)
        .expect("push add");
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("registry-creds".into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(
                ".dockerconfigjson".to_string(),
                ByteString(registry.docker_config().into_bytes()),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    apply(&secrets, "registry-creds", &secret).await;

    // Another Secret in the namespace, which no EdgeService names.
    let mut unnamed = secret.clone();
    unnamed.metadata.name = Some("unnamed".into());
    apply(&secrets, "unnamed", &unnamed).await;
    create_service_account(&client, namespace, "agent").await;

    let logs = tempfile::tempdir().unwrap();
    let account = format!("{namespace}/agent");
    let _operator = spawn_operator(
        &plane.kubeconfig,
        namespace,
        &logs.path().join("operator.log"),
        &[
            "--heartbeat-timeout",
            "10",
            "--agent-service-account",
            &account,
        ],
    );
    let operator_log =
        || std::fs::read_to_string(logs.path().join("operator.log")).unwrap_or_default();
    let state = tempfile::tempdir().unwrap();
    let agent = spawn_agent(ip, state.path(), &plane.kubeconfig);

    let port = free_port();
    let reference = format!("{}/edge/add:stable", registry.address());
    let es: EdgeService = serde_yaml_ng::from_str(&format!(
        r#"
apiVersion: edgewire.dev/v1alpha1
kind: EdgeService
metadata: {{name: compute, namespace: {namespace}}}
spec:
  port: {port}
  handlers:
    - name: add
      kind: wasm
      path: /add
      module: {{image: "{reference}", imagePullSecret: registry-creds, plainHttp: true}}
"#
    ))
    .unwrap();
    let services: Api<EdgeService> = Api::namespaced(client.clone(), namespace);
    apply(&services, "compute", &es).await;
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();

    // Pulled with the Secret's credentials and served; Ready; the digest in
    // the EdgeNode and summed up in the EdgeService.
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let served = http_get_json(addr, "/add?a=1&b=2").await == (200, json!({"result": 3}));
        let es = services.get("compute").await.unwrap();
        let ready = condition(&es, "Ready").0 == "True";
        let reported = node_digest(&client, "edge-oci").await.as_deref() == Some(first.as_str());
        if served && ready && reported && service_digests(&es) == vec![(first.clone(), 1)] {
            assert!(
                !condition(&es, "Degraded").1.starts_with("Module"),
                "{:?}",
                es.status
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served, Ready and reported with {first}: {:?}\nagent log:\n{}\noperator log:\n{}\nregistry log:\n{}",
            es.status,
            agent.log(),
            operator_log(),
            registry.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The agents' own identity may read the pull Secret the EdgeService
    // names, and not another Secret beside it.
    let agents = service_account_client(&plane, namespace, "agent").await;
    eventually(
        "the agents' token cannot get the pull Secret",
        &operator_log,
        || async { get_secret_code(&agents, namespace, "registry-creds").await == "ok" },
    )
    .await;
    assert_eq!(get_secret_code(&agents, namespace, "unnamed").await, "403");

    // The same tag pushed anew rolls out without touching the EdgeService.
    let second = registry
        .push_wasm(
            "edge/add:stable",
            &wasm_components().join("telemetry_filter.wasm"),
        )
        .expect("push the filter under the same tag");
    assert_ne!(first, second);
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let es = services.get("compute").await.unwrap();
        if node_digest(&client, "edge-oci").await.as_deref() == Some(second.as_str())
            && service_digests(&es) == vec![(second.clone(), 1)]
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{second} did not roll out: {:?}\nagent log:\n{}",
            es.status,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_ne!(
        http_get_json(addr, "/add?a=1&b=2").await,
        (200, json!({"result": 3})),
        "still the old module"
    );

    // Pinned to the first digest while the tag names the second: the stored
    // first module serves again, and the mismatch is reported (Degraded,
    // an Event) rather than followed.
    let mut pinned = es.clone();
    pinned.spec.handlers[0]
        .module
        .as_mut()
        .expect("the module")
        .digest = Some(first.clone());
    apply(&services, "compute", &pinned).await;
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let served = http_get_json(addr, "/add?a=1&b=2").await == (200, json!({"result": 3}));
        let es = services.get("compute").await.unwrap();
        let refused = condition(&es, "Degraded") == ("True".into(), "ModuleDigestMismatch".into());
        let reported = node_digest(&client, "edge-oci").await.as_deref() == Some(first.as_str());
        let told = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ModuleDigestMismatch"));
        if served && refused && reported && told {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pin not enforced (served {served}, refused {refused}, reported {reported}, event {told}): {:?}\nagent log:\n{}\noperator log:\n{}",
            es.status,
            agent.log(),
            operator_log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Neither the registry nor the API server: an agent started again
    // serves the stored config with the stored (pinned) module.
    drop(agent);
    registry.stop();
    plane.stop_component("kube-apiserver").unwrap();
    let again = spawn_agent(ip, state.path(), &plane.kubeconfig);
    let deadline = Instant::now() + SLOW_WAIT;
    while http_get_json(addr, "/add?a=1&b=2").await != (200, json!({"result": 3})) {
        assert!(
            Instant::now() < deadline,
            "the restarted agent does not serve the stored module; its log:\n{}",
            again.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        again.log().contains(&first) && again.log().contains("serving the stored module"),
        "{}",
        again.log()
    );
    plane.start_component("kube-apiserver").await.unwrap();
}
