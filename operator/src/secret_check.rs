//! Whether the Secrets an EdgeService names can serve it: present, with
//! the keys its `tls`, `auth`, `hub` and upstream handlers read, in a shape
//! the agent accepts. A problem makes the EdgeService `Degraded`
//! (`SecretMissing`, `SecretInvalid`) with an Event; the agents refuse to
//! serve it without its TLS and token key (never plaintext where TLS was
//! asked, never anonymous where a token was), and without a hub token or a
//! CA they serve their local clients while the hub link or the upstream
//! fails. The decision is pure; `check` only fetches.

use std::collections::BTreeMap;

use edgewire_api::TokenAlgorithm;
use edgewire_api::crd::{EdgeServiceSpec, TLS_CERT_KEY, TLS_PRIVATE_KEY};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub const SECRET_MISSING: &str = "SecretMissing";
pub const SECRET_INVALID: &str = "SecretInvalid";
/// RFC 7518 §3.2, as the agent requires.
const MIN_HS256_SECRET_BYTES: usize = 32;

/// What one Secret must hold for the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Use {
    /// `tls.secretName`: a certificate chain and its private key.
    Tls,
    /// `auth.keySecret`: one key holding the token key for `algorithm`.
    TokenKey {
        key: String,
        algorithm: TokenAlgorithm,
    },
    /// `hub.tokenSecret`: one key holding the bearer token for the hub.
    HubToken { key: String },
    /// `hub.caSecret`, an upstream's `caSecret`: one key holding PEM CA
    /// certificates.
    Ca { key: String },
    /// `hub.credentialsSecret`: a NATS user's NKEY seed, or a `.creds` file.
    NatsCredentials { key: String },
}

/// Each Secret the spec names, with what it is used for.
fn uses(spec: &EdgeServiceSpec) -> Vec<(String, Use)> {
    let mut uses = Vec::new();
    if let Some(tls) = &spec.tls {
        uses.push((tls.secret_name.clone(), Use::Tls));
    }
    if let Some(auth) = &spec.auth
        && let Some(secret) = &auth.key_secret
    {
        uses.push((
            secret.name.clone(),
            Use::TokenKey {
                key: secret.key.clone(),
                algorithm: auth.algorithm,
            },
        ));
    }
    if let Some(hub) = &spec.hub {
        if let Some(secret) = &hub.token_secret {
            let key = secret.key.clone();
            uses.push((secret.name.clone(), Use::HubToken { key }));
        }
        if let Some(secret) = &hub.ca_secret {
            let key = secret.key.clone();
            uses.push((secret.name.clone(), Use::Ca { key }));
        }
        if let Some(secret) = &hub.credentials_secret {
            let key = secret.key.clone();
            uses.push((secret.name.clone(), Use::NatsCredentials { key }));
        }
    }
    for handler in &spec.handlers {
        if let Some(secret) = handler.upstream.as_ref().and_then(|u| u.ca_secret.as_ref()) {
            let key = secret.key.clone();
            uses.push((secret.name.clone(), Use::Ca { key }));
        }
    }
    uses
}

