//! The committed CRDs, installed in a real kube-apiserver, refuse invalid
//! EdgeServices at admission with a message naming the field.

use std::io::Write;
use std::process::Stdio;

use edgewire_testenv::TestNamespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn committed_crds() -> Vec<CustomResourceDefinition> {
    edgewire_testenv::read_crds(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds"
    )))
    .expect("the committed CRDs")
}

/// `kubectl apply -f -` of `yaml`; returns (success, stderr).
fn kubectl_apply(
    plane: &edgewire_testenv::ControlPlane,
    namespace: &str,
    yaml: &str,
) -> (bool, String) {
    let mut child = plane
        .kubectl()
        .unwrap()
        .args(["apply", "-n", namespace, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = r#"
apiVersion: edgewire.dev/v1alpha1
kind: EdgeService
metadata:
  name: NAME
spec:
  nodeSelector: {edgewire.dev/edge: "true"}
  placement: {maxNodes: 2, spreadBy: topology.kubernetes.io/zone}
  port: 8765
  handlers:
    - {name: echo, kind: echo, path: /}
    - {name: add, kind: add, path: /add}
  channels: [{name: chat}]
"#;

#[tokio::test]
async fn invalid_edgeservices_are_refused_with_the_field_named() {
    let plane = edgewire_testenv::shared().await.unwrap();
    let client = plane.client().await.unwrap();
    edgewire_testenv::install_crds(&client, &committed_crds())
        .await
        .unwrap();
    let ns = TestNamespace::create(plane, "admission").await.unwrap();

    let (ok, stderr) = kubectl_apply(plane, &ns.name, &VALID.replace("NAME", "good"));
    assert!(ok, "a valid EdgeService is accepted: {stderr}");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/edgeservice.yaml"
    ))
    .unwrap();
    let (ok, stderr) = kubectl_apply(plane, &ns.name, &example);
    assert!(ok, "the README's example is accepted: {stderr}");
    let upstream = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/upstream.yaml"
    ))
    .unwrap();
    let (ok, stderr) = kubectl_apply(plane, &ns.name, &upstream);
    assert!(ok, "the upstream example is accepted: {stderr}");
    let linked = VALID.replace("NAME", "linked").replace(
        "[{name: chat}]",
        "[{name: chat, uplink: true, downlink: true}]\n  hub: {url: \"wss://hub/relay\", tokenSecret: {name: hub, key: token}, caSecret: {name: hub, key: ca.crt}}",
    );
    let (ok, stderr) = kubectl_apply(plane, &ns.name, &linked);
    assert!(ok, "a hub with its Secrets is accepted: {stderr}");

    let cases = [
        (
            "port-high",
            VALID.replace("port: 8765", "port: 70000"),
            "spec.port",
        ),
        (
            "port-zero",
            VALID.replace("port: 8765", "port: 0"),
            "spec.port",
        ),
        (
            "dup-name",
            VALID.replace(
                "{name: add, kind: add, path: /add}",
                "{name: echo, kind: add, path: /add}",
            ),
            "handler names must be unique",
        ),
        (
            "dup-path",
            VALID.replace("path: /add}", "path: /}"),
            "handler paths must be unique",
        ),
        (
            "bad-kind",
            VALID.replace("kind: add,", "kind: rot13,"),
            "spec.handlers[1].kind",
        ),
        (
            "no-slash",
            VALID.replace("path: /add}", "path: add}"),
            "spec.handlers[1].path",
        ),
        (
            "relay-clash",
            VALID.replace("path: /add}", "path: /relay}"),
            "may not be the relay path",
        ),
        (
            "dup-channel",
            VALID.replace("[{name: chat}]", "[{name: chat}, {name: chat}]"),
            "channel names must be unique",
        ),
        (
            "module-file",
            VALID.replace(
                "{name: add, kind: add, path: /add}",
                "{name: add, kind: wasm, path: /add, module: {file: /etc/shadow}}",
            ),
            "never from a file on the node",
        ),
        (
            "upstream-ca-file",
            VALID.replace(
                "{name: add, kind: add, path: /add}",
                "{name: add, kind: upstream, path: /add, upstream: {url: \"https://cloud/add\", caFile: /etc/shadow}}",
            ),
            "never read from a file on the node",
        ),
        (
            "hub-token-file",
            VALID.replace(
                "[{name: chat}]",
                "[{name: chat, uplink: true}]\n  hub: {url: \"wss://hub/relay\", tokenFile: /etc/shadow}",
            ),
            "never from files on the node",
        ),
        (
            "hub-ca-file",
            VALID.replace(
                "[{name: chat}]",
                "[{name: chat, uplink: true}]\n  hub: {url: \"wss://hub/relay\", caFile: /etc/shadow}",
            ),
            "never from files on the node",
        ),
        (
            "hub-credentials-file",
            VALID.replace(
                "[{name: chat}]",
                "[{name: chat, uplink: true}]\n  hub: {url: \"nats://hub:4222\", credentialsFile: /etc/shadow}",
            ),
            "never from files on the node",
        ),
        (
            "hub-unbridged",
            VALID.replace(
                "[{name: chat}]",
                "[{name: chat}]\n  hub: {url: \"wss://hub/relay\", tokenSecret: {name: hub, key: token}}",
            ),
            "a hub needs a channel marked uplink or downlink",
        ),
        (
            "uplink-no-hub",
            VALID.replace("[{name: chat}]", "[{name: chat, downlink: true}]"),
            "uplink and downlink need the service's hub",
        ),
        (
            "upstream-query",
            VALID.replace(
                "{name: add, kind: add, path: /add}",
                "{name: add, kind: upstream, path: /add, upstream: {url: \"http://cloud/add?a=1\"}}",
            ),
            "spec.handlers[1].upstream.url",
        ),
        (
            "max-zero",
            VALID.replace("maxNodes: 2", "maxNodes: 0"),
            "spec.placement.maxNodes",
        ),
    ];
    for (name, yaml, needle) in cases {
        let (ok, stderr) = kubectl_apply(plane, &ns.name, &yaml.replace("NAME", name));
        assert!(!ok, "{name} was accepted");
        assert!(
            stderr.contains(needle),
            "{name}: wanted {needle:?} in:\n{stderr}"
        );
    }
}
