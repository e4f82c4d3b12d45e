//! A service's token rules: its one algorithm and key, issuer, audience and
//! leeway, and the decision a request's token (or its absence) leads to.
//! Signatures and time claims are checked by `jsonwebtoken`.

use std::path::PathBuf;

use edgewire_api::{AuthSpec, Grants, TokenAlgorithm};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::access::{Access, Claims, Refusal};
use crate::reloading::Reloading;

/// Tokens longer than this are refused unread: a header line of a few KiB
/// is plenty for any grant list, and verification cost grows with length.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// RFC 7518 §3.2: an HS256 key is at least as long as the hash.
const MIN_HS256_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.keyFile is not set")]
    NoKeyFile,
    #[error("cannot read auth.keyFile {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.keyFile {path}: an HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes")]
    ShortSecret { path: String },
    #[error("auth.keyFile {path} is not a {algorithm:?} public key in PEM: {source}")]
    BadKey {
        path: String,
        algorithm: TokenAlgorithm,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

/// Decides, for one service, what a request's token allows.
pub struct Authenticator {
    /// The key, read again when its file changes (a rotated Secret): new
    /// tokens are judged by the new key, admitted connections keep theirs.
    key: Reloading<DecodingKey>,
    /// Where the key comes from; `None` for a key given as bytes.
    key_file: Option<String>,
    algorithm: TokenAlgorithm,
    validation: Validation,
    leeway_seconds: u32,
    anonymous: Option<Grants>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

fn read_key(algorithm: TokenAlgorithm, path: &str) -> Result<DecodingKey, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_string(),
        source,
    })?;
    decoding_key(algorithm, path, &bytes)
}

/// The key from its bytes; `path` only names it in errors.
fn decoding_key(
    algorithm: TokenAlgorithm,
    path: &str,
    bytes: &[u8],
) -> Result<DecodingKey, KeyError> {
    let bad = |source| KeyError::BadKey {
        path: path.to_string(),
        algorithm,
        source,
    };
    match algorithm {
        TokenAlgorithm::HS256 => {
            // `echo secret > file` leaves a newline no signer includes.
            let secret = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            if secret.len() < MIN_HS256_SECRET_BYTES {
                return Err(KeyError::ShortSecret {
                    path: path.to_string(),
                });
            }
            DecodingKey::from_secret(secret).map_err(bad)
        }
        TokenAlgorithm::RS256 => DecodingKey::from_rsa_pem(bytes).map_err(bad),
        TokenAlgorithm::ES256 => DecodingKey::from_ec_pem(bytes).map_err(bad),
    }
}

impl Authenticator {
    /// Reads the key file the spec names; it is read again when it changes.
    pub fn load(spec: &AuthSpec) -> Result<Authenticator, KeyError> {
        let path = spec.key_file.as_deref().ok_or(KeyError::NoKeyFile)?;
        let key = Reloading::load(vec![PathBuf::from(path)], || read_key(spec.algorithm, path))?;
        Ok(Authenticator::with_key(spec, key, Some(path.to_string())))
    }

    /// Builds the rules from the key's bytes; `path` only names it in errors.
    pub fn from_key_bytes(
        spec: &AuthSpec,
        path: &str,
        bytes: &[u8],
    ) -> Result<Authenticator, KeyError> {
        let key = Reloading::load(Vec::new(), || decoding_key(spec.algorithm, path, bytes))?;
        Ok(Authenticator::with_key(spec, key, None))
    }

    fn with_key(
        spec: &AuthSpec,
        key: Reloading<DecodingKey>,
        key_file: Option<String>,
    ) -> Authenticator {
        let algorithm = match spec.algorithm {
            TokenAlgorithm::HS256 => Algorithm::HS256,
            TokenAlgorithm::RS256 => Algorithm::RS256,
            TokenAlgorithm::ES256 => Algorithm::ES256,
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = spec.leeway_seconds.into();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &spec.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &spec.issuer {
            validation.set_issuer(&[issuer]);
        }
        Authenticator {
            key,
            key_file,
            algorithm: spec.algorithm,
            validation,
            leeway_seconds: spec.leeway_seconds,
            anonymous: spec.anonymous.clone(),
        }
    }

    /// The key in force, read again first if its file changed.
    fn key(&self) -> std::sync::Arc<DecodingKey> {
        self.key.current(|| match &self.key_file {
            Some(path) => read_key(self.algorithm, path),
            None => Err(KeyError::NoKeyFile),
        })
    }

    /// The access a request gets: from its token when it carries one (a bad
    /// token is refused even where anonymous use is allowed), else the
    /// service's anonymous grants, if any.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Access, Refusal> {
        let Some(token) = token else {
            return self
                .anonymous
                .clone()
                .map(Access::anonymous)
                .ok_or(Refusal::MissingToken);
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Malformed);
        }
        jsonwebtoken::decode::<Claims>(token, &self.key(), &self.validation)
            .map(|data| Access::from_claims(data.claims, self.leeway_seconds))
            .map_err(|err| refusal(err.kind()))
    }
}

/// The reason a decoding error is counted and reported under.
pub fn refusal(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature => Refusal::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => Refusal::WrongAlgorithm,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
        ErrorKind::InvalidAudience => Refusal::WrongAudience,
        _ => Refusal::Malformed,
    }
}
