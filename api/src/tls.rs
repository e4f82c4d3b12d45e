//! TLS for a service's clients: where its certificate and key are.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// The service serves `wss://` and `https://` only, with this certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM: the server certificate, then any intermediates. Read again when
    /// it changes, for new connections.
    pub cert_file: String,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl TlsSpec {
    pub fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        for (field, value) in [("certFile", &self.cert_file), ("keyFile", &self.key_file)] {
            if value.is_empty() {
                errors.push(FieldError::new(format!("{at}.{field}"), "must name a file"));
            }
        }
    }
}
