//! Client authentication of a service: which tokens it accepts and what a
//! client without one may do. Types and validation only; the agent decodes
//! tokens and decides.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::check_channel_name;
use crate::error::FieldError;

/// The longest clock skew a service may tolerate between the token issuer
/// and the agent.
pub const MAX_LEEWAY_SECONDS: u32 = 300;

/// How clients of a service prove who they are: a JWT signed with one
/// algorithm and key, whose claims name what the client may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthSpec {
    /// The only algorithm accepted; a token signed with another is refused.
    pub algorithm: TokenAlgorithm,
    /// The file holding the key: for HS256 the shared secret (its bytes, less
    /// one trailing newline; at least 32 bytes), for RS256/ES256 the issuer's
    /// public key in PEM. Read when the service starts, and again when it
    /// changes (for new tokens; live connections keep their access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// In an EdgeService, instead of `keyFile`: the key of a Secret in the
    /// EdgeService's namespace holding the same bytes. The agent fetches it
    /// and stores it as a file of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<SecretKeyRef>,
    /// When set, a token's `iss` must equal it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When set, a token's `aud` must contain it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default)]
    #[schemars(range(max = 300))]
    pub leeway_seconds: u32,
    /// What a client that presents no token may do. Absent: every client
    /// needs a token. A client that presents a token is judged by it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<Grants>,
}

/// One key of a Secret in the EdgeService's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in its `data`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Whether `name` can name a Secret: a DNS subdomain (RFC 1123).
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a Secret name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

/// Whether `key` can be a key of a Secret's data: letters, digits, `-`,
/// `_` and `.`, and neither `.` nor `..` (the agent stores it as a file name).
pub fn check_secret_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a Secret key (letters, digits, '-', '_' and '.')"
        ))
    }
}

/// A JWS algorithm a service may require.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TokenAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256; the key file holds the RSA public key.
    RS256,
    /// ECDSA P-256 with SHA-256; the key file holds the EC public key.
    ES256,
}

/// What a client may do, each a list of patterns: a name, or a prefix
/// ending in `*` (`sensors.*`; `*` alone matches every name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grants {
    /// Channels the client may subscribe to.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Channels the client may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Handlers the client may call (over HTTP, the relay, or a WebSocket handler path).
    #[serde(default)]
    pub call: Vec<String>,
}

/// Whether `pattern` names `name`: equal, or a `*`-terminated prefix of it.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Whether `pattern` is well formed: a channel or handler name, optionally
/// ending in a single `*`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if body.is_empty() {
        return if pattern == "*" {
            Ok(())
        } else {
            Err("must not be empty".into())
        };
    }
    if body.contains('*') {
        return Err(format!("{pattern:?} may hold '*' only at its end"));
    }
    check_channel_name(body)
}

impl AuthSpec {
    /// Validates the block on its own, prefixing each field with `at`.
    pub fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        match (self.key_file.as_deref(), &self.key_secret) {
            (Some(file), None) if !file.is_empty() => {}
            (None, Some(secret))
                if check_secret_name(&secret.name).is_ok()
                    && check_secret_key(&secret.key).is_ok() => {}
            (None, None) | (Some(_), None) => errors.push(FieldError::new(
                format!("{at}.keyFile"),
                "must name the file holding the token key",
            )),
            (None, Some(secret)) => {
                let why = check_secret_name(&secret.name)
                    .and_then(|()| check_secret_key(&secret.key))
                    .err()
                    .unwrap_or_default();
                errors.push(FieldError::new(format!("{at}.keySecret"), why));
            }
            (Some(_), Some(_)) => errors.push(FieldError::new(
                format!("{at}.keySecret"),
                "exactly one of keyFile and keySecret must be set",
            )),
        }
        if self.leeway_seconds > MAX_LEEWAY_SECONDS {
            errors.push(FieldError::new(
                format!("{at}.leewaySeconds"),
                format!("must be at most {MAX_LEEWAY_SECONDS}"),
            ));
        }
        if let Some(anonymous) = &self.anonymous {
            anonymous.validate_into(&format!("{at}.anonymous"), errors);
        }
    }
}

impl Grants {
    fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        for (field, patterns) in [
            ("subscribe", &self.subscribe),
            ("publish", &self.publish),
            ("call", &self.call),
        ] {
            for (i, pattern) in patterns.iter().enumerate() {
                if let Err(why) = check_pattern(pattern) {
                    errors.push(FieldError::new(format!("{at}.{field}[{i}]"), why));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_or_prefixes() {
        assert!(pattern_matches("chat", "chat"));
        assert!(!pattern_matches("chat", "chat2"));
        assert!(pattern_matches("sensors.*", "sensors.t1"));
        assert!(!pattern_matches("sensors.*", "sensors"));
        assert!(pattern_matches("*", "anything"));
        assert!(check_pattern("*").is_ok());
        assert!(check_pattern("a.*").is_ok());
        for bad in ["", "**", "a*b*", "*a", "bad name"] {
            assert!(check_pattern(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn auth_block_parses_and_checks_its_fields() {
        let spec: AuthSpec = serde_yaml_ng::from_str(
            "algorithm: ES256\nkeyFile: /k.pem\nanonymous: {subscribe: [news, 'x y']}\nleewaySeconds: 900\n",
        )
        .unwrap();
        assert_eq!(spec.algorithm, TokenAlgorithm::ES256);
        let mut errors = Vec::new();
        spec.validate_into("auth", &mut errors);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["auth.leewaySeconds", "auth.anonymous.subscribe[1]"]
        );
        assert!(serde_yaml_ng::from_str::<AuthSpec>("algorithm: none\n").is_err());

        let both: AuthSpec = serde_yaml_ng::from_str(
            "algorithm: HS256\nkeyFile: /k\nkeySecret: {name: jwt, key: secret}\n",
        )
        .unwrap();
        let mut errors = Vec::new();
        both.validate_into("auth", &mut errors);
        assert_eq!(errors[0].field, "auth.keySecret");
        let from_secret: AuthSpec =
            serde_yaml_ng::from_str("algorithm: HS256\nkeySecret: {name: jwt, key: secret}\n")
                .unwrap();
        let mut errors = Vec::new();
        from_secret.validate_into("auth", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        for bad in ["..", "a/b", ""] {
            assert!(check_secret_key(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["..", "A", "a/b", "-a", ""] {
            assert!(check_secret_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_secret_name("web-tls.v2").is_ok());
        assert!(check_secret_key("tls.crt").is_ok());
    }
}
