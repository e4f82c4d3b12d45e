//! A `wasm` handler whose module comes from a ConfigMap, on the real control
//! plane with the operator and an agent in cluster mode: the module is
//! served; a module without the HTTP export makes the EdgeService
//! `Degraded` with `ModuleMissingExport`, the EdgeNode names it, an Event
//! says it; bytes that are not a component are `ModuleInvalid`, reported
//! alike; a good module put in the ConfigMap rolls out on its own; an image
//! no registry serves is `ModulePullFailed`.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeService};
use edgewire_testenv::NodeSpec;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, ObjectMeta};
use serde_json::json;
use support::cluster::*;
use support::*;

fn module(name: &str) -> Vec<u8> {
    std::fs::read(wasm_components().join(format!("{name}.wasm"))).expect("the built component")
}

async fn put_config_map(api: &Api<ConfigMap>, add: Vec<u8>, other: Vec<u8>) {
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("modules".into()),
            ..ObjectMeta::default()
        },
        binary_data: Some(BTreeMap::from([
            ("add.wasm".to_string(), ByteString(add)),
            ("other.wasm".to_string(), ByteString(other)),
        ])),
        ..ConfigMap::default()
    };
    apply(api, "modules", &map).await;
}

#[tokio::test]
async fn a_module_from_a_config_map_is_served_and_its_errors_reported() {
    let namespace = "wasm";
    let (plane, client) = start_plane(&[namespace]).await;
    let ip = "127.0.0.61";
    edgewire_testenv::add_nodes(
        &client,
        &[NodeSpec::new("edge-w")
            .label("edgewire.dev/test", namespace)
            .internal_ip(ip)],
    )
    .await
    .unwrap();

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    put_config_map(&maps, module("add"), module("missing-export")).await;

    let logs = tempfile::tempdir().unwrap();
    let _operator = spawn_operator(
        &plane.kubeconfig,
        namespace,
        &logs.path().join("operator.log"),
        &["--heartbeat-timeout", "10"],
    );
    let state = tempfile::tempdir().unwrap();
    let agent = spawn_cluster_agent(
        &plane.kubeconfig,
        namespace,
        "edge-w",
        (ip, ip),
        state.path(),
        &[],
    );

    let port = free_port();
    let services: Api<EdgeService> = Api::namespaced(client.clone(), namespace);
    let other = "{configMap: {name: modules, key: other.wasm}}";
    apply_compute(&services, port, other).await;
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let operator_log =
        || std::fs::read_to_string(logs.path().join("operator.log")).unwrap_or_default();

    // Served from the ConfigMap; the other handler answers 503.
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        if http_get_json(addr, "/add?a=1&b=2").await == (200, json!({"result": 3})) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/add never served; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, body) = http_get_json(addr, "/other").await;
    assert_eq!(status, 503, "{body}");

    // The EdgeService says why, the EdgeNode names it, an Event tells it.
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    reported(&services, &events, "ModuleMissingExport", &operator_log).await;
    let node = Api::<EdgeNode>::all(client.clone())
        .get("edge-w")
        .await
        .unwrap();
    let modules = &node.status.unwrap().services[0].modules;
    let other = modules.iter().find(|m| m.handler == "other").unwrap();
    assert_eq!(other.reason.as_deref(), Some("ModuleMissingExport"));
    let add = modules.iter().find(|m| m.handler == "add").unwrap();
    assert!(
        add.digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{add:?}"
    );
    // Bytes that are not a component: ModuleInvalid, reported the same way.
    put_config_map(&maps, module("add"), b"\0asm not a component".to_vec()).await;
    reported(&services, &events, "ModuleInvalid", &operator_log).await;
    assert_eq!(
        http_get_json(addr, "/add?a=1&b=2").await.0,
        200,
        "add unharmed"
    );

    // A good module in the ConfigMap: rolled out without touching the
    // EdgeService, and the module condition clears.
    put_config_map(&maps, module("add"), module("add")).await;
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let served = http_get_json(addr, "/other?a=2&b=5").await == (200, json!({"result": 7}));
        let es = services.get("compute").await.unwrap();
        // (Loopback node addresses keep it Degraded for InvalidAddress.)
        if served && !degraded(&es).1.starts_with("Module") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new module did not roll out: {:?}\nagent log:\n{}",
            es.status,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // An image no registry answers for: ModulePullFailed, the rest served.
    let unreachable = format!("127.0.0.1:{}/edgewire/none:v1", free_port());
    let other = format!(r#"{{image: "{unreachable}", plainHttp: true}}"#);
    apply_compute(&services, port, &other).await;
    reported(&services, &events, "ModulePullFailed", &operator_log).await;
    assert_eq!(
        http_get_json(addr, "/add?a=1&b=2").await.0,
        200,
        "add unharmed"
    );
}

/// Applies the EdgeService `compute` on `port`: `add` from the ConfigMap,
/// `other` from the `module` given (YAML flow).
async fn apply_compute(services: &Api<EdgeService>, port: u16, other: &str) {
    let es: EdgeService = serde_yaml_ng::from_str(&format!(
        r#"
apiVersion: edgewire.dev/v1alpha1
kind: EdgeService
metadata: {{name: compute}}
spec:
  port: {port}
  handlers:
    - {{name: add, kind: wasm, path: /add, module: {{configMap: {{name: modules, key: add.wasm}}}}}}
    - {{name: other, kind: wasm, path: /other, module: {other}}}
"#
    ))
    .unwrap();
    apply(services, "compute", &es).await;
}

/// Waits until the EdgeService is `Degraded` for `reason` (naming the
/// handler `other`) and an Event with that reason was recorded.
async fn reported(
    services: &Api<EdgeService>,
    events: &Api<Event>,
    reason: &str,
    log: &impl Fn() -> String,
) {
    eventually(&format!("not Degraded/{reason}"), log, || async {
        let es = services.get("compute").await.unwrap();
        let (status, why, message) = degraded(&es);
        status == "True" && why == reason && message.contains("other")
    })
    .await;
    eventually(&format!("no {reason} Event"), log, || async {
        let listed = events.list(&ListParams::default()).await.unwrap();
        listed
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason))
    })
    .await;
}
