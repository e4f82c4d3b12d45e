//! The operator against a real kube-apiserver, etcd and controller manager,
//! with kwok nodes and EdgeNode heartbeats written by the test.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgewire_api::crd::{EdgeService, PlacementSlice, PlacementState};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Event, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use support::*;

fn es_yaml(name: &str, port: u16, max_nodes: Option<u32>) -> String {
    let placement = max_nodes.map_or(String::new(), |m| {
        format!("  placement: {{maxNodes: {m}}}\n")
    });
    format!(
        "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata:\n  name: {name}\nspec:\n  nodeSelector: {{{EDGE_LABEL}: \"true\"}}\n{placement}  port: {port}\n  handlers:\n    - {{name: echo, kind: echo, path: /}}\n  expose: {{type: NodePort}}\n"
    )
}

/// Addresses in the service's EndpointSlices (ready endpoints), sorted.
async fn endpoint_addresses(env: &Env, es: &str) -> Vec<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), env.name());
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={es}")))
        .await
        .unwrap();
    let mut out: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.clone())
        .collect();
    out.sort();
    out
}

async fn wait_endpoints(env: &Env, es: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = endpoint_addresses(env, es).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "endpoints of {es}: {got:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn events_for(env: &Env, es: &str) -> Vec<(String, String, String)> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), env.name());
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(es))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}

async fn wait_event(env: &Env, es: &str, reason: &str) -> (String, String, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(e) = events_for(env, es)
            .await
            .into_iter()
            .find(|e| e.1 == reason)
        {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event for {es}: {:?}",
            events_for(env, es).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until EdgeNode `node`'s condition `type_` has `reason`.
async fn wait_edge_node_reason(env: &Env, node: &str, type_: &str, reason: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let path = format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].reason}}");
    loop {
        let out = env
            .plane
            .kubectl()
            .unwrap()
            .args(["get", "edgenode", node, "-o", &path])
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == reason {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "EdgeNode {node}: {type_} reason {got:?}, wanted {reason}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ready(es: &EdgeService) -> bool {
    condition(es, "Ready") == Some(("True", "AllNodesReady"))
}

#[tokio::test]
async fn places_routes_and_reports_status() {
    let env = Env::new("place").await;
    let nodes = env.nodes(&["a", "b", "c"], &[(EDGE_LABEL, "true")]).await;
    let other = env.nodes(&["x"], &[]).await;
    let _beats = Heartbeats::start(
        env.client.clone(),
        env.name(),
        &[nodes.clone(), other.clone()].concat(),
    );
    let _op = Operator::start(&env, "op-1");

    env.apply_es(&es_yaml("chat", 8765, None)).await;
    let es = env
        .wait_es("chat", "3/3 ready", |es| {
            ready(es) && es.status.as_ref().unwrap().nodes == "3/3"
        })
        .await;
    assert_eq!(placed(&es), nodes, "only the nodes matching the selector");
    let status = es.status.clone().unwrap();
    assert_eq!(status.observed_generation, es.metadata.generation);
    assert_eq!(status.connections, 6, "2 per node, summed");
    assert!(
        status
            .placement
            .iter()
            .all(|p| p.state == PlacementState::Ready && p.address.is_some())
    );
    assert_eq!(condition(&es, "Placed"), Some(("True", "Placed")));
    assert_eq!(condition(&es, "Degraded"), Some(("False", "AsExpected")));

    let services: Api<Service> = Api::namespaced(env.client.clone(), env.name());
    let svc = services.get("chat").await.unwrap();
    assert_eq!(
        svc.spec.as_ref().unwrap().type_.as_deref(),
        Some("NodePort")
    );
    assert_eq!(svc.owner_references()[0].uid, es.uid().unwrap());
    assert!(
        svc.managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some("edgewire-operator"))
    );
    wait_endpoints(&env, "chat", &["192.0.2.1", "192.0.2.2", "192.0.2.3"]).await;
    let placed_event = wait_event(&env, "chat", "Placed").await;
    assert!(placed_event.2.contains(&nodes[0]), "{placed_event:?}");

    // What `kubectl get es` and `kubectl get edgenodes` show.
    let out = env
        .plane
        .kubectl()
        .unwrap()
        .args(["get", "es", "-n", env.name()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("NODES") && table.contains("CONNECTIONS") && table.contains("AGE"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("chat") && l.contains("3/3") && l.contains(" 6 ")),
        "{table}"
    );
    let out = env
        .plane
        .kubectl()
        .unwrap()
        .args(["get", "edgenodes", &nodes[0]])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("LAST HEARTBEAT") && table.contains("SERVICES"),
        "{table}"
    );
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains("True")),
        "{table}"
    );
    env.cleanup_nodes(&[nodes, other].concat()).await;
}

