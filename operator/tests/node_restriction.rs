//! Each agent is confined to its own node, against the real API server: the
//! chart's RBAC and admission policy applied as rendered, a real pod of the
//! agent's service account on a kwok node, a real TokenRequest bound to that
//! pod, and the real operator deciding the endpoints.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use edgewire_api::crd::EdgeNode;
use edgewire_api::node_lease;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, SelfSubjectReview, TokenRequest, TokenRequestSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::*;

/// An address of the attacker's choosing (TEST-NET-2: never contacted).
const ATTACKER: &str = "198.51.100.66";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// The chart's objects that confine the agents: its ClusterRoles and
/// bindings, and its admission policies about the agent.
fn chart_agent_confinement(env: &Env, release: &str) -> Vec<Value> {
    render_chart(env, release, &[])
        .into_iter()
        .filter(|o| {
            let kind = o["kind"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            matches!(
                kind,
                "ClusterRole"
                    | "ClusterRoleBinding"
                    | "Role"
                    | "RoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            ) && name.starts_with(&format!("{release}-agent"))
        })
        .collect()
}

/// A client that authenticates with `token` only.
async fn client_with_token(env: &Env, token: &str) -> Client {
    let raw = kube::config::Kubeconfig::read_from(&env.plane.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(raw, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Client::try_from(config).unwrap()
}

fn token_request(pod: Option<&Pod>) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(p.name_any()),
                uid: p.uid(),
            }),
        },
        ..TokenRequest::default()
    }
}

/// Server-side apply as the agent does, on the object or its status.
async fn agent_apply(
    client: &Client,
    node: &str,
    status: bool,
    body: Value,
) -> Result<EdgeNode, kube::Error> {
    let api: Api<EdgeNode> = Api::all(client.clone());
    let mut patch = json!({
        "apiVersion": "edgewire.dev/v1alpha1",
        "kind": "EdgeNode",
        "metadata": {"name": node},
    });
    patch
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().cloned().unwrap_or_default());
    let params = PatchParams::apply("edgewire-agent").force();
    if status {
        api.patch_status(node, &params, &Patch::Apply(&patch)).await
    } else {
        api.patch(node, &params, &Patch::Apply(&patch)).await
    }
}

/// Creates `lease` in `namespace`, or renews it when it exists, as the
/// agent does its node Lease.
async fn agent_lease(
    client: &Client,
    namespace: &str,
    mut lease: Lease,
) -> Result<Lease, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = lease.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &lease).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {
            lease.metadata.resource_version = api.get(&name).await?.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &lease).await
        }
        other => other,
    }
}

fn code<T>(result: &Result<T, kube::Error>) -> String {
    match result {
        Ok(_) => "accepted".into(),
        Err(kube::Error::Api(e)) => format!("{} ({})", e.code, e.message),
        Err(e) => format!("error: {e}"),
    }
}

async fn endpoint_addresses(env: &Env, es: &str) -> BTreeSet<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), env.name());
    slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={es}")))
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
        .collect()
}

