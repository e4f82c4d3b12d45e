//! The agent's config in a cluster, as a pure function of the EdgeServices
//! and their PlacementSlices: every EdgeService whose slices name this node
//! becomes a service named `namespace/name`, with the other placed nodes as
//! its mesh peers, each with the mesh public key the operator carried over
//! from its EdgeNode.

use std::collections::BTreeMap;
use std::path::Path;

use edgewire_api::auth::{SecretKeyRef, check_secret_key, check_secret_name};
use edgewire_api::crd::{
    EdgeService, NodePlacement, PlacementSlice, TLS_CERT_KEY, TLS_PRIVATE_KEY,
};
use edgewire_api::{AgentConfig, AuthSpec, HandlerSpec, HubSpec, PeerSpec, ServiceConfig, TlsSpec};

use super::secrets;

/// What to run, and the EdgeServices that could not be run here (with why).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    pub config: AgentConfig,
    pub rejected: Vec<(String, String)>,
}

/// The service name an EdgeService runs under: `namespace/name`.
pub fn key(es: &EdgeService) -> String {
    format!(
        "{}/{}",
        es.metadata.namespace.as_deref().unwrap_or_default(),
        es.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The parts of a service that name Secrets, as the agent config has them:
/// each Secret becomes the file `secrets` stores it in under `state_dir`.
struct FromSecrets {
    tls: Option<TlsSpec>,
    auth: Option<AuthSpec>,
    hub: Option<HubSpec>,
    handlers: Vec<HandlerSpec>,
}

/// The service's `tls`, `auth`, `hub` and handlers with their Secrets
/// replaced by the stored files. A key file on the node is not the
/// EdgeService's to name.
fn from_secrets(es: &EdgeService, state_dir: &Path) -> Result<FromSecrets, String> {
    for (name, key) in secrets::wanted(es) {
        check_secret_name(&name).and_then(|()| check_secret_key(&key))?;
    }
    let namespace = es.metadata.namespace.as_deref().unwrap_or_default();
    let stored = |name: &str, key: &str| {
        secrets::file(state_dir, namespace, name, key)
            .display()
            .to_string()
    };
    let stored_ref = |secret: &SecretKeyRef| stored(&secret.name, &secret.key);
    let tls = es.spec.tls.as_ref().map(|tls| TlsSpec {
        cert_file: stored(&tls.secret_name, TLS_CERT_KEY),
        key_file: stored(&tls.secret_name, TLS_PRIVATE_KEY),
    });
    let auth = match &es.spec.auth {
        None => None,
        Some(auth) if auth.key_file.is_some() => {
            return Err(
                "spec.auth.keyFile: an EdgeService takes its key from keySecret, never from a file on the node"
                    .into(),
            );
        }
        Some(auth) => {
            let mut auth = auth.clone();
            if let Some(secret) = auth.key_secret.take() {
                auth.key_file = Some(stored_ref(&secret));
            }
            Some(auth)
        }
    };
    let hub = es.spec.hub.clone().map(|mut hub| {
        if let Some(secret) = hub.token_secret.take() {
            hub.token_file = Some(stored_ref(&secret));
        }
        if let Some(secret) = hub.ca_secret.take() {
            hub.ca_file = Some(stored_ref(&secret));
        }
        if let Some(secret) = hub.credentials_secret.take() {
            hub.credentials_file = Some(stored_ref(&secret));
        }
        hub
    });
    let mut handlers = es.spec.handlers.clone();
    for upstream in handlers.iter_mut().filter_map(|h| h.upstream.as_mut()) {
        if let Some(secret) = upstream.ca_secret.take() {
            upstream.ca_file = Some(stored_ref(&secret));
        }
    }
    Ok(FromSecrets {
        tls,
        auth,
        hub,
        handlers,
    })
}

/// Fields naming a file on the node: the standalone agent's alone. From an
/// EdgeService they would have a root agent read a host path its author
/// chose (admission refuses them too; this holds for objects written before
/// that rule).
fn node_files(es: &EdgeService) -> Vec<edgewire_api::FieldError> {
    let mut errors = Vec::new();
    if let Some(hub) = &es.spec.hub {
        for (field, file) in [
            ("tokenFile", &hub.token_file),
            ("caFile", &hub.ca_file),
            ("credentialsFile", &hub.credentials_file),
        ] {
            if file.is_some() {
                errors.push(edgewire_api::FieldError::new(
                    format!("spec.hub.{field}"),
                    "an EdgeService takes the hub's token, CA and credentials from Secrets, never from a file on the node",
                ));
            }
        }
    }
    for (i, h) in es.spec.handlers.iter().enumerate() {
        if h.module.as_ref().is_some_and(|m| m.file.is_some()) {
            errors.push(edgewire_api::FieldError::new(
                format!("spec.handlers[{i}].module.file"),
                "an EdgeService takes a module from configMap or image, never from a file on the node",
            ));
        }
        if h.upstream.as_ref().is_some_and(|u| u.ca_file.is_some()) {
            errors.push(edgewire_api::FieldError::new(
                format!("spec.handlers[{i}].upstream.caFile"),
                "an EdgeService never has the agent read a CA from a file on the node",
            ));
        }
    }
    errors
}

/// Each EdgeService's placed nodes (`namespace/name` to its nodes), from
/// the slices its current object owns (a slice left by a deleted service of
/// the same name is not its placement).
pub fn placements<'a>(
    services: &[EdgeService],
    slices: &'a [PlacementSlice],
) -> BTreeMap<String, Vec<&'a NodePlacement>> {
    let uids: BTreeMap<String, Option<&str>> = services
        .iter()
        .map(|es| (key(es), es.metadata.uid.as_deref()))
        .collect();
    let mut by_service: BTreeMap<String, Vec<&NodePlacement>> = BTreeMap::new();
    for slice in slices {
        let service = format!(
            "{}/{}",
            slice.metadata.namespace.as_deref().unwrap_or_default(),
            slice.spec.service
        );
        let Some(uid) = uids.get(&service) else {
            continue;
        };
        let owned = uid.is_none_or(|uid| {
            slice
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        });
        if owned {
            by_service
                .entry(service)
                .or_default()
                .extend(slice.spec.nodes.iter());
        }
    }
    by_service
}

