//! The Helm chart: lint, its CRDs in sync with `crds/`, and `helm template`
//! output for each combination of values that matters.

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

fn chart() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/edgewire"))
}

fn helm() -> Command {
    let mut helm =
        Command::new(edgewire_testenv::binary("helm").expect("helm from testenv/build.sh"));
    let home = std::env::temp_dir().join("edgewire-chart-test-helm");
    helm.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    helm
}

/// `helm template` with `--set` values; the rendered objects.
fn render(sets: &[&str]) -> Vec<Value> {
    let mut cmd = helm();
    cmd.args([
        "template",
        "ew",
        chart().to_str().unwrap(),
        "--namespace",
        "edgewire-system",
    ]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| {
            let v = Value::deserialize(doc).ok()?;
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or("").to_string())
        .collect();
    k.sort();
    k
}

#[test]
fn lint_is_clean() {
    let out = helm()
        .args(["lint", "--strict", chart().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("[WARNING]") && !text.contains("[ERROR]"),
        "{text}"
    );
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let top = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds"));
    let mut names: Vec<_> = std::fs::read_dir(&top)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut in_chart: Vec<_> = std::fs::read_dir(chart().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    in_chart.sort();
    assert_eq!(names, in_chart);
    for name in names {
        assert_eq!(
            std::fs::read(top.join(&name)).unwrap(),
            std::fs::read(chart().join("crds").join(&name)).unwrap(),
            "charts/edgewire/crds/{name:?} differs from crds/; copy it over"
        );
    }
}

#[test]
fn defaults_render_a_restricted_operator_and_a_host_network_agent() {
    let objects = render(&[]);
    let operator = find(&objects, "Deployment", "ew-operator").expect("operator Deployment");
    assert_eq!(operator["spec"]["replicas"], 2);
    let args = &operator["spec"]["template"]["spec"]["containers"][0]["args"];
    for arg in [
        "--lease-duration=15",
        "--renew-deadline=10",
        "--retry-period=2",
    ] {
        assert!(
            args.as_array().unwrap().iter().any(|a| a == arg),
            "{arg}: {args:?}"
        );
    }
    let pod = &operator["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"].is_object());
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"run") && args.contains(&"--lease-name=ew-operator"),
        "{args:?}"
    );
    assert_eq!(
        operator["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );

    let agent = find(&objects, "DaemonSet", "ew-agent").expect("agent DaemonSet");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["nodeSelector"]["edgewire.dev/edge"], "true");
    assert!(pod["tolerations"].as_array().is_some_and(|t| !t.is_empty()));
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let node_name = env.iter().find(|e| e["name"] == "NODE_NAME").unwrap();
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["hostPath"]["path"] == "/var/lib/edgewire")
    );
    assert!(
        pod["containers"][0]["securityContext"]["capabilities"]["add"].is_null(),
        "no capability beyond none by default: EdgeServices may not use ports below 1024"
    );
    // The mesh runs on keys each agent makes in its state directory: no
    // secret generated by the chart, so `helm template` renders the same
    // objects every time (what GitOps tools rely on).
    assert!(
        !kinds(&objects).contains(&"Secret".to_string()),
        "no Secret by default"
    );
    assert!(
        !volumes.iter().any(|v| v["secret"].is_object()),
        "{volumes:?}"
    );
    let agent_args = crate::args(&pod["containers"][0]);
    assert!(
        !agent_args
            .iter()
            .any(|a| a.starts_with("--mesh-secret-file")),
        "{agent_args:?}"
    );
    assert_eq!(
        serde_json::to_string(&render(&[])).unwrap(),
        serde_json::to_string(&objects).unwrap(),
        "helm template is deterministic"
    );

    // Nothing for the Prometheus Operator unless asked.
    let k = kinds(&objects);
    for absent in [
        "PodMonitor",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(
            !k.contains(&absent.to_string()),
            "{absent} rendered by default: {k:?}"
        );
    }
}

