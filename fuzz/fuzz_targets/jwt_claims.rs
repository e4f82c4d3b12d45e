//! A client's token: any bytes are either refused with a reason or decoded,
//! never a panic. Half the inputs are used as the token itself; the other
//! half as a claims payload that the target signs with the service's key,
//! so the claims and grant path past the signature is reached too, and the
//! access granted is checked against an independent reading of the claims.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgewire_api::auth::pattern_matches;
use edgewire_api::{AuthSpec, TokenAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

// The agent's own token code, compiled here alone: the fuzz build then needs
// none of the agent's runtime.
#[allow(dead_code)]
#[path = "../../node-agent/src/auth/access.rs"]
mod access;
#[allow(dead_code)]
#[path = "../../node-agent/src/reloading.rs"]
mod reloading;
#[allow(dead_code)]
#[path = "../../node-agent/src/auth/verify.rs"]
mod verify;

use access::Action;
use verify::Authenticator;

const SECRET: &[u8] = b"fuzzing-secret-of-at-least-32-bytes!";
const LEEWAY: u32 = 7;

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    let spec = AuthSpec {
        algorithm: TokenAlgorithm::HS256,
        key_file: Some("fuzz".into()),
        key_secret: None,
        issuer: None,
        audience: None,
        leeway_seconds: LEEWAY,
        anonymous: None,
    };
    Authenticator::from_key_bytes(&spec, "fuzz", SECRET).expect("a valid fuzzing key")
});
static KEY: LazyLock<EncodingKey> =
    LazyLock::new(|| EncodingKey::from_secret(SECRET).expect("a valid fuzzing key"));

fn signed(payload: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &KEY, Algorithm::HS256)
        .expect("HMAC signing cannot fail");
    format!("{message}.{signature}")
}

/// The claims that grant, each as whatever JSON it holds.
#[derive(Deserialize)]
struct Reading {
    exp: Value,
    #[serde(default)]
    subscribe: Value,
    #[serde(default)]
    publish: Value,
    #[serde(default)]
    call: Value,
    #[serde(default)]
    origins: Value,
}

fn granted(patterns: &Value, name: &str) -> bool {
    patterns.as_array().is_some_and(|patterns| {
        patterns
            .iter()
            .filter_map(Value::as_str)
            .any(|p| pattern_matches(p, name))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            let _ = AUTH.authenticate(Some(token));
        }
        return;
    }
    // Claims, then a newline and a channel or handler name to ask about.
    let (payload, name) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &b""[..]),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let Ok(access) = AUTH.authenticate(Some(&signed(payload))) else {
        return;
    };
    // Accepted: read the claims that matter again, as plain JSON values.
    // Other claims are skipped unread by the decoder (they may hold invalid
    // UTF-8 or numbers beyond f64), so they are skipped here too.
    let claims: Reading = serde_json::from_slice(payload).expect("accepted claims read again");
    let exp = claims.exp.as_u64().expect("accepted claims carry exp");
    assert_eq!(access.expires_at, Some(exp.saturating_add(LEEWAY.into())));
    for (action, patterns) in [
        (Action::Subscribe, &claims.subscribe),
        (Action::Publish, &claims.publish),
        (Action::Call, &claims.call),
        (Action::Forward, &claims.origins),
    ] {
        assert_eq!(
            access.allows(action, name),
            granted(patterns, name),
            "{action:?} {name:?} with {patterns}"
        );
    }
});
