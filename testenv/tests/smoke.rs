//! The test control plane works as a cluster: the controller manager creates
//! pods, the scheduler places them on kwok nodes, kwok runs them, garbage
//! collection removes what a deleted owner leaves; and stopping it, or a test
//! process that panics, leaves no process, port or directory behind.

use std::collections::BTreeMap;
use std::time::Duration;

use edgewire_testenv::{ControlPlane, NodeSpec, Options, TestNamespace};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

const WAIT: Duration = Duration::from_secs(90);

/// Polls `check` every 200 ms until it returns Some, at most `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    node_selector: Some(BTreeMap::from([(
                        "edgewire.dev/smoke".into(),
                        "yes".into(),
                    )])),
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some("registry.invalid/never-pulled:1".into()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[tokio::test]
async fn a_dedicated_control_plane_runs_a_deployment_and_stops_clean() {
    let plane = ControlPlane::start(Options {
        kwok: true,
        ..Options::default()
    })
    .await
    .expect("control plane starts");
    let client = plane.client().await.unwrap();

    let nodes = [
        NodeSpec::new("smoke-a").label("edgewire.dev/smoke", "yes"),
        NodeSpec::new("smoke-b").label("edgewire.dev/smoke", "yes"),
        NodeSpec::new("smoke-other"),
    ];
    edgewire_testenv::add_nodes(&client, &nodes).await.unwrap();
    let node_api: Api<Node> = Api::all(client.clone());
    eventually("three kwok nodes Ready", || async {
        let list = node_api.list(&ListParams::default()).await.ok()?;
        (list
            .items
            .iter()
            .filter(|n| edgewire_testenv::nodes::is_ready(n))
            .count()
            == 3)
            .then_some(())
    })
    .await;

    let ns = TestNamespace::create(&plane, "smoke").await.unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("settings".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("greeting".into(), "hello".into())])),
        ..ConfigMap::default()
    };
    configmaps
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let read = configmaps.get("settings").await.unwrap();
    assert_eq!(read.data.unwrap()["greeting"], "hello");

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments
        .create(&PostParams::default(), &deployment("web", 3))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let running = eventually("3 pods Running on the labelled kwok nodes", || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        (running.len() == 3).then_some(running)
    })
    .await;
    for pod in &running {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("");
        assert!(
            node == "smoke-a" || node == "smoke-b",
            "scheduled onto {node:?}"
        );
    }

    deployments
        .delete("web", &DeleteParams::background())
        .await
        .unwrap();
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    eventually("the ReplicaSet and pods garbage-collected", || async {
        let rs = replicasets.list(&ListParams::default()).await.ok()?;
        let p = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (rs.items.is_empty() && p.items.is_empty()).then_some(())
    })
    .await;
    drop(ns);

    let pids = plane.pids();
    let ports = plane.ports.all();
    let dir = plane.dir.clone();
    assert_eq!(
        pids.len(),
        5,
        "etcd, apiserver, controller manager, scheduler, kwok"
    );
    plane.stop().expect("stops");
    for pid in pids {
        assert!(
            !edgewire_testenv::is_alive(pid),
            "process {pid} survived stop"
        );
    }
    for port in ports {
        assert!(
            !edgewire_testenv::listening(port),
            "port {port} still listening"
        );
    }
    assert!(!dir.exists(), "{} survived stop", dir.display());
}

#[tokio::test]
async fn the_shared_control_plane_gives_each_test_a_namespace() {
    let plane = edgewire_testenv::shared()
        .await
        .expect("shared control plane");
    let a = TestNamespace::create(plane, "iso").await.unwrap();
    let b = TestNamespace::create(plane, "iso").await.unwrap();
    assert_ne!(a.name, b.name);
    let cms: Api<ConfigMap> = Api::namespaced(a.client.clone(), &a.name);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("only-in-a".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let in_b: Api<ConfigMap> = Api::namespaced(b.client.clone(), &b.name);
    assert!(in_b.get_opt("only-in-a").await.unwrap().is_none());

    let name = a.name.clone();
    drop(a);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(b.client.clone());
    eventually("the dropped namespace to be deleted", || async {
        match namespaces.get_opt(&name).await.ok()? {
            None => Some(()),
            Some(ns) => ns.metadata.deletion_timestamp.map(|_| ()),
        }
    })
    .await;
}

/// Run only as a child of the test below: starts the shared control plane,
/// records what it started, and panics.
#[tokio::test]
#[ignore = "run by panicking_test_leaves_nothing_behind"]
async fn child_panics_with_a_running_control_plane() {
    let Ok(record) = std::env::var("EDGEWIRE_TESTENV_RECORD") else {
        return;
    };
    let plane = edgewire_testenv::shared().await.unwrap();
    let ports: Vec<String> = plane.ports.all().iter().map(u16::to_string).collect();
    let pids: Vec<String> = plane.pids().iter().map(i32::to_string).collect();
    std::fs::write(
        record,
        format!(
            "{}\n{}\n{}\n",
            plane.dir.display(),
            pids.join(" "),
            ports.join(" ")
        ),
    )
    .unwrap();
    panic!("deliberate panic with the control plane running");
}

#[test]
fn panicking_test_leaves_nothing_behind() {
    let record = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_panics_with_a_running_control_plane",
        ])
        .env("EDGEWIRE_TESTENV_RECORD", record.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child test was meant to panic");
    let text = std::fs::read_to_string(record.path()).unwrap();
    let mut lines = text.lines();
    let dir = std::path::PathBuf::from(lines.next().expect("child recorded its dir"));
    let pids: Vec<i32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    let ports: Vec<u16> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 5);
    // The kernel delivers the parent-death signal as the child exits; allow
    // a moment for the processes to be reaped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| edgewire_testenv::is_alive(p))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids {
        assert!(
            !edgewire_testenv::is_alive(pid),
            "process {pid} outlived the panicking test"
        );
    }
    for port in ports {
        assert!(
            !edgewire_testenv::listening(port),
            "port {port} outlived the panicking test"
        );
    }
    assert!(
        !dir.exists(),
        "{} outlived the panicking test",
        dir.display()
    );
}

/// Something else on the machine may take a port between `free_port()` and
/// the component binding it. Every component is offered a port that is
/// already taken: each must be started again elsewhere, and the control
/// plane must work.
#[tokio::test]
async fn a_control_plane_offered_taken_ports_starts_on_others() {
    let taken: Vec<std::net::TcpListener> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy"))
        .collect();
    let occupied: Vec<u16> = taken
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect();
    let first = edgewire_testenv::Ports {
        etcd_client: occupied[0],
        etcd_peer: occupied[1],
        apiserver: occupied[2],
        controller_manager: occupied[3],
        scheduler: occupied[4],
        kwok: Some(occupied[5]),
    };
    let plane = ControlPlane::start(Options {
        kwok: true,
        first_ports: Some(first),
        ..Options::default()
    })
    .await
    .expect("the control plane starts on other ports");
    for port in plane.ports.all() {
        assert!(
            !occupied.contains(&port),
            "a component kept the taken port {port}: {:?}",
            plane.ports
        );
    }
    let client = plane.client().await.expect("client");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    namespaces
        .list(&ListParams::default())
        .await
        .expect("the API server answers");
    plane.stop().expect("stops");
    drop(taken);
}