/// `mesh_port` is None when this agent runs no mesh: its services then
/// serve their local clients only, with no peers to dial. Secrets named by
/// an EdgeService are taken from their files under `state_dir`.
pub fn render(
    node: &str,
    services: &[EdgeService],
    slices: &[PlacementSlice],
    mesh_port: Option<u16>,
    state_dir: &Path,
) -> Rendered {
    let placements = placements(services, slices);
    let nodes_of = |es: &EdgeService| placements.get(&key(es)).map_or(&[][..], Vec::as_slice);
    let mut placed: Vec<&EdgeService> = services
        .iter()
        .filter(|es| es.metadata.deletion_timestamp.is_none())
        .filter(|es| nodes_of(es).iter().any(|p| p.node == node))
        .collect();
    // Oldest first, so that if two ever claim one port here, the older wins
    // (the operator's rule too).
    placed.sort_by_key(|es| (es.metadata.creation_timestamp.clone().map(|t| t.0), key(es)));

    let mut rendered = Rendered::default();
    for es in placed {
        let name = key(es);
        let Ok(port) = u16::try_from(es.spec.port) else {
            rendered
                .rejected
                .push((name, format!("port {} is out of range", es.spec.port)));
            continue;
        };
        let secured = match from_secrets(es, state_dir) {
            Ok(secured) => secured,
            Err(why) => {
                rendered.rejected.push((name, why));
                continue;
            }
        };
        let peers = nodes_of(es)
            .iter()
            .filter(|p| p.node != node)
            .filter_map(|p| {
                let mesh_port = mesh_port?;
                let address = p.address.as_deref()?;
                // A node that has not published a valid key yet cannot be
                // authenticated: it joins the mesh once it has.
                let public_key = p
                    .mesh_public_key
                    .clone()
                    .filter(|k| edgewire_api::config::is_mesh_public_key(k))?;
                let host = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address.to_string()
                };
                Some(PeerSpec {
                    node: p.node.clone(),
                    address: format!("{host}:{mesh_port}"),
                    public_key: Some(public_key),
                })
            })
            .collect();
        let service = ServiceConfig {
            name: name.clone(),
            port,
            handlers: secured.handlers,
            channels: es.spec.channels.clone(),
            relay_path: es.spec.relay_path.clone(),
            limits: es.spec.limits.clone(),
            peers,
            auth: secured.auth,
            tls: secured.tls,
            hub: secured.hub,
        };
        let mut errors = node_files(es);
        service.validate_into("spec", &mut errors);
        if let Some(taken) = rendered.config.services.iter().find(|s| s.port == port) {
            errors.push(edgewire_api::FieldError::new(
                "spec.port",
                format!("port {port} is already used here by {}", taken.name),
            ));
        }
        if errors.is_empty() {
            rendered.config.services.push(service);
        } else {
            let why = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            rendered.rejected.push((name, why));
        }
    }
    rendered
}

