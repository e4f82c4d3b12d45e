//! Agents in cluster mode against a real control plane with the operator:
//! they follow placement, report EdgeNodes, mesh with each other, relink
//! after a restart, and keep serving while the API server is down (also when
//! started while it is down, from their stored config).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgewire_api::crd::{EdgeNode, EdgeService};
use edgewire_api::node_lease;
use edgewire_testenv::{ControlPlane, NodeSpec};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::json;
use support::cluster::*;
use support::prometheus::Killed;
use support::*;

const SECRET: &str = "a mesh secret of enough length";

struct Node {
    name: String,
    ip: String,
    state: tempfile::TempDir,
}

struct World {
    plane: ControlPlane,
    namespace: String,
    service_port: u16,
    mesh_port: u16,
    secret: tempfile::NamedTempFile,
    nodes: Vec<Node>,
    /// The operator's log, shown when a wait fails.
    logs: tempfile::TempDir,
}

impl World {
    fn agent(&self, i: usize) -> AgentProcess {
        let node = &self.nodes[i];
        let mesh = format!("{}:{}", node.ip, self.mesh_port);
        spawn_cluster_agent(
            &self.plane.kubeconfig,
            &self.namespace,
            &node.name,
            (&node.ip, &node.ip),
            node.state.path(),
            &[
                "--mesh-address",
                &mesh,
                "--mesh-secret-file",
                self.secret.path().to_str().unwrap(),
            ],
        )
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        format!("{}:{}", self.nodes[i].ip, self.service_port)
            .parse()
            .unwrap()
    }

    fn operator(&self) -> Killed {
        spawn_operator(
            &self.plane.kubeconfig,
            &self.namespace,
            &self.operator_log(),
            &[
                "--heartbeat-timeout",
                "4",
                "--log-level",
                "edgewire_operator=debug,info",
            ],
        )
    }

    fn operator_log(&self) -> std::path::PathBuf {
        self.logs.path().join("operator.log")
    }

    async fn es(&self) -> EdgeService {
        let client = self.plane.client().await.unwrap();
        Api::<EdgeService>::namespaced(client, &self.namespace)
            .get("chat")
            .await
            .unwrap()
    }