#[test]
fn rbac_is_least_privilege() {
    let objects = render(&[]);
    let rules = |name: &str| -> Vec<(String, String, Vec<String>)> {
        let role =
            find(&objects, "ClusterRole", name).unwrap_or_else(|| panic!("ClusterRole {name}"));
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let verbs: Vec<String> = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                let groups = r["apiGroups"].as_array().unwrap().clone();
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(move |res| {
                        let verbs = verbs.clone();
                        groups.clone().into_iter().map(move |g| {
                            (
                                g.as_str().unwrap().to_string(),
                                res.as_str().unwrap().to_string(),
                                verbs.clone(),
                            )
                        })
                    })
            })
            .collect()
    };
    let agent = rules("ew-agent");
    let can = |rules: &[(String, String, Vec<String>)], resource: &str, verb: &str| {
        rules.iter().any(|(_, r, v)| {
            r == resource && (v.iter().any(|x| x == verb) || v.iter().any(|x| x == "*"))
        })
    };
    assert!(can(&agent, "edgeservices", "watch"));
    assert!(can(&agent, "placementslices", "watch"));
    assert!(
        !can(&agent, "placementslices", "patch"),
        "the placement is the operator's to write"
    );
    assert!(
        !can(&agent, "edgeservices", "patch"),
        "agents only read EdgeServices"
    );
    assert!(!can(&agent, "edgeservices/status", "patch"));
    assert!(can(&agent, "edgenodes/status", "patch"));
    assert!(
        !can(&agent, "secrets", "get"),
        "no cluster-wide Secret access: the mesh secret is mounted, and the \
         Secrets EdgeServices name are granted per namespace by name"
    );
    let operator = rules("ew-operator");
    assert!(can(&operator, "endpointslices", "delete"));
    assert!(can(&operator, "edgeservices/status", "patch"));
    assert!(can(&operator, "placementslices", "patch"));
    assert!(can(&operator, "placementslices", "delete"));
    assert!(!can(&operator, "edgeservices", "delete"));
    // The operator checks the Secrets EdgeServices name, and can grant the
    // agents only what it holds; it never lists or watches them.
    assert!(can(&operator, "secrets", "get"));
    for verb in ["list", "watch", "create", "patch", "update", "delete"] {
        assert!(
            !can(&operator, "secrets", verb),
            "operator may {verb} secrets"
        );
    }
    assert!(can(&operator, "roles", "patch") && can(&operator, "rolebindings", "delete"));
    for verb in ["escalate", "bind"] {
        assert!(!can(&operator, "roles", verb), "operator may {verb} roles");
        assert!(
            !can(&operator, "clusterroles", verb),
            "operator may {verb} clusterroles"
        );
    }
    assert!(
        agent
            .iter()
            .chain(&operator)
            .all(|(_, _, v)| !v.iter().any(|x| x == "*")),
        "no wildcards"
    );
    let lease =
        find(&objects, "Role", "ew-operator-leader-election").expect("namespaced lease role");
    assert_eq!(lease["metadata"]["namespace"], "edgewire-system");
}

