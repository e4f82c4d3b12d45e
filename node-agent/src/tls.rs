//! TLS for a service's clients (`wss://`, `https://`) with rustls. The
//! certificate chain and key come from files and are read again when they
//! change: a rotated certificate is served to new connections, while open
//! connections keep the session they have.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgewire_api::TlsSpec;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::reloading::Reloading;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read tls {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls {what} {path}: {why}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Serves the newest certificate and key that load and match; a half-written
/// rotation (a new certificate with the old key, say) keeps the previous
/// pair until both files agree.
pub struct ReloadingResolver {
    cert_file: PathBuf,
    key_file: PathBuf,
    pair: Reloading<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for ReloadingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingResolver")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingResolver {
    /// Reads the files once; an error here keeps the service from starting.
    pub fn load(spec: &TlsSpec) -> Result<ReloadingResolver, TlsError> {
        let cert_file = PathBuf::from(&spec.cert_file);
        let key_file = PathBuf::from(&spec.key_file);
        let pair = Reloading::load(vec![cert_file.clone(), key_file.clone()], || {
            read_pair(&cert_file, &key_file)
        })?;
        Ok(ReloadingResolver {
            cert_file,
            key_file,
            pair,
        })
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let pair = self
            .pair
            .current(|| read_pair(&self.cert_file, &self.key_file));
        Some(Arc::clone(&pair))
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let invalid = |what, path: &Path, why: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        why,
    };
    let cert_pem = read("certFile", cert_file)?;
    let key_pem = read("keyFile", key_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certFile", cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(invalid(
            "certFile",
            cert_file,
            "holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid("keyFile", key_file, e.to_string()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| invalid("keyFile", key_file, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        invalid(
            "keyFile",
            key_file,
            format!("does not match the certificate: {e}"),
        )
    })?;
    Ok(Arc::new(certified))
}

/// The server side of TLS for one service.
pub fn acceptor(spec: &TlsSpec) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let resolver = Arc::new(ReloadingResolver::load(spec)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "config",
            path: PathBuf::new(),
            why: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
