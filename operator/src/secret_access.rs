//! Which Secrets the agents may read: in each namespace, exactly those its
//! EdgeServices name (`referenced_secrets`), through a Role with
//! `resourceNames` and `get` only, bound to the agents' ServiceAccount. One
//! Role per namespace, shared by its EdgeServices, so it has no owner: it is
//! rewritten whenever an EdgeService there changes, and deleted once none
//! names a Secret any more. The agents fetch by name and never list or
//! watch, so `get` is all they need (a `watch` limited by resourceNames
//! would also need a fieldSelector on every request).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use edgewire_api::crd::{EdgeService, referenced_secrets};
use futures_util::StreamExt;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::desired::{MANAGED_BY_LABEL, MANAGER};
use crate::queue::CoalescingQueue;

/// Marks the Roles and RoleBindings this module writes, to find them again.
const PURPOSE_LABEL: &str = "edgewire.dev/agent-secret-access";
/// The longest the first listing of Roles may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// A failed write is tried again after this long.
const RETRY: Duration = Duration::from_secs(5);
/// The longest one namespace's Role and RoleBinding writes may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// Every namespace with EdgeServices is judged again this often, so that an
/// access never waits on one change notice alone.
const RESYNC: Duration = Duration::from_secs(30);

/// The agents' ServiceAccount, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAccount {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for AgentAccount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(AgentAccount {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
        }
    }
}

impl AgentAccount {
    /// The Role and RoleBinding's name in each namespace.
    pub fn role_name(&self) -> String {
        format!("{}-secrets", self.name)
    }
}

/// The Secrets named by the EdgeServices of `namespace` (not being deleted).
pub fn named_in(services: &[Arc<EdgeService>], namespace: &str) -> BTreeSet<String> {
    services
        .iter()
        .filter(|es| es.metadata.deletion_timestamp.is_none())
        .filter(|es| es.namespace().as_deref() == Some(namespace))
        .flat_map(|es| referenced_secrets(&es.spec))
        .collect()
}

fn meta(namespace: &str, agent: &AgentAccount) -> ObjectMeta {
    ObjectMeta {
        name: Some(agent.role_name()),
        namespace: Some(namespace.into()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
            (PURPOSE_LABEL.to_string(), "true".to_string()),
        ])),
        ..ObjectMeta::default()
    }
}

/// The Role and RoleBinding that let the agents `get` exactly `secrets` in
/// `namespace`; `None` when there are none to read (then neither exists).
pub fn desired(
    namespace: &str,
    secrets: &BTreeSet<String>,
    agent: &AgentAccount,
) -> Option<(Role, RoleBinding)> {
    if secrets.is_empty() {
        return None;
    }
    let role = Role {
        metadata: meta(namespace, agent),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["get".into()],
            resource_names: Some(secrets.iter().cloned().collect()),
            non_resource_urls: None,
        }]),
    };
    let binding = RoleBinding {
        metadata: meta(namespace, agent),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: agent.role_name(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: agent.name.clone(),
            namespace: Some(agent.namespace.clone()),
            api_group: None,
        }]),
    };
    Some((role, binding))
}

