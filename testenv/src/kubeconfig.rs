//! Kubeconfig files that point at the control plane, one per identity.

use std::path::Path;

use crate::pki::CertFiles;

/// Renders a kubeconfig that references the PEM files by path.
pub fn render(server: &str, ca: &Path, user: &str, creds: &CertFiles) -> String {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "edgewire-testenv",
            "cluster": {"server": server, "certificate-authority": ca},
        }],
        "users": [{
            "name": user,
            "user": {"client-certificate": creds.cert, "client-key": creds.key},
        }],
        "contexts": [{
            "name": "edgewire-testenv",
            "context": {"cluster": "edgewire-testenv", "user": user, "namespace": "default"},
        }],
        "current-context": "edgewire-testenv",
    });
    // JSON is valid YAML, and every Kubernetes client reads it.
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