#[tokio::test]
async fn scale_down_relabel_and_stale_heartbeat() {
    let env = Env::new("change").await;
    let nodes = env.nodes(&["a", "b", "c"], &[(EDGE_LABEL, "true")]).await;
    let beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let _op = Operator::start(&env, "op-1");

    env.apply_es(&es_yaml("feed", 9000, Some(3))).await;
    env.wait_es("feed", "3 ready", |es| ready(es) && placed(es).len() == 3)
        .await;

    // Lower the maximum: placement shrinks deterministically, endpoints follow.
    env.apply_es(&es_yaml("feed", 9000, Some(2))).await;
    let es = env
        .wait_es("feed", "2 placed", |es| placed(es).len() == 2 && ready(es))
        .await;
    assert_eq!(placed(&es), nodes[..2].to_vec());
    wait_endpoints(&env, "feed", &["192.0.2.1", "192.0.2.2"]).await;
    wait_event(&env, "feed", "Unplaced").await;

    // Relabel: node a no longer matches; c (eligible again) takes its place.
    env.set_node_label(&nodes[0], EDGE_LABEL, None).await;
    let es = env
        .wait_es("feed", "a replaced", |es| {
            !placed(es).contains(&nodes[0]) && ready(es)
        })
        .await;
    assert_eq!(placed(&es), vec![nodes[1].clone(), nodes[2].clone()]);
    wait_endpoints(&env, "feed", &["192.0.2.2", "192.0.2.3"]).await;

    // Nodes serving for the first time are told by `Placed`, not as back.
    assert!(
        !events_for(&env, "feed")
            .await
            .iter()
            .any(|e| e.1 == "NodeReady"),
        "NodeReady before any node was stale: {:?}",
        events_for(&env, "feed").await
    );

    // A silent agent: out of the endpoints within the heartbeat timeout,
    // marked stale, Degraded, with an Event; but still placed (stable).
    beats.set(&nodes[1], false);
    let silenced = tokio::time::Instant::now();
    let es = env
        .wait_es("feed", "b stale", |es| {
            es.status.as_ref().is_some_and(|s| {
                s.placement
                    .iter()
                    .any(|p| p.node == nodes[1] && p.state == PlacementState::Stale)
            })
        })
        .await;
    wait_endpoints(&env, "feed", &["192.0.2.3"]).await;
    let took = silenced.elapsed();
    assert!(
        took < Duration::from_secs(HEARTBEAT_TIMEOUT_SECS + 10),
        "stale detected after {took:?}"
    );
    assert_eq!(condition(&es, "Degraded"), Some(("True", "NodeStale")));
    assert_eq!(
        placed(&es),
        vec![nodes[1].clone(), nodes[2].clone()],
        "a stale node keeps its place"
    );
    let event = wait_event(&env, "feed", "NodeStale").await;
    assert_eq!(event.0, "Warning");
    // The EdgeNode says so too (written by the operator's EdgeNode controller).
    wait_edge_node_reason(&env, &nodes[1], "Ready", "HeartbeatStale").await;

    // Back: ready again, back in the endpoints.
    beats.set(&nodes[1], true);
    env.wait_es("feed", "b ready again", ready).await;
    wait_endpoints(&env, "feed", &["192.0.2.2", "192.0.2.3"]).await;
    let event = wait_event(&env, "feed", "NodeReady").await;
    assert!(event.2.starts_with(&nodes[1]), "{event:?}");

    // A Node deleted under a silent agent: its EdgeNode changes no more, so
    // only the Node's deletion can tell the EdgeNode controller.
    beats.set(&nodes[0], false);
    let node_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    node_api
        .delete(&nodes[0], &DeleteParams::default())
        .await
        .unwrap();
    wait_edge_node_reason(&env, &nodes[0], "Degraded", "NodeNotFound").await;
    env.cleanup_nodes(&nodes).await;
}