#[tokio::test]
async fn a_pod_bound_agent_token_writes_only_its_own_nodes_edgenode() {
    let env = Env::new("own-node").await;
    let release = env.name().to_string();
    let _confinement = Applied::new(env.plane, &chart_agent_confinement(&env, &release));
    let account = format!("{release}-agent");
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), env.name());
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(account.clone());
    accounts.create(&PostParams::default(), &sa).await.unwrap();

    let nodes = env.nodes(&["a", "b"], &[(EDGE_LABEL, "true")]).await;
    let (node_a, node_b) = (nodes[0].clone(), nodes[1].clone());

    // The agent's pod on node A, as the DaemonSet would run it.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), env.name());
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-a"},
        "spec": {
            "nodeName": node_a,
            "serviceAccountName": account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "agent", "image": "edgewire/edgewire-agent:test"}],
        },
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let token = accounts
        .create_token_request(&account, &PostParams::default(), &token_request(Some(&pod)))
        .await
        .unwrap()
        .status
        .expect("a token")
        .token;
    let agent = client_with_token(&env, &token).await;

    // The API server names the pod's node in the token's user info.
    let review: SelfSubjectReview = Api::all(agent.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(
        user.extra.as_ref().and_then(|e| e.get(NODE_NAME_EXTRA)),
        Some(&vec![node_a.clone()]),
        "user info of the pod-bound token: {user:?}"
    );

    let beat =
        json!({"status": {"lastHeartbeat": k8s_openapi::jiff::Timestamp::now().to_string()}});
    // An admission policy takes effect once the API server has loaded it:
    // wait (bounded) for the first refusal before judging.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut probe = agent_apply(&agent, &node_b, true, beat.clone()).await;
    while tokio::time::Instant::now() < deadline
        && !matches!(&probe, Err(kube::Error::Api(e)) if e.code == 403)
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
        probe = agent_apply(&agent, &node_b, true, beat.clone()).await;
    }
    eprintln!("first probe of another node's EdgeNode: {}", code(&probe));

    // Everything that should hold; collected, so a run on a chart without
    // the confinement shows each hole at once.
    let mut holes: Vec<String> = Vec::new();
    let own = agent_apply(&agent, &node_a, true, beat.clone()).await;
    assert!(own.is_ok(), "the agent's own heartbeat: {}", code(&own));

    let other_spec = agent_apply(
        &agent,
        &node_b,
        false,
        json!({"spec": {"address": ATTACKER}}),
    )
    .await;
    if !matches!(&other_spec, Err(kube::Error::Api(e)) if e.code == 403) {
        holes.push(format!(
            "agent on A patching B's spec.address: {}",
            code(&other_spec)
        ));
    }
    let other_status = agent_apply(&agent, &node_b, true, beat.clone()).await;
    if !matches!(&other_status, Err(kube::Error::Api(e)) if e.code == 403) {
        holes.push(format!(
            "agent on A forging B's heartbeat: {}",
            code(&other_status)
        ));
    }
    let forged = agent_apply(
        &agent,
        &format!("{}-nowhere", env.name()),
        false,
        json!({"spec": {"address": ATTACKER}}),
    )
    .await;
    if !matches!(&forged, Err(kube::Error::Api(e)) if e.code == 403) {
        holes.push(format!(
            "agent on A creating another EdgeNode: {}",
            code(&forged)
        ));
    }
    // A token of the same account bound to no pod names no node.
    let unbound = accounts
        .create_token_request(&account, &PostParams::default(), &token_request(None))
        .await
        .unwrap()
        .status
        .expect("a token")
        .token;
    let unbound = client_with_token(&env, &unbound).await;
    let unbound_write = agent_apply(&unbound, &node_a, true, beat.clone()).await;
    if !matches!(&unbound_write, Err(kube::Error::Api(e)) if e.code == 403) {
        holes.push(format!(
            "a token bound to no pod writing an EdgeNode: {}",
            code(&unbound_write)
        ));
    }

    // Node Leases, the heartbeats, in the release namespace: its own, twice
    // (created, then renewed), and no other Lease there (the operator's
    // leader Lease above all).
    let ns = env.name();
    let lease_of =
        |node: &str| node_lease::renewed(node, k8s_openapi::jiff::Timestamp::now(), None, None);
    for attempt in ["creating", "renewing"] {
        let own_lease = agent_lease(&agent, ns, lease_of(&node_a)).await;
        assert!(
            own_lease.is_ok(),
            "the agent {attempt} its own node Lease: {}",
            code(&own_lease)
        );
    }
    let mut leader_lease = lease_of(&node_a);
    leader_lease.metadata.name = Some("edgewire-operator".into());
    for (what, client, lease) in [
        (
            "agent on A renewing B's node Lease",
            &agent,
            lease_of(&node_b),
        ),
        (
            "agent on A writing the operator's leader Lease",
            &agent,
            leader_lease,
        ),
        (
            "a token bound to no pod writing A's node Lease",
            &unbound,
            lease_of(&node_a),
        ),
    ] {
        let written = agent_lease(client, ns, lease).await;
        if !matches!(&written, Err(kube::Error::Api(e)) if e.code == 403) {
            holes.push(format!("{what}: {}", code(&written)));
        }
    }

    // Its own EdgeNode the agent may write, but an address that is not its
    // Node's never reaches an EndpointSlice.
    let operator = Operator::start(&env, "own-node-operator");
    let heartbeats = Heartbeats::start(env.client.clone(), env.name(), &nodes);
    env.apply_es(&format!(
        "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata:\n  name: web\nspec:\n  nodeSelector: {{{EDGE_LABEL}: \"true\"}}\n  port: 18080\n  handlers:\n    - {{name: echo, kind: echo, path: /}}\n"
    ))
    .await;
    env.wait_es("web", "ready on both nodes", |es| {
        es.status.as_ref().is_some_and(|s| s.ready_nodes == 2)
    })
    .await;
    let before = endpoint_addresses(&env, "web").await;
    if before != BTreeSet::from(["192.0.2.1".to_string(), "192.0.2.2".to_string()]) {
        holes.push(format!(
            "the endpoints are not the Nodes' own addresses 192.0.2.1 and 192.0.2.2: {before:?}"
        ));
    }
    let claim = agent_apply(
        &agent,
        &node_a,
        false,
        json!({"spec": {"address": ATTACKER}}),
    )
    .await;
    assert!(claim.is_ok(), "the agent's own EdgeNode: {}", code(&claim));

    let edge_nodes: Api<EdgeNode> = Api::all(env.client.clone());
    let events: Api<Event> = Api::all(env.client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut degraded = false;
    let mut evented = false;
    let mut leaked = false;
    // Watch the endpoints while the operator takes in the claim, and a while
    // after it has answered it.
    let mut settle = 10;
    while tokio::time::Instant::now() < deadline && settle > 0 {
        if endpoint_addresses(&env, "web").await.contains(ATTACKER) {
            leaked = true;
            break;
        }
        let en = edge_nodes.get(&node_a).await.unwrap();
        degraded =
            en.status.iter().flat_map(|s| &s.conditions).any(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "AddressNotOnNode"
            });
        evented = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("AddressNotOnNode")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node_a.as_str())
            });
        if degraded && evented {
            settle -= 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if leaked {
        holes.push(format!(
            "the claimed address {ATTACKER} reached the EndpointSlice: {:?}",
            endpoint_addresses(&env, "web").await
        ));
    }
    if !degraded {
        holes.push("EdgeNode A not marked Degraded (AddressNotOnNode)".into());
    }
    if !evented {
        holes.push("no AddressNotOnNode Event for EdgeNode A".into());
    }
    drop(heartbeats);
    env.cleanup_nodes(&nodes).await;
    assert!(
        holes.is_empty(),
        "an agent's token reaches beyond its node:\n{}\noperator log:\n{}",
        holes.join("\n"),
        operator
            .log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