#[test]
fn monitoring_objects_when_enabled() {
    let objects = render(&[
        "metrics.podMonitor.enabled=true",
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.grafanaDashboard.enabled=true",
        "metrics.annotations=false",
    ]);
    let pm = find(&objects, "PodMonitor", "ew-agent").expect("PodMonitor");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    assert_eq!(
        pm["spec"]["selector"]["matchExpressions"][0],
        serde_json::json!({"key": "app.kubernetes.io/component", "operator": "In", "values": ["agent", "hub"]}),
        "the hub's pods are scraped too"
    );
    let sm = find(&objects, "ServiceMonitor", "ew-operator").expect("ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let rule = find(&objects, "PrometheusRule", "ew-alerts").expect("PrometheusRule");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(
        alerts.contains(&"EdgewireEdgeServiceNotReady"),
        "{alerts:?}"
    );
    let dashboard = find(&objects, "ConfigMap", "ew-dashboard").expect("dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(dashboard["data"]["edgewire.json"].as_str().unwrap())
        .expect("dashboard JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 6));
    let exprs: Vec<&str> = json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for metric in [
        "edgewire_handler_duration_seconds_sum",
        "edgewire_upstream_duration_seconds_bucket",
        "edgewire_upstream_bytes_total",
        "edgewire_uplink_sent_bytes_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "the edge-and-cloud row shows {metric}"
        );
    }
    assert!(
        alerts.contains(&"EdgewireUpstreamBreakerOpen"),
        "{alerts:?}"
    );
    let agent = find(&objects, "DaemonSet", "ew-agent").unwrap();
    assert!(
        agent["spec"]["template"]["metadata"]["annotations"].is_null(),
        "annotations off"
    );
}

#[test]
fn an_existing_mesh_secret_is_used_as_a_pre_shared_key() {
    let objects = render(&["mesh.existingSecret=my-mesh"]);
    assert!(!kinds(&objects).contains(&"Secret".to_string()));
    let agent = find(&objects, "DaemonSet", "ew-agent").unwrap();
    let volumes = agent["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "my-mesh")
    );
    let agent_args = args(&agent["spec"]["template"]["spec"]["containers"][0]);
    assert!(
        agent_args.contains(&"--mesh-secret-file=/etc/edgewire/mesh/secret".to_string()),
        "{agent_args:?}"
    );
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    for (set, needle) in [
        ("agent.meshPort=70000", "meshPort"),
        ("operator.replicaz=1", "replicaz"),
        ("agent.stateDir=relative", "stateDir"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.leaseDuration=6", "renewDeadline < leaseDuration"),
        ("hub.enabled=true", "keySecret"),
        ("hub.persistence.size=lots", "size"),
    ] {
        let out = helm()
            .args(["template", "ew", chart().to_str().unwrap(), "--set", set])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{set}: {err}");
    }
}

#[test]
fn an_optional_hub_is_an_agent_deployment_with_a_service_and_its_config() {
    let objects = render(&[]);
    assert!(
        !objects
            .iter()
            .any(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] == "hub"),
        "no hub unless enabled"
    );

    let objects = render(&[
        "hub.enabled=true",
        "hub.port=9000",
        "hub.auth.keySecret.name=hub-jwt",
        "hub.auth.keySecret.key=hs256",
        "hub.auth.anonymous.subscribe={telemetry}",
        "hub.channels={telemetry,commands,chat}",
        "hub.service.type=LoadBalancer",
    ]);
    let config_map = find(&objects, "ConfigMap", "ew-hub").expect("the hub's ConfigMap");
    let text = config_map["data"]["config.yaml"].as_str().unwrap();
    let config = edgewire_api::AgentConfig::parse(text)
        .unwrap_or_else(|e| panic!("the hub's config is not an agent config: {e}\n{text}"));
    let service = &config.services[0];
    assert_eq!(service.port, 9000);
    let channels: Vec<&str> = service.channels.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(channels, ["telemetry", "commands", "chat"]);
    assert_eq!(service.limits.send_queue_messages, 65536);
    let auth = service.auth.as_ref().expect("edges need a token");
    assert_eq!(auth.algorithm, edgewire_api::TokenAlgorithm::HS256);
    assert_eq!(auth.anonymous.as_ref().unwrap().subscribe, ["telemetry"]);
    assert!(service.hub.is_none(), "the hub links to no hub of its own");

    let deployment = find(&objects, "Deployment", "ew-hub").expect("the hub's Deployment");
    let pod = &deployment["spec"]["template"];
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_ne!(pod["spec"]["hostNetwork"], true);
    let container = &pod["spec"]["containers"][0];
    assert!(
        container["image"]
            .as_str()
            .unwrap()
            .starts_with("edgewire/edgewire-agent:")
    );
    let hub_args = args(container);
    assert!(
        hub_args.contains(&"--config=/etc/edgewire/hub/config.yaml".to_string()),
        "{hub_args:?}"
    );
    assert!(!hub_args.contains(&"--cluster".to_string()), "{hub_args:?}");
    assert_eq!(container["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let mount_of = |volume: &str| {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no mount of {volume}"))
            .to_string()
    };
    assert_eq!(
        auth.key_file.as_deref(),
        Some(format!("{}/hs256", mount_of("key")).as_str()),
        "the config reads the key where the Secret is mounted"
    );
    assert_eq!(mount_of("config"), "/etc/edgewire/hub");
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap();
    assert_eq!(volume("key")["secret"]["secretName"], "hub-jwt");
    assert_eq!(volume("key")["secret"]["items"][0]["key"], "hs256");
    assert_eq!(volume("config")["configMap"]["name"], "ew-hub");
    assert!(
        volume("state")["emptyDir"].is_object(),
        "the table in an emptyDir by default"
    );
    assert!(
        !kinds(&objects).contains(&"PersistentVolumeClaim".to_string()),
        "no claim unless asked for"
    );
    assert_eq!(pod["spec"]["securityContext"]["fsGroup"], 65532);

    let svc = find(&objects, "Service", "ew-hub").expect("the hub's Service");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9000);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "relay");
    let labels = &pod["metadata"]["labels"];
    for (key, value) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the Service selects the hub's pods");
    }
    assert_eq!(
        container["ports"][0],
        serde_json::json!({"name": "relay", "containerPort": 9000})
    );
}