/// Node `node`'s Ready reason, as the operator last wrote it.
async fn edge_node_ready_reason(env: &Env, node: &str) -> Option<String> {
    let api: Api<edgewire_api::crd::EdgeNode> = Api::all(env.client.clone());
    let en = api.get(node).await.ok()?;
    en.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason)
}

#[tokio::test]
async fn a_node_renewing_only_its_lease_stays_ready_and_its_return_is_seen_at_once() {
    let env = Env::new("lease").await;
    let nodes = env.nodes(&["a", "b"], &[(EDGE_LABEL, "true")]).await;
    let beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let _op = Operator::start(&env, "op-1");
    env.apply_es(&es_yaml("feed", 9010, None)).await;
    env.wait_es("feed", "2 ready", |es| ready(es) && placed(es).len() == 2)
        .await;

    // From now on node a's agent renews its Lease and reports no status;
    // node b's falls silent.
    let leases = Heartbeats::leases(env.client.clone(), env.name(), &nodes[..1]);
    beats.set(&nodes[0], false);
    beats.set(&nodes[1], false);
    wait_edge_node_reason(&env, &nodes[1], "Ready", "HeartbeatStale").await;
    wait_endpoints(&env, "feed", &["192.0.2.1"]).await;
    // Three heartbeat timeouts on, node a has never left Ready or the
    // endpoints (sampled throughout, not only at the end).
    let until = tokio::time::Instant::now() + Duration::from_secs(3 * HEARTBEAT_TIMEOUT_SECS);
    while tokio::time::Instant::now() < until {
        let reason = edge_node_ready_reason(&env, &nodes[0]).await;
        assert_eq!(
            reason.as_deref(),
            Some("HeartbeatFresh"),
            "node a renews its Lease"
        );
        assert_eq!(endpoint_addresses(&env, "feed").await, ["192.0.2.1"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The renewals stop: stale within the timeout, out of the endpoints.
    leases.set(&nodes[0], false);
    wait_edge_node_reason(&env, &nodes[0], "Ready", "HeartbeatStale").await;
    wait_endpoints(&env, "feed", &[]).await;

    // They resume: the renewal itself brings the node back, long before the
    // operator would look again on its own (at the eviction timeout, 120 s).
    leases.set(&nodes[0], true);
    let resumed = tokio::time::Instant::now();
    wait_edge_node_reason(&env, &nodes[0], "Ready", "HeartbeatFresh").await;
    wait_endpoints(&env, "feed", &["192.0.2.1"]).await;
    let took = resumed.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "back in the endpoints {took:?} after the renewals resumed"
    );
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn port_conflicts_are_reported_not_placed() {
    let env = Env::new("conflict").await;
    let nodes = env.nodes(&["a", "b"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let _op = Operator::start(&env, "op-1");

    env.apply_es(&es_yaml("first", 7000, None)).await;
    env.wait_es("first", "ready", |es| ready(es) && placed(es).len() == 2)
        .await;
    env.apply_es(&es_yaml("second", 7000, None)).await;
    let second = env
        .wait_es("second", "conflict", |es| condition(es, "Placed").is_some())
        .await;
    assert_eq!(
        condition(&second, "Placed"),
        Some(("False", "PortConflict"))
    );
    assert_eq!(
        condition(&second, "Degraded"),
        Some(("True", "PortConflict"))
    );
    assert!(placed(&second).is_empty());
    let event = wait_event(&env, "second", "PortConflict").await;
    assert_eq!(event.0, "Warning");
    assert!(
        event.2.contains(&format!("{}/first", env.name())),
        "{event:?}"
    );
    // The first keeps both nodes, untouched.
    let first = env.es_api().get("first").await.unwrap();
    assert_eq!(placed(&first), nodes);
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn a_claimed_node_the_service_did_not_need_is_no_conflict() {
    let env = Env::new("noconflict").await;
    let nodes = env.nodes(&["a", "b", "c"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let _op = Operator::start(&env, "op-1");

    env.apply_es(&es_yaml("first", 7100, Some(1))).await;
    let first = env.wait_es("first", "ready", ready).await;
    // One node wanted, two free of the port: the claim costs nothing.
    env.apply_es(&es_yaml("second", 7100, Some(1))).await;
    let second = env.wait_es("second", "ready", ready).await;
    assert_ne!(placed(&first), placed(&second));
    // Give a wrong condition time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = env.es_api().get("second").await.unwrap();
    assert_eq!(condition(&second, "Placed"), Some(("True", "Placed")));
    assert_eq!(
        condition(&second, "Degraded"),
        Some(("False", "AsExpected")),
        "{:?}",
        second.status
    );
    assert!(
        !events_for(&env, "second")
            .await
            .iter()
            .any(|e| e.1 == "PortConflict"),
        "a PortConflict event for a port that cost nothing"
    );
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn services_on_one_port_created_together_never_share_a_node() {
    let env = Env::new("sameport").await;
    let nodes = env
        .nodes(&["a", "b", "c", "d"], &[(EDGE_LABEL, "true")])
        .await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    // Every version of every EdgeService's placement, as a watch sees them:
    // a pair sharing a node even for a moment is a clash.
    let clashes = Arc::new(Mutex::new(Vec::<String>::new()));
    let watch = {
        let (api, clashes) = (env.es_api(), Arc::clone(&clashes));
        tokio::spawn(async move {
            let mut placed_now: BTreeMap<String, (i32, Vec<String>)> = BTreeMap::new();
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(es)) = stream.next().await {
                let name = es.name_any();
                let mine = placed(&es);
                for (other, (port, theirs)) in &placed_now {
                    if *other != name
                        && *port == es.spec.port
                        && mine.iter().any(|n| theirs.contains(n))
                    {
                        clashes
                            .lock()
                            .unwrap()
                            .push(format!("{name} {mine:?} and {other} {theirs:?}"));
                    }
                }
                placed_now.insert(name, (es.spec.port, mine));
            }
        })
    };
    let _op = Operator::start(&env, "op-1");
    // Pairs of services on one port, each pair applied at once, each
    // wanting two of the four nodes: two such choices made apart from each
    // other share a node five times in six.
    let pairs = [7201, 7202, 7203, 7204, 7205];
    let applies = pairs.iter().flat_map(|port| {
        let env = &env;
        [format!("p{port}-x"), format!("p{port}-y")]
            .map(move |name| async move { env.apply_es(&es_yaml(&name, *port, Some(2))).await })
    });
    futures_util::future::join_all(applies).await;
    for port in pairs {
        let (x, y) = (format!("p{port}-x"), format!("p{port}-y"));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let a = env.es_api().get(&x).await.unwrap();
            let b = env.es_api().get(&y).await.unwrap();
            let (pa, pb) = (placed(&a), placed(&b));
            let apart = pa.iter().all(|n| !pb.contains(n));
            if ready(&a) && ready(&b) && pa.len() == 2 && pb.len() == 2 && apart {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "port {port}: {x} on {pa:?}, {y} on {pb:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    watch.abort();
    let clashes = clashes.lock().unwrap().clone();
    assert!(
        clashes.is_empty(),
        "services on one port shared a node: {clashes:?}"
    );
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn a_service_the_operator_did_not_create_is_never_taken_over() {
    let env = Env::new("foreign").await;
    let nodes = env.nodes(&["a"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let services: Api<Service> = Api::namespaced(env.client.clone(), env.name());
    let mine: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "chat", "labels": {"app": "mine"}},
        "spec": {"selector": {"app": "mine"}, "ports": [{"port": 80, "name": "http"}]},
    }))
    .unwrap();
    let mine = services.create(&Default::default(), &mine).await.unwrap();
    let _op = Operator::start(&env, "op-1");

    env.apply_es(&es_yaml("chat", 7300, None)).await;
    let es = env
        // Still placed: the node serves at its own address.
        .wait_es("chat", "placed, Degraded=ServiceConflict", |es| {
            condition(es, "Degraded") == Some(("True", "ServiceConflict")) && placed(es) == nodes
        })
        .await;
    let degraded = es
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
        .unwrap();
    assert!(
        degraded.message.contains(&format!("{}/chat", env.name())),
        "{degraded:?}"
    );
    let event = wait_event(&env, "chat", "ServiceConflict").await;
    assert_eq!(event.0, "Warning");
    // The user's Service is as the user made it, and has no endpoints of ours.
    let now = services.get("chat").await.unwrap();
    assert!(now.owner_references().is_empty(), "{:?}", now.metadata);
    assert_eq!(now.spec, mine.spec);
    assert_eq!(now.metadata.labels, mine.metadata.labels);
    assert!(endpoint_addresses(&env, "chat").await.is_empty());

    // Deleting the EdgeService leaves the user's Service alone.
    env.es_api()
        .delete("chat", &DeleteParams::foreground())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.es_api().get_opt("chat").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "EdgeService not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = services.get_opt("chat").await.unwrap();
    assert_eq!(
        after.map(|s| s.metadata.uid),
        Some(mine.metadata.uid),
        "the user's Service was deleted with the EdgeService"
    );
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn connection_counts_alone_do_not_rewrite_status_every_heartbeat() {
    let env = Env::new("conns").await;
    let nodes = env.nodes(&["a", "b"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::churning(env.client.clone(), env.name(), &nodes);
    let op = Operator::start(&env, "op-1");
    env.apply_es(&es_yaml("busy", 7400, None)).await;
    let es = env.wait_es("busy", "ready", ready).await;
    assert!(es.status.as_ref().unwrap().connections > 0);
    let writes = r#"edgewire_operator_writes_total{kind="edgeservice_status"}"#;
    let reconciles =
        r#"edgewire_operator_reconcile_duration_seconds_count{controller="edgeservice"}"#;
    // Let the first placement settle, then count over 10 s of heartbeats
    // (two nodes, every 500 ms, each with a new connection count).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (w0, r0) = (op.metric(writes).await, op.metric(reconciles).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (w1, r1) = (op.metric(writes).await, op.metric(reconciles).await);
    // The default status interval is 30 s: at most one connection update
    // in the window, against ~40 heartbeats with new counts. Reconciles come
    // from the staleness timer alone (every ~3 s with these tests' 3 s
    // heartbeat timeout), not from the heartbeats.
    assert!(w1 - w0 <= 1.0, "{} status writes in 10 s", w1 - w0);
    assert!(r1 - r0 <= 8.0, "{} reconciles in 10 s", r1 - r0);
    env.cleanup_nodes(&nodes).await;
}

/// Changes that keep coming for a service hold its reconcile back by at most
/// the batch period, never for as long as they keep coming: a node it
/// selects is relabelled every 150 ms (a label its selector does not read,
/// as a fleet's labelling tools do) while its spec changes.
#[tokio::test]
async fn a_stream_of_changes_never_holds_a_reconcile_back() {
    let env = Env::new("stream").await;
    let nodes = env.nodes(&["a", "b"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let _op = Operator::start(&env, "op-1");
    env.apply_es(&es_yaml("steady", 7600, Some(2))).await;
    env.wait_es("steady", "2 ready", |es| ready(es) && placed(es).len() == 2)
        .await;

    // Bounded: 200 relabels, about 30 s, far longer than the decision
    // below needs; it must come while they still go on.
    let relabels = async {
        for i in 0..200 {
            let rack = (i % 2).to_string();
            env.set_node_label(&nodes[0], "example.com/rack", Some(&rack))
                .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let decided = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let generation = env
            .apply_es(&es_yaml("steady", 7600, Some(1)))
            .await
            .metadata
            .generation;
        env.wait_es("steady", "the new spec decided", |es| {
            es.status.as_ref().and_then(|s| s.observed_generation) == generation
                && placed(es).len() == 1
        })
        .await
    };
    tokio::select! {
        () = relabels => panic!("decided only once the relabelling stopped"),
        _ = decided => {}
    }
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn deleting_an_edgeservice_garbage_collects_what_it_owned() {
    let env = Env::new("gc").await;
    let nodes = env.nodes(&["a"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let _op = Operator::start(&env, "op-1");
    env.apply_es(&es_yaml("gone", 8100, None)).await;
    env.wait_es("gone", "ready", ready).await;
    wait_endpoints(&env, "gone", &["192.0.2.1"]).await;

    env.es_api()
        .delete("gone", &DeleteParams::background())
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(env.client.clone(), env.name());
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), env.name());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let svc = services.get_opt("gone").await.unwrap();
        let left = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=gone"))
            .await
            .unwrap();
        let placement = Api::<PlacementSlice>::namespaced(env.client.clone(), env.name())
            .list(&ListParams::default().labels("edgewire.dev/edgeservice=gone"))
            .await
            .unwrap();
        if svc.is_none() && left.items.is_empty() && placement.items.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Service, EndpointSlices or PlacementSlices survived their EdgeService"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn a_restarted_operator_writes_nothing_when_nothing_changed() {
    let env = Env::new("restart").await;
    let nodes = env.nodes(&["a", "b"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let mut first = Operator::start(&env, "op-1");
    env.apply_es(&es_yaml("steady", 8200, None)).await;
    env.wait_es("steady", "ready", ready).await;
    wait_endpoints(&env, "steady", &["192.0.2.1", "192.0.2.2"]).await;
    assert!(
        first.terminate().success(),
        "clean shutdown; log:\n{}",
        first.log()
    );

    let versions = |env: &Env| {
        let (client, ns) = (env.client.clone(), env.name().to_string());
        async move {
            let es = Api::<EdgeService>::namespaced(client.clone(), &ns)
                .get("steady")
                .await
                .unwrap();
            let svc = Api::<Service>::namespaced(client.clone(), &ns)
                .get("steady")
                .await
                .unwrap();
            let slices = Api::<EndpointSlice>::namespaced(client, &ns)
                .list(&ListParams::default().labels("kubernetes.io/service-name=steady"))
                .await
                .unwrap();
            let mut v = vec![es.resource_version(), svc.resource_version()];
            v.extend(slices.items.iter().map(|s| s.resource_version()));
            v
        }
    };
    let before = versions(&env).await;
    let second = Operator::start(&env, "op-2");
    let deadline = tokio::time::Instant::now() + WAIT;
    while second
        .metric(r#"edgewire_operator_reconcile_duration_seconds_count{controller="edgeservice"}"#)
        .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new operator never reconciled; log:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let it settle through a few more heartbeat-driven reconciles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        versions(&env).await,
        before,
        "the restarted operator changed something"
    );
    let metrics = second.metrics().await;
    assert!(
        !metrics.contains("edgewire_operator_writes_total{kind=\"edgeservice_status\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("edgewire_operator_writes_total{kind=\"service\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("edgewire_operator_writes_total{kind=\"endpointslice\"}"),
        "{metrics}"
    );
    assert!(
        second
            .metric(r#"edgewire_operator_edgeservices{ready="true"}"#)
            .await
            >= 1.0
    );
    env.cleanup_nodes(&nodes).await;
}

#[tokio::test]
async fn two_replicas_one_leader_and_failover() {
    let env = Env::new("leader").await;
    let nodes = env.nodes(&["a"], &[(EDGE_LABEL, "true")]).await;
    let _beats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    let one = Operator::start(&env, "op-1");
    let two = Operator::start(&env, "op-2");

    let deadline = tokio::time::Instant::now() + WAIT;
    let leaders = loop {
        let l = (
            one.metric("edgewire_operator_leader").await,
            two.metric("edgewire_operator_leader").await,
        );
        if l.0 + l.1 >= 1.0 {
            break l;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaders_later = (
        one.metric("edgewire_operator_leader").await,
        two.metric("edgewire_operator_leader").await,
    );
    assert_eq!(
        leaders_later.0 + leaders_later.1,
        1.0,
        "exactly one leader: {leaders:?} then {leaders_later:?}"
    );
    assert_eq!(leaders, leaders_later, "leadership is stable");
    let (mut leader, standby) = if leaders_later.0 == 1.0 {
        (one, two)
    } else {
        (two, one)
    };
    assert!(standby.log().contains("standing by"), "{}", standby.log());

    env.apply_es(&es_yaml("ha", 8300, None)).await;
    env.wait_es("ha", "ready", ready).await;
    assert!(leader.terminate().success());
    // The standby takes over (the lease was released) and serves changes.
    env.apply_es(&es_yaml("ha2", 8301, None)).await;
    env.wait_es("ha2", "placed by the new leader", ready).await;
    assert_eq!(standby.metric("edgewire_operator_leader").await, 1.0);
    env.cleanup_nodes(&nodes).await;
}