    async fn wait_ready(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(client) = self.plane.client().await
                && let Ok(es) = Api::<EdgeService>::namespaced(client, &self.namespace)
                    .get("chat")
                    .await
                && es.status.as_ref().is_some_and(|s| s.nodes == "3/3")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not 3/3 ready: {:?}\noperator log:\n{}",
                self.es().await.status,
                std::fs::read_to_string(self.operator_log()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn subscriber(addr: std::net::SocketAddr) -> Client {
    let mut ws = connect(addr, "/relay").await;
    assert_eq!(
        request(&mut ws, json!({"type": "subscribe", "channel": "news"})).await["type"],
        "subscribed"
    );
    ws
}

/// Publishes at `publisher` until every subscriber has seen one probe, then
/// checks that a numbered burst arrives at each, in order, once.
async fn carries(publisher: &mut Client, subs: &mut [&mut Client], tag: &str) {
    let mut seen = vec![false; subs.len()];
    for round in 0..300 {
        send_text(
            publisher,
            json!({"type": "publish", "channel": "news", "data": {"probe": round}}).to_string(),
        )
        .await;
        for (i, sub) in subs.iter_mut().enumerate() {
            while let Ok(Some(Ok(m))) = tokio::time::timeout(
                Duration::from_millis(30),
                futures_util::StreamExt::next(&mut **sub),
            )
            .await
            {
                seen[i] |= m.is_text();
            }
        }
        if seen.iter().all(|s| *s) {
            break;
        }
    }
    assert!(
        seen.iter().all(|s| *s),
        "{tag}: the mesh never reached every subscriber: {seen:?}"
    );
    drop_late_messages(subs, Duration::from_millis(300)).await;
    for n in 0..50 {
        send_text(
            publisher,
            json!({"type": "publish", "channel": "news", "data": {"tag": tag, "n": n}}).to_string(),
        )
        .await;
    }
    for sub in subs.iter_mut() {
        for n in 0..50 {
            assert_eq!(
                next_json(sub).await["data"],
                json!({"tag": tag, "n": n}),
                "{tag}: message {n}"
            );
        }
    }
}

async fn echo_works(addr: std::net::SocketAddr, text: &str) {
    let mut ws = connect(addr, "/").await;
    send_text(&mut ws, text).await;
    assert_eq!(next_text(&mut ws).await, format!("Echo: {text}"));
}

#[tokio::test]
async fn agents_follow_placement_mesh_and_survive_the_api_going_away() {
    // The control plane is this test's own, so a fixed namespace will do.
    let namespace = "cluster".to_string();
    let (plane, client) = start_plane(&[&namespace]).await;
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut secret, SECRET.as_bytes()).unwrap();

    let mut nodes = Vec::new();
    let mut specs = Vec::new();
    for i in 0..3 {
        let name = format!("edge-{i}");
        let ip = format!("127.0.0.{}", 30 + i);
        specs.push(
            NodeSpec::new(&name)
                .label("edgewire.dev/edge", "true")
                .label("edgewire.dev/test", &namespace)
                .internal_ip(&ip),
        );
        nodes.push(Node {
            name,
            ip,
            state: tempfile::tempdir().unwrap(),
        });
    }
    edgewire_testenv::add_nodes(&client, &specs).await.unwrap();
    let world = World {
        plane,
        namespace: namespace.clone(),
        service_port: free_port(),
        mesh_port: free_port(),
        secret,
        nodes,
        logs: tempfile::tempdir().unwrap(),
    };
    let _operator = world.operator();
    let mut agents: Vec<Option<AgentProcess>> = (0..3).map(|i| Some(world.agent(i))).collect();
    let es_yaml = format!(
        "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata: {{name: chat, namespace: {namespace}}}\nspec:\n  nodeSelector: {{edgewire.dev/edge: \"true\"}}\n  port: {}\n  handlers: [{{name: echo, kind: echo, path: /}}]\n  channels: [{{name: news}}]\n",
        world.service_port
    );
    let es: EdgeService = serde_yaml_ng::from_str(&es_yaml).unwrap();
    apply(
        &Api::<EdgeService>::namespaced(client.clone(), &namespace),
        "chat",
        &es,
    )
    .await;

    // Placement reaches the agents; their EdgeNodes report it; status is 3/3.
    world.wait_ready("first placement").await;
    let en = Api::<EdgeNode>::all(client.clone())
        .get("edge-0")
        .await
        .unwrap();
    let status = en.status.unwrap();
    assert_eq!(en.spec.address, "127.0.0.30");
    assert_eq!(status.services.len(), 1);
    assert!(status.services[0].listening);
    for i in 0..3 {
        echo_works(world.addr(i), "placed").await;
    }

    // The heartbeat is the node Lease: renewed every second, while the
    // EdgeNode's status, with nothing new to report, is not written again,
    // and the node stays Ready.
    let edge_nodes: Api<EdgeNode> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let renewed = |lease: Lease| lease.spec.and_then(|s| s.renew_time).map(|t| t.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = edge_nodes.get("edge-0").await.unwrap();
    let renewal = renewed(leases.get(&node_lease::name("edge-0")).await.unwrap());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = edge_nodes.get("edge-0").await.unwrap();
    assert_ne!(
        renewed(leases.get(&node_lease::name("edge-0")).await.unwrap()),
        renewal,
        "the node Lease was not renewed in 4 s"
    );
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "the EdgeNode was rewritten with nothing new to report: {:?} then {:?}",
        before.status, after.status
    );
    assert!(
        after
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{:?}",
        after.status
    );

    // Publish at one node, receive at the others.
    let mut publisher = connect(world.addr(0), "/relay").await;
    let mut at_1 = subscriber(world.addr(1)).await;
    let mut at_2 = subscriber(world.addr(2)).await;
    carries(&mut publisher, &mut [&mut at_1, &mut at_2], "first").await;

    // The subscriber at node 2 leaves: forwarding to node 2 stops (once node
    // 0 has heard), while node 1 keeps getting everything.
    assert_eq!(
        request(
            &mut at_2,
            json!({"type": "unsubscribe", "channel": "news", "id": 1})
        )
        .await["type"],
        "unsubscribed"
    );
    let received = r#"edgewire_mesh_messages_total{direction="received",service="cluster/chat"}"#;
    let mut quiet_rounds = 0;
    for round in 0..50 {
        let before = metric_value(&agents[2].as_ref().unwrap().metrics().await, received);
        for n in 0..10 {
            send_text(
                &mut publisher,
                json!({"type": "publish", "channel": "news", "data": {"round": round, "n": n}})
                    .to_string(),
            )
            .await;
        }
        for n in 0..10 {
            assert_eq!(
                next_json(&mut at_1).await["data"],
                json!({"round": round, "n": n})
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = metric_value(&agents[2].as_ref().unwrap().metrics().await, received);
        quiet_rounds = if after == before { quiet_rounds + 1 } else { 0 };
        if quiet_rounds == 3 {
            break;
        }
    }
    assert_eq!(
        quiet_rounds, 3,
        "node 2 kept receiving after its last subscriber left"
    );
    assert_eq!(
        request(
            &mut at_2,
            json!({"type": "subscribe", "channel": "news", "id": 2})
        )
        .await["type"],
        "subscribed"
    );
    carries(&mut publisher, &mut [&mut at_1, &mut at_2], "resubscribed").await;

    // Kill an agent: the others keep serving; it comes back and relinks.
    drop(agents[1].take());
    carries(&mut publisher, &mut [&mut at_2], "without-1").await;
    agents[1] = Some(world.agent(1));
    agents[1].as_ref().unwrap().wait_ready().await;
    let mut at_1 = subscriber(world.addr(1)).await;
    carries(&mut publisher, &mut [&mut at_1, &mut at_2], "relinked").await;

    // The API server goes away: every agent keeps serving its clients.
    let mut world = world;
    world.plane.stop_component("kube-apiserver").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    carries(&mut publisher, &mut [&mut at_1, &mut at_2], "api-down").await;
    for i in 0..3 {
        echo_works(world.addr(i), "offline").await;
    }
    // An agent (re)started while the API is down serves from its stored config.
    drop(agents[2].take());
    agents[2] = Some(world.agent(2));
    agents[2].as_ref().unwrap().wait_ready().await;
    echo_works(world.addr(2), "from the stored config").await;
    assert!(
        agents[2]
            .as_ref()
            .unwrap()
            .log()
            .contains("serving the stored config"),
        "{}",
        agents[2].as_ref().unwrap().log()
    );
    let mut at_2 = subscriber(world.addr(2)).await;
    carries(&mut publisher, &mut [&mut at_2], "restarted-offline").await;

    // The API server returns: heartbeats resume and status catches up.
    let back = k8s_openapi::jiff::Timestamp::now();
    world.plane.start_component("kube-apiserver").await.unwrap();
    let client = world.plane.client().await.unwrap();
    let edge_nodes: Api<EdgeNode> = Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(90);
    for node in ["edge-0", "edge-1", "edge-2"] {
        loop {
            let fresh = edge_nodes
                .get(node)
                .await
                .ok()
                .and_then(|en| en.status?.last_heartbeat)
                .is_some_and(|t| t.0 > back);
            if fresh {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{node} never reported after the API returned"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    world.wait_ready("after the API returned").await;
    let status = world.es().await.status.unwrap();
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for p in status.placement {
        placed.insert(p.node, format!("{:?}", p.state));
    }
    assert!(placed.values().all(|s| s == "Ready"), "{placed:?}");
    carries(&mut publisher, &mut [&mut at_1, &mut at_2], "api-back").await;
}

/// Whether an EndpointSlice of service `chat` in `namespace` lists `address`.
async fn in_endpoint_slice(client: &kube::Client, namespace: &str, address: &str) -> bool {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let params = kube::api::ListParams::default().labels("kubernetes.io/service-name=chat");
    match slices.list(&params).await {
        Ok(list) => list.items.iter().any(|s| {
            s.endpoints
                .iter()
                .any(|e| e.addresses.iter().any(|a| a == address))
        }),
        Err(err) => panic!("cannot list EndpointSlices: {err}"),
    }
}

/// A rolling upgrade stops an agent with SIGTERM. Its node must leave the
/// service's EndpointSlice before its port stops accepting, so no client is
/// sent to a closed port; its clients are then closed with 1001.
///
/// EndpointSlices refuse loopback addresses, so the agent advertises a
/// documentation address (TEST-NET-1, never routed) while it listens on
/// loopback; the test only reads the slice for that address.
#[tokio::test]
async fn a_terminating_agent_leaves_the_endpoints_before_its_port_closes() {
    let namespace = "leaving".to_string();
    let (plane, client) = start_plane(&[&namespace]).await;
    let (listen, advertise) = ("127.0.0.40", "192.0.2.40");
    edgewire_testenv::add_nodes(
        &client,
        &[NodeSpec::new("edge-leaving")
            .label("edgewire.dev/edge", "true")
            .label("edgewire.dev/test", &namespace)
            .internal_ip(advertise)],
    )
    .await
    .unwrap();
    let world = World {
        plane,
        namespace: namespace.clone(),
        service_port: free_port(),
        mesh_port: free_port(),
        secret: tempfile::NamedTempFile::new().unwrap(),
        nodes: vec![],
        logs: tempfile::tempdir().unwrap(),
    };
    let _operator = world.operator();
    let state = tempfile::tempdir().unwrap();
    let mut agent = spawn_cluster_agent(
        &world.plane.kubeconfig,
        &namespace,
        "edge-leaving",
        (listen, advertise),
        state.path(),
        &[],
    );
    let es_yaml = format!(
        "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata: {{name: chat, namespace: {namespace}}}\nspec:\n  nodeSelector: {{edgewire.dev/edge: \"true\"}}\n  port: {}\n  handlers: [{{name: echo, kind: echo, path: /}}]\n",
        world.service_port
    );
    let es: EdgeService = serde_yaml_ng::from_str(&es_yaml).unwrap();
    apply(
        &Api::<EdgeService>::namespaced(client.clone(), &namespace),
        "chat",
        &es,
    )
    .await;
    let addr: std::net::SocketAddr = format!("{listen}:{}", world.service_port).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !in_endpoint_slice(&client, &namespace, advertise).await {
        assert!(
            Instant::now() < deadline,
            "the node never entered the EndpointSlice; agent log:\n{}\noperator log:\n{}",
            agent.log(),
            std::fs::read_to_string(world.operator_log()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    echo_works(addr, "before").await;
    let mut client_ws = connect(addr, "/").await;

    // SIGTERM, then watch both: the slice (as a load balancer would) and
    // the port (as a new client would).
    let started = Instant::now();
    agent.signal("TERM");
    let mut left_slice = None;
    let mut port_closed = None;
    while (left_slice.is_none() || port_closed.is_none())
        && started.elapsed() < Duration::from_secs(60)
    {
        if left_slice.is_none() && !in_endpoint_slice(&client, &namespace, advertise).await {
            left_slice = Some(started.elapsed());
        }
        if port_closed.is_none()
            && tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await
                .map_or(true, |c| c.is_err())
        {
            port_closed = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (Some(left_slice), Some(port_closed)) = (left_slice, port_closed) else {
        panic!(
            "after SIGTERM: left the slice {left_slice:?}, port closed {port_closed:?}; agent log:\n{}",
            agent.log()
        );
    };
    eprintln!(
        "after SIGTERM: out of the EndpointSlice at {left_slice:?}, port closed at {port_closed:?}"
    );
    assert!(
        left_slice < port_closed,
        "the port stopped accepting {port_closed:?} after SIGTERM, before the node left the EndpointSlice ({left_slice:?}); agent log:\n{}",
        agent.log()
    );
    let frame = expect_close(&mut client_ws).await;
    assert_eq!(
        frame.code,
        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away
    );
    assert!(
        agent.wait_exit(Duration::from_secs(30)).is_some(),
        "the agent did not exit; log:\n{}",
        agent.log()
    );
}