#[test]
fn the_hubs_table_of_delivered_sequences_can_live_on_a_claim() {
    let hub = [
        "hub.enabled=true",
        "hub.auth.keySecret.name=hub-jwt",
        "hub.auth.keySecret.key=hs256",
        "hub.persistence.enabled=true",
    ];
    let state_volume = |objects: &[Value]| {
        let deployment = find(objects, "Deployment", "ew-hub").expect("the hub's Deployment");
        let spec = &deployment["spec"]["template"]["spec"];
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "state")
            .expect("the state volume")
            .clone();
        let mounted = spec["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "state")
            .and_then(|m| m["mountPath"].as_str())
            .map(str::to_string);
        let state_dir = args(&spec["containers"][0])
            .iter()
            .find_map(|a| a.strip_prefix("--state-dir=").map(str::to_string));
        assert_eq!(mounted, state_dir, "the state directory is the volume");
        volume
    };

    let objects = render(
        &[
            &hub[..],
            &[
                "hub.persistence.storageClassName=fast",
                "hub.persistence.size=5Gi",
            ],
        ]
        .concat(),
    );
    let claim = find(&objects, "PersistentVolumeClaim", "ew-hub-state").expect("the chart's claim");
    assert_eq!(
        claim["spec"]["accessModes"],
        serde_json::json!(["ReadWriteOnce"])
    );
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(
        state_volume(&objects)["persistentVolumeClaim"]["claimName"],
        "ew-hub-state"
    );
    let deployment = find(&objects, "Deployment", "ew-hub").unwrap();
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "Recreate",
        "never two pods wanting the claim"
    );

    let objects = render(&[&hub[..], &["hub.persistence.existingClaim=hub-table"]].concat());
    assert!(
        !kinds(&objects).contains(&"PersistentVolumeClaim".to_string()),
        "an existing claim is used, not made"
    );
    assert_eq!(
        state_volume(&objects)["persistentVolumeClaim"]["claimName"],
        "hub-table"
    );
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

