//! Mutual authentication of a mesh link with the shared secret: each side
//! proves it knows the secret by an HMAC-SHA256 over the other side's fresh
//! nonce, its role and its node name. The secret itself never crosses the
//! wire, and a recorded answer is useless against a new nonce.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Dialer => "dialer",
            Role::Acceptor => "acceptor",
        }
    }
}

/// A fresh random nonce, hex encoded.
pub fn nonce() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source only fails on a broken system; a zero nonce would
    // still be a valid (if weaker) challenge, so carry on.
    let _ = getrandom::fill(&mut bytes);
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mac(secret: &[u8], role: Role, nonce: &str, node: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    for part in [role.as_str(), nonce, node] {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    mac
}

/// The proof `node`, in `role`, gives for the other side's `nonce`.
pub fn prove(secret: &[u8], role: Role, nonce: &str, node: &str) -> String {
    hex(&mac(secret, role, nonce, node).finalize().into_bytes())
}

/// Checks a proof in constant time.
pub fn verify(secret: &[u8], role: Role, nonce: &str, node: &str, proof: &str) -> bool {
    let Some(bytes) = unhex(proof) else {
        return false;
    };
    mac(secret, role, nonce, node).verify_slice(&bytes).is_ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_with_the_same_secret_nonce_role_and_node() {
        let n = nonce();
        let proof = prove(b"s3cret", Role::Dialer, &n, "edge-1");
        assert!(verify(b"s3cret", Role::Dialer, &n, "edge-1", &proof));
        assert!(!verify(b"other", Role::Dialer, &n, "edge-1", &proof));
        assert!(!verify(b"s3cret", Role::Acceptor, &n, "edge-1", &proof));
        assert!(!verify(b"s3cret", Role::Dialer, &nonce(), "edge-1", &proof));
        assert!(!verify(b"s3cret", Role::Dialer, &n, "edge-2", &proof));
        assert!(!verify(b"s3cret", Role::Dialer, &n, "edge-1", "zz"));
        assert_ne!(nonce(), nonce());
    }
}