/// Why a Secret cannot serve: (reason, message).
pub type Problem = (&'static str, String);

/// Judges one Secret for one use; `None` is a Secret that does not exist.
fn judge(name: &str, usage: &Use, data: Option<&BTreeMap<String, ByteString>>) -> Option<Problem> {
    let Some(data) = data else {
        return Some((SECRET_MISSING, format!("Secret {name} does not exist")));
    };
    let value = |key: &str| {
        data.get(key)
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
    };
    let invalid = |why: String| Some((SECRET_INVALID, format!("Secret {name}: {why}")));
    match usage {
        Use::Tls => {
            let (Some(cert), Some(key)) = (value(TLS_CERT_KEY), value(TLS_PRIVATE_KEY)) else {
                return invalid(format!(
                    "a TLS Secret needs the keys {TLS_CERT_KEY} and {TLS_PRIVATE_KEY}"
                ));
            };
            let chain = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>();
            if !chain.is_ok_and(|c| !c.is_empty()) {
                return invalid(format!("{TLS_CERT_KEY} holds no PEM certificate"));
            }
            if PrivateKeyDer::from_pem_slice(key).is_err() {
                return invalid(format!("{TLS_PRIVATE_KEY} holds no PEM private key"));
            }
            None
        }
        Use::TokenKey { key, algorithm } => {
            let Some(bytes) = value(key) else {
                return invalid(format!("no key {key:?}"));
            };
            match algorithm {
                TokenAlgorithm::HS256 => {
                    let secret = bytes.strip_suffix(b"\n").unwrap_or(bytes);
                    (secret.len() < MIN_HS256_SECRET_BYTES).then(|| {
                        (
                            SECRET_INVALID,
                            format!(
                                "Secret {name}: key {key:?} is shorter than the {MIN_HS256_SECRET_BYTES} bytes an HS256 secret needs"
                            ),
                        )
                    })
                }
                TokenAlgorithm::RS256 | TokenAlgorithm::ES256 => {
                    let text = String::from_utf8_lossy(bytes);
                    let pem = text.contains("-----BEGIN ") && text.contains("PUBLIC KEY-----");
                    (!pem).then(|| {
                        (
                            SECRET_INVALID,
                            format!("Secret {name}: key {key:?} holds no PEM public key"),
                        )
                    })
                }
            }
        }
        Use::HubToken { key } => {
            let Some(bytes) = value(key) else {
                return invalid(format!("no key {key:?}"));
            };
            // Sent as `Authorization: Bearer <token>` (surrounding
            // whitespace trimmed): visible ASCII only.
            let token = bytes.trim_ascii();
            let header_safe = !token.is_empty() && token.iter().all(|b| b.is_ascii_graphic());
            (!header_safe).then(|| {
                (
                    SECRET_INVALID,
                    format!("Secret {name}: key {key:?} is not a token (visible ASCII, not empty)"),
                )
            })
        }
        Use::Ca { key } => {
            let Some(bytes) = value(key) else {
                return invalid(format!("no key {key:?}"));
            };
            let certs = CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>();
            (!certs.is_ok_and(|c| !c.is_empty())).then(|| {
                (
                    SECRET_INVALID,
                    format!("Secret {name}: key {key:?} holds no PEM certificate"),
                )
            })
        }
        Use::NatsCredentials { key } => {
            let Some(bytes) = value(key) else {
                return invalid(format!("no key {key:?}"));
            };
            let text = String::from_utf8_lossy(bytes);
            let creds =
                text.contains("BEGIN NATS USER JWT") && text.contains("BEGIN USER NKEY SEED");
            let seed = text.trim();
            // An NKEY user seed: 'S' (a seed) then 'U' (of a user), base32.
            let user_seed = seed.starts_with("SU")
                && seed.len() > 2
                && seed
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
            (!creds && !user_seed).then(|| {
                (
                    SECRET_INVALID,
                    format!(
                        "Secret {name}: key {key:?} holds neither an NKEY user seed nor a .creds file"
                    ),
                )
            })
        }
    }
}

/// The first problem with the Secrets `spec` names in `namespace`, if any.
/// A Secret the operator cannot read for another reason than its absence
/// is not judged (the agents' own reports still show a service that cannot
/// start).
pub async fn check(client: &Client, namespace: &str, spec: &EdgeServiceSpec) -> Option<Problem> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for (name, usage) in uses(spec) {
        let secret = match api.get_opt(&name).await {
            Ok(secret) => secret,
            Err(err) => {
                tracing::warn!(%namespace, secret = %name, %err, "cannot read a Secret to check it");
                continue;
            }
        };
        let data = secret.map(|s| s.data.unwrap_or_default());
        if let Some(problem) = judge(&name, &usage, data.as_ref()) {
            return Some(problem);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2Zm\n-----END CERTIFICATE-----\n";
    const KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEG\n-----END PRIVATE KEY-----\n";

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn tls_secrets_need_a_certificate_and_a_key() {
        assert_eq!(judge("t", &Use::Tls, None).unwrap().0, SECRET_MISSING);
        let good = data(&[("tls.crt", CERT), ("tls.key", KEY)]);
        assert_eq!(judge("t", &Use::Tls, Some(&good)), None);
        for bad in [
            data(&[("tls.crt", CERT)]),
            data(&[("tls.crt", "not pem"), ("tls.key", KEY)]),
            data(&[("tls.crt", CERT), ("tls.key", CERT)]),
        ] {
            let (reason, message) = judge("t", &Use::Tls, Some(&bad)).unwrap();
            assert_eq!(reason, SECRET_INVALID, "{message}");
        }
    }

    #[test]
    fn token_keys_fit_their_algorithm() {
        let hs = |key: &str| Use::TokenKey {
            key: key.into(),
            algorithm: TokenAlgorithm::HS256,
        };
        let secrets = data(&[("long", &"x".repeat(32)), ("short", "x")]);
        assert_eq!(judge("j", &hs("long"), Some(&secrets)), None);
        assert_eq!(
            judge("j", &hs("short"), Some(&secrets)).unwrap().0,
            SECRET_INVALID
        );
        assert_eq!(
            judge("j", &hs("absent"), Some(&secrets)).unwrap().0,
            SECRET_INVALID
        );
        let es = Use::TokenKey {
            key: "pub".into(),
            algorithm: TokenAlgorithm::ES256,
        };
        let pem = data(&[(
            "pub",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )]);
        assert_eq!(judge("j", &es, Some(&pem)), None);
        let secrets = data(&[("pub", &"x".repeat(40))]);
        assert_eq!(judge("j", &es, Some(&secrets)).unwrap().0, SECRET_INVALID);
    }

    #[test]
    fn hub_tokens_are_header_safe_and_cas_hold_certificates() {
        let token = |key: &str| Use::HubToken { key: key.into() };
        let ca = |key: &str| Use::Ca { key: key.into() };
        let secrets = data(&[
            ("good", "eyJhbGciOi.eyJzdWIi.sig\n"),
            ("spaced", "two words"),
            ("blank", " \n"),
            ("ca", CERT),
            ("key", KEY),
        ]);
        assert_eq!(judge("h", &token("good"), Some(&secrets)), None);
        for bad in ["spaced", "blank", "absent"] {
            let (reason, message) = judge("h", &token(bad), Some(&secrets)).unwrap();
            assert_eq!(reason, SECRET_INVALID, "{bad}: {message}");
        }
        assert_eq!(judge("h", &ca("ca"), Some(&secrets)), None);
        for bad in ["key", "good", "absent"] {
            let (reason, message) = judge("h", &ca(bad), Some(&secrets)).unwrap();
            assert_eq!(reason, SECRET_INVALID, "{bad}: {message}");
        }
        assert_eq!(judge("h", &ca("ca"), None).unwrap().0, SECRET_MISSING);
        let nats = |key: &str| Use::NatsCredentials { key: key.into() };
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\nSUAM\n------END USER NKEY SEED------\n";
        let secrets = data(&[
            (
                "seed",
                "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n",
            ),
            ("creds", creds),
            ("token", "s3cr3t"),
        ]);
        assert_eq!(judge("n", &nats("seed"), Some(&secrets)), None);
        assert_eq!(judge("n", &nats("creds"), Some(&secrets)), None);
        assert_eq!(
            judge("n", &nats("token"), Some(&secrets)).unwrap().0,
            SECRET_INVALID
        );
    }

    #[test]
    fn every_secret_the_spec_stores_is_judged() {
        let spec: EdgeServiceSpec = serde_yaml_ng::from_str(
            "port: 80\nchannels: [{name: t, uplink: true}]\nhub: {url: 'nats://h:4222', credentialsSecret: {name: hub, key: user.creds}, caSecret: {name: hub, key: ca.crt}}\nhandlers: [{name: u, kind: upstream, upstream: {url: 'https://c/u', caSecret: {name: cloud, key: ca.pem}}}]\n",
        )
        .unwrap();
        let judged: Vec<(String, String)> = uses(&spec)
            .into_iter()
            .map(|(name, usage)| {
                let key = match usage {
                    Use::HubToken { key }
                    | Use::Ca { key }
                    | Use::NatsCredentials { key }
                    | Use::TokenKey { key, .. } => key,
                    Use::Tls => String::new(),
                };
                (name, key)
            })
            .collect();
        assert_eq!(judged, spec.stored_secret_keys());
    }
}