#[test]
fn each_agent_is_confined_to_its_own_edgenode_at_admission() {
    let objects = render(&[]);
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "ew-agent-own-edgenode",
    )
    .expect("the EdgeNode policy");
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    let rule = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(
        rule["resources"],
        serde_json::json!(["edgenodes", "edgenodes/status"])
    );
    let matched = policy["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert!(
        matched.contains("system:serviceaccount:edgewire-system:ew-agent"),
        "{matched}"
    );
    assert!(
        policy["spec"]["validations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["reason"] == "Forbidden")
    );
    let binding = find(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "ew-agent-own-edgenode",
    )
    .expect("its binding");
    assert_eq!(binding["spec"]["validationActions"][0], "Deny");
}

#[test]
fn host_ports_are_limited_at_admission_and_by_the_operator() {
    let objects = render(&[]);
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "ew-edgeservice-host-ports",
    )
    .expect("the host-port policy");
    let text = policy.to_string();
    assert!(text.contains("variables.port >= 1024"), "{text}");
    assert!(text.contains("variables.port <= 65535"), "{text}");
    assert!(
        find(
            &objects,
            "ValidatingAdmissionPolicyBinding",
            "ew-edgeservice-host-ports"
        )
        .is_some()
    );
    let operator = find(&objects, "Deployment", "ew-operator").unwrap();
    let a = args(&operator["spec"]["template"]["spec"]["containers"][0]);
    assert!(a.contains(&"--host-ports=1024-65535".to_string()), "{a:?}");
    assert!(
        !a.iter()
            .any(|x| x.starts_with("--privileged-port-namespaces")),
        "{a:?}"
    );

    // Privileged ports for listed namespaces: the agent gets the capability.
    let objects = render(&["hostPorts.privilegedNamespaces={ingress,edge}"]);
    let operator = find(&objects, "Deployment", "ew-operator").unwrap();
    let a = args(&operator["spec"]["template"]["spec"]["containers"][0]);
    assert!(
        a.contains(&"--privileged-port-namespaces=ingress,edge".to_string()),
        "{a:?}"
    );
    let agent = find(&objects, "DaemonSet", "ew-agent").unwrap();
    assert_eq!(
        agent["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            [0],
        "NET_BIND_SERVICE"
    );
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "ew-edgeservice-host-ports",
    )
    .unwrap();
    assert!(
        policy.to_string().contains(r#"[\"ingress\",\"edge\"]"#),
        "{policy}"
    );
    let objects = render(&["hostPorts.min=80"]);
    let agent = find(&objects, "DaemonSet", "ew-agent").unwrap();
    assert_eq!(
        agent["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            [0],
        "NET_BIND_SERVICE"
    );
}

#[test]
fn admin_endpoints_listen_on_the_pods_address_by_default() {
    let objects = render(&[]);
    let agent = find(&objects, "DaemonSet", "ew-agent").unwrap();
    let a = args(&agent["spec"]["template"]["spec"]["containers"][0]);
    assert!(
        a.contains(&"--admin-address=$(NODE_IP):9180".to_string()),
        "{a:?}"
    );
    let operator = find(&objects, "Deployment", "ew-operator").unwrap();
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    let a = args(container);
    assert!(
        a.contains(&"--metrics-address=$(POD_IP):9181".to_string()),
        "{a:?}"
    );
    let env = container["env"].as_array().unwrap();
    assert!(env.iter().any(
        |e| e["name"] == "POD_IP" && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ));

    let objects = render(&[
        "agent.adminAddress=0.0.0.0",
        "operator.metricsAddress=0.0.0.0",
    ]);
    let agent = find(&objects, "DaemonSet", "ew-agent").unwrap();
    assert!(
        args(&agent["spec"]["template"]["spec"]["containers"][0])
            .contains(&"--admin-address=0.0.0.0:9180".to_string())
    );
    let operator = find(&objects, "Deployment", "ew-operator").unwrap();
    assert!(
        args(&operator["spec"]["template"]["spec"]["containers"][0])
            .contains(&"--metrics-address=0.0.0.0:9181".to_string())
    );
}