#[cfg(test)]
mod tests {
    use edgewire_api::ChannelSpec;
    use edgewire_api::crd::{
        EdgeServiceSpec, EdgeServiceStatus, NodePlacement, PlacementSliceSpec, PlacementState,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn key_of(node: &str) -> String {
        format!("{:0>64}", hex_of(node))
    }

    fn hex_of(text: &str) -> String {
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    fn es(name: &str, port: i32, nodes: &[(&str, Option<&str>)], created: i64) -> EdgeService {
        let mut es = EdgeService::new(
            name,
            EdgeServiceSpec {
                node_selector: Default::default(),
                placement: Default::default(),
                port,
                handlers: vec![],
                channels: vec![],
                relay_path: "/relay".into(),
                limits: Default::default(),
                expose: Default::default(),
                auth: None,
                tls: None,
                hub: None,
            },
        );
        es.metadata.namespace = Some("edge".into());
        es.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        es.status = Some(EdgeServiceStatus {
            placement: nodes
                .iter()
                .map(|(n, a)| NodePlacement {
                    node: n.to_string(),
                    address: a.map(str::to_string),
                    state: PlacementState::Ready,
                    message: None,
                    mesh_public_key: Some(key_of(n)),
                })
                .collect(),
            ..EdgeServiceStatus::default()
        });
        es
    }

    /// One slice per service, holding the placement its status lists.
    fn slices_of(services: &[EdgeService]) -> Vec<PlacementSlice> {
        services
            .iter()
            .map(|es| {
                let mut slice = PlacementSlice::new(
                    &format!("{}-0", es.metadata.name.as_deref().unwrap()),
                    PlacementSliceSpec {
                        service: es.metadata.name.clone().unwrap(),
                        nodes: es.status.as_ref().unwrap().placement.clone(),
                    },
                );
                slice.metadata.namespace = es.metadata.namespace.clone();
                slice
            })
            .collect()
    }

    fn render_placed(node: &str, services: &[EdgeService], mesh_port: Option<u16>) -> Rendered {
        render(
            node,
            services,
            &slices_of(services),
            mesh_port,
            Path::new("/state"),
        )
    }

    #[test]
    fn fields_naming_files_on_the_node_are_refused() {
        let mut services = [es("files", 8000, &[("a", None)], 1)];
        services[0].spec.handlers = serde_yaml_ng::from_str(
            "- {name: f, kind: wasm, path: /f, module: {file: /etc/shadow}}\n- {name: u, kind: upstream, path: /u, upstream: {url: 'https://cloud/u', caFile: /etc/shadow}}\n",
        )
        .unwrap();
        services[0].spec.hub = Some(
            serde_yaml_ng::from_str(
                "{url: 'nats://hub:4222', credentialsFile: /etc/shadow, caFile: /etc/shadow}",
            )
            .unwrap(),
        );
        services[0].spec.channels = vec![ChannelSpec {
            uplink: true,
            ..ChannelSpec::named("t")
        }];
        let r = render_placed("a", &services, None);
        assert!(r.config.services.is_empty());
        let why = &r.rejected[0].1;
        for field in [
            "spec.handlers[0].module.file",
            "spec.handlers[1].upstream.caFile",
            "spec.hub.credentialsFile",
            "spec.hub.caFile",
        ] {
            assert!(why.contains(field), "{field} in {why}");
        }
    }

    #[test]
    fn the_hubs_and_upstreams_secrets_become_files_in_the_state_dir() {
        let mut services = [es("linked", 8000, &[("a", None)], 1)];
        services[0].spec.hub = Some(
            serde_yaml_ng::from_str(
                "{url: 'wss://hub/relay', tokenSecret: {name: hub, key: token}, caSecret: {name: hub, key: ca.crt}, queueBytes: 65536}",
            )
            .unwrap(),
        );
        services[0].spec.channels = vec![ChannelSpec {
            uplink: true,
            downlink: true,
            ..ChannelSpec::named("t")
        }];
        services[0].spec.handlers = serde_yaml_ng::from_str(
            "- {name: u, kind: upstream, path: /u, upstream: {url: 'https://cloud/u', caSecret: {name: cloud-ca, key: ca.pem}}}\n",
        )
        .unwrap();
        let r = render_placed("a", &services, None);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        let s = &r.config.services[0];
        let hub = s.hub.as_ref().unwrap();
        assert_eq!(hub.url, "wss://hub/relay");
        assert_eq!(hub.queue_bytes, 65536);
        assert_eq!(
            hub.token_file.as_deref(),
            Some("/state/secrets/edge/hub/token")
        );
        assert_eq!(
            hub.ca_file.as_deref(),
            Some("/state/secrets/edge/hub/ca.crt")
        );
        assert_eq!((&hub.token_secret, &hub.ca_secret), (&None, &None));
        assert!(s.is_uplink("t") && s.is_downlink("t"));
        let upstream = s.handlers[0].upstream.as_ref().unwrap();
        assert_eq!(
            upstream.ca_file.as_deref(),
            Some("/state/secrets/edge/cloud-ca/ca.pem")
        );
        assert_eq!(upstream.ca_secret, None);
        r.config.validate().unwrap();

        services[0].spec.hub = Some(
            serde_yaml_ng::from_str(
                "{url: 'nats://hub:4222', credentialsSecret: {name: nats, key: user.creds}}",
            )
            .unwrap(),
        );
        let r = render_placed("a", &services, None);
        let hub = r.config.services[0].hub.as_ref().unwrap();
        assert_eq!(
            hub.credentials_file.as_deref(),
            Some("/state/secrets/edge/nats/user.creds")
        );
        assert_eq!(hub.credentials_secret, None);
        r.config.validate().unwrap();
    }

    #[test]
    fn a_slice_of_a_deleted_namesake_places_nothing() {
        let mut services = [es("chat", 8765, &[("a", Some("10.0.0.1"))], 1)];
        let slices = slices_of(&services);
        services[0].metadata.uid = Some("new-uid".into());
        let r = render("a", &services, &slices, Some(7946), Path::new("/state"));
        assert!(r.config.services.is_empty(), "{:?}", r.config.services);
    }

    #[test]
    fn runs_what_is_placed_here_with_the_others_as_peers() {
        let services = [
            es(
                "chat",
                8765,
                &[
                    ("a", Some("10.0.0.1")),
                    ("b", Some("10.0.0.2")),
                    ("c", None),
                ],
                1,
            ),
            es("elsewhere", 9000, &[("b", Some("10.0.0.2"))], 2),
        ];
        let r = render_placed("a", &services, Some(7946));
        assert!(r.rejected.is_empty());
        assert_eq!(r.config.services.len(), 1);
        let s = &r.config.services[0];
        assert_eq!((s.name.as_str(), s.port), ("edge/chat", 8765));
        assert_eq!(
            s.peers,
            vec![PeerSpec {
                node: "b".into(),
                address: "10.0.0.2:7946".into(),
                public_key: Some(key_of("b")),
            }],
            "a peer without an address yet is left out"
        );
        r.config.validate().unwrap();
    }

    #[test]
    fn a_port_clash_here_keeps_the_older_service() {
        let services = [
            es("newer", 8000, &[("a", None)], 5),
            es("older", 8000, &[("a", None)], 1),
        ];
        let r = render_placed("a", &services, Some(7946));
        assert_eq!(r.config.services[0].name, "edge/older");
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].0, "edge/newer");
        assert!(
            r.rejected[0].1.contains("already used here by edge/older"),
            "{:?}",
            r.rejected
        );
    }

