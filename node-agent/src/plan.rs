//! What a config change means for the running services, decided as a pure
//! function so the rule "unchanged services keep their connections" is testable
//! without sockets.

use std::collections::BTreeMap;

use edgewire_api::{AgentConfig, ServiceConfig};

/// The steps from the running set to a new config, by service name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running services the new config no longer has.
    pub stop: Vec<String>,
    /// Running services whose config changed: stopped, then started anew.
    pub restart: Vec<String>,
    /// Services to start: new ones, and ones that are not running (a failed bind).
    pub start: Vec<String>,
    /// Running services left exactly as they are.
    pub keep: Vec<String>,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.stop.is_empty() && self.restart.is_empty() && self.start.is_empty()
    }
}

/// Whether two configs of a service differ in what its listener and
/// connections run with. Peers are not part of that: the mesh follows them
/// without a restart.
pub fn needs_restart(current: &ServiceConfig, desired: &ServiceConfig) -> bool {
    let strip = |s: &ServiceConfig| ServiceConfig {
        peers: Vec::new(),
        ..s.clone()
    };
    strip(current) != strip(desired)
}

/// `running` maps each running service to the config it runs with.
pub fn plan(running: &BTreeMap<String, ServiceConfig>, desired: &AgentConfig) -> Plan {
    let mut plan = Plan::default();
    for name in running.keys() {
        if desired.service(name).is_none() {
            plan.stop.push(name.clone());
        }
    }
    for service in &desired.services {
        match running.get(&service.name) {
            Some(current) if !needs_restart(current, service) => {
                plan.keep.push(service.name.clone())
            }
            Some(_) => plan.restart.push(service.name.clone()),
            None => plan.start.push(service.name.clone()),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(config: &AgentConfig) -> BTreeMap<String, ServiceConfig> {
        config
            .services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect()
    }

    #[test]
    fn same_config_keeps_everything() {
        let config = AgentConfig::builtin_default();
        let plan = plan(&running(&config), &config);
        assert!(plan.is_noop());
        assert_eq!(plan.keep, ["echo", "compute"]);
    }

    #[test]
    fn changes_touch_only_the_changed_services() {
        let old = AgentConfig::builtin_default();
        let mut new = old.clone();
        new.services[0].limits.max_connections = 5;
        new.services.remove(1);
        let mut extra = old.services[1].clone();
        extra.name = "extra".into();
        extra.port = 5001;
        new.services.push(extra);
        let plan = plan(&running(&old), &new);
        assert_eq!(plan.stop, ["compute"]);
        assert_eq!(plan.restart, ["echo"]);
        assert_eq!(plan.start, ["extra"]);
        assert!(plan.keep.is_empty());
    }

    #[test]
    fn a_peer_change_is_not_a_restart() {
        let old = AgentConfig::builtin_default();
        let mut new = old.clone();
        new.services[0].peers.push(edgewire_api::PeerSpec {
            node: "b".into(),
            address: "127.0.0.2:7946".into(),
            public_key: Some("0f".repeat(32)),
        });
        let plan = plan(&running(&old), &new);
        assert!(plan.is_noop(), "{plan:?}");
    }

    #[test]
    fn a_service_that_is_not_running_is_started() {
        let config = AgentConfig::builtin_default();
        let mut current = running(&config);
        current.remove("compute");
        let plan = plan(&current, &config);
        assert_eq!(plan.start, ["compute"]);
        assert_eq!(plan.keep, ["echo"]);
    }
}