/// Writes (or deletes) the namespace's Role and RoleBinding.
async fn sync(
    client: &Client,
    namespace: &str,
    secrets: &BTreeSet<String>,
    agent: &AgentAccount,
) -> Result<(), kube::Error> {
    let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    let name = agent.role_name();
    match desired(namespace, secrets, agent) {
        Some((role, binding)) => {
            let params = PatchParams::apply(MANAGER).force();
            // The Role first: a binding to a Role that grants less is harmless.
            roles.patch(&name, &params, &Patch::Apply(&role)).await?;
            bindings
                .patch(&name, &params, &Patch::Apply(&binding))
                .await?;
        }
        None => {
            // The binding first, so no moment grants what the Role did.
            for result in [
                bindings
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
                roles
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            ] {
                match result {
                    Ok(()) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok(())
}

/// Keeps each namespace's Role in line with its EdgeServices: `namespaces`
/// receives the namespace of every EdgeService that changed. Namespaces
/// that hold a Role from before (whose EdgeServices may be gone) are looked
/// at once at the start.
pub async fn run(
    client: Client,
    services: Store<EdgeService>,
    namespaces: Arc<CoalescingQueue<String>>,
    scope: Option<String>,
    agent: AgentAccount,
    stop: CancellationToken,
) {
    tracing::debug!("keeping the agents' Secret access");
    let roles: Api<Role> = match &scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let listed = tokio::time::timeout(
        LIST_TIMEOUT,
        roles.list(&ListParams::default().labels(&format!("{PURPOSE_LABEL}=true"))),
    )
    .await;
    match listed {
        Ok(Ok(list)) => namespaces.extend(list.items.iter().filter_map(|r| r.namespace())),
        Ok(Err(err)) => tracing::warn!(%err, "cannot list the agents' secret Roles"),
        Err(_) => tracing::warn!("listing the agents' secret Roles timed out"),
    }
    tracing::debug!("listed the agents' Secret Roles");
    let mut written: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut pending = Box::pin(Arc::clone(&namespaces).stream());
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let namespace = tokio::select! {
            _ = stop.cancelled() => return,
            _ = resync.tick() => {
                namespaces.extend(services.state().iter().filter_map(|es| es.namespace()));
                continue;
            }
            next = pending.next() => match next {
                Some(ns) => ns,
                None => return,
            },
        };
        // Judged from a complete listing only: an empty cache must never
        // read as "no Secret is named here".
        match tokio::time::timeout(SYNC_TIMEOUT, services.wait_until_ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!(%namespace, "the EdgeService cache is not ready; judging the agents' Secret access later");
                retry_later(&namespaces, namespace, &stop);
                continue;
            }
        }
        let secrets = named_in(&services.state(), &namespace);
        if written.get(&namespace) == Some(&secrets) {
            tracing::debug!(%namespace, "agents' Secret access unchanged");
            continue;
        }
        tracing::debug!(%namespace, secrets = secrets.len(), "writing the agents' Secret access");
        let synced =
            tokio::time::timeout(SYNC_TIMEOUT, sync(&client, &namespace, &secrets, &agent))
                .await
                .map_err(|_| format!("no answer within {SYNC_TIMEOUT:?}"))
                .and_then(|written| written.map_err(|e| e.to_string()));
        match synced {
            Ok(()) => {
                tracing::info!(%namespace, secrets = secrets.len(), "agents' Secret access updated");
                written.insert(namespace, secrets);
            }
            Err(err) => {
                tracing::warn!(%namespace, %err, "cannot update the agents' Secret access; retrying");
                written.remove(&namespace);
                retry_later(&namespaces, namespace, &stop);
            }
        }
    }
}

/// Queues `namespace` again after [`RETRY`].
fn retry_later(
    namespaces: &Arc<CoalescingQueue<String>>,
    namespace: String,
    stop: &CancellationToken,
) {
    let queue = Arc::clone(namespaces);
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(RETRY) => queue.push(namespace),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn es(namespace: &str, name: &str, yaml: &str) -> Arc<EdgeService> {
        let mut es: EdgeService = serde_yaml_ng::from_str(&format!(
            "apiVersion: edgewire.dev/v1alpha1\nkind: EdgeService\nmetadata: {{name: {name}}}\nspec:\n  port: 8443\n{yaml}"
        ))
        .unwrap();
        es.metadata.namespace = Some(namespace.into());
        Arc::new(es)
    }

    #[test]
    fn one_role_per_namespace_names_exactly_the_secrets_named_there() {
        let agent: AgentAccount = "edgewire-system/edgewire-agent".parse().unwrap();
        let services = [
            es("shop", "web", "  tls: {secretName: web-tls}\n"),
            es(
                "shop",
                "api",
                "  auth: {algorithm: HS256, keySecret: {name: jwt, key: k}}\n  tls: {secretName: web-tls}\n",
            ),
            es("other", "x", "  tls: {secretName: not-here}\n"),
            es("shop", "plain", ""),
        ];
        let names = named_in(&services, "shop");
        assert_eq!(names, BTreeSet::from(["jwt".into(), "web-tls".into()]));
        let (role, binding) = desired("shop", &names, &agent).unwrap();
        let rule = &role.rules.as_ref().unwrap()[0];
        assert_eq!(rule.verbs, ["get"]);
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["secrets".to_string()][..])
        );
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["jwt".to_string(), "web-tls".to_string()][..])
        );
        assert_eq!(role.metadata.namespace.as_deref(), Some("shop"));
        assert!(role.metadata.owner_references.is_none(), "shared: no owner");
        assert_eq!(binding.role_ref.name, "edgewire-agent-secrets");
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("edgewire-agent", Some("edgewire-system"))
        );
        assert!(desired("empty", &named_in(&services, "empty"), &agent).is_none());
        assert!("no-slash".parse::<AgentAccount>().is_err());
    }
}