    #[test]
    fn ipv6_peers_are_bracketed() {
        let services = [es(
            "v6",
            8000,
            &[("a", None), ("b", Some("2001:db8::2"))],
            1,
        )];
        let r = render_placed("a", &services, Some(7946));
        assert_eq!(r.config.services[0].peers[0].address, "[2001:db8::2]:7946");
    }

    #[test]
    fn a_peer_without_a_valid_key_is_left_out() {
        let mut services = [es(
            "chat",
            8000,
            &[
                ("a", None),
                ("b", Some("10.0.0.2")),
                ("c", Some("10.0.0.3")),
            ],
            1,
        )];
        let placement = &mut services[0].status.as_mut().unwrap().placement;
        placement[1].mesh_public_key = None;
        placement[2].mesh_public_key = Some("not hex".into());
        let r = render_placed("a", &services, Some(7946));
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        assert!(r.config.services[0].peers.is_empty());
    }

    #[test]
    fn without_a_mesh_the_services_run_with_no_peers() {
        let services = [es(
            "solo",
            8000,
            &[("a", Some("10.0.0.1")), ("b", Some("10.0.0.2"))],
            1,
        )];
        let r = render_placed("a", &services, None);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        assert!(r.config.services[0].peers.is_empty());
        r.config.validate().unwrap();
    }

