//! For the tests on the real control plane: objects written by server-side
//! apply, Secrets, the EdgeService's Degraded condition, and bounded waits
//! sized for a control plane, an operator and agents on a loaded machine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgewire_api::crd::EdgeService;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

/// The longest wait for the cluster to act: a Secret change waits for the
/// agents' periodic fetch (15 s) on top of the operator's and agents' work.
pub const SLOW_WAIT: Duration = Duration::from_secs(120);

/// Server-side applies `object` as field manager `test`, taking over fields.
pub async fn apply<K>(api: &Api<K>, name: &str, object: &K)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// An Opaque Secret with one key.
pub fn opaque_secret(name: &str, key: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The EdgeService's Degraded condition: (status, reason, message).
pub fn degraded(es: &EdgeService) -> (String, String, String) {
    es.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Degraded")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Waits (at most `SLOW_WAIT`) until `check` holds; `what` and `log`
/// explain a failure.
pub async fn eventually<F, Fut>(what: &str, log: impl Fn() -> String, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SLOW_WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}\n{}", log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