    #[test]
    fn secrets_become_files_in_the_state_dir_and_node_files_are_refused() {
        let mut services = [es("web", 8443, &[("a", None)], 1)];
        services[0].spec.tls = Some(edgewire_api::crd::ServiceTls {
            secret_name: "web-tls".into(),
        });
        services[0].spec.auth = Some(
            serde_yaml_ng::from_str("algorithm: HS256\nkeySecret: {name: jwt, key: hs256}\n")
                .unwrap(),
        );
        let r = render_placed("a", &services, None);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        let s = &r.config.services[0];
        let tls = s.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, "/state/secrets/edge/web-tls/tls.crt");
        assert_eq!(tls.key_file, "/state/secrets/edge/web-tls/tls.key");
        let auth = s.auth.as_ref().unwrap();
        assert_eq!(
            auth.key_file.as_deref(),
            Some("/state/secrets/edge/jwt/hs256")
        );
        assert_eq!(auth.key_secret, None);
        r.config.validate().unwrap();

        let mut from_node = services.clone();
        from_node[0].spec.auth.as_mut().unwrap().key_file = Some("/etc/shadow".into());
        let r = render_placed("a", &from_node, None);
        assert!(r.config.services.is_empty());
        assert!(r.rejected[0].1.contains("keyFile"), "{:?}", r.rejected);

        let mut climbing = services.clone();
        climbing[0]
            .spec
            .auth
            .as_mut()
            .unwrap()
            .key_secret
            .as_mut()
            .unwrap()
            .key = "..".into();
        let r = render_placed("a", &climbing, None);
        assert!(r.config.services.is_empty(), "{:?}", r.config);
    }
}
