//! TLS for a service's clients (`wss://`, `https://`) with rustls. The
//! certificate chain and key come from files and are read again when they
//! change: a rotated certificate is served to new connections, while open
//! connections keep the session they have.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use edgewire_api::TlsSpec;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often, at most, a handshake looks at the files: a burst of handshakes
/// costs one `stat` pair per interval, not one each.
const CHECK_EVERY: Duration = Duration::from_secs(1);

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

/// What the files looked like when last read: a change in either means a
/// rotation (or half of one) happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    cert: (Option<SystemTime>, u64),
    key: (Option<SystemTime>, u64),
}

fn stamp_of(path: &Path) -> (Option<SystemTime>, u64) {
    match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    }
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
}

/// Serves the newest certificate and key that load and match; a half-written
/// rotation (a new certificate with the old key, say) keeps the previous
/// pair until both files agree.
pub struct ReloadingResolver {
    cert_file: PathBuf,
    key_file: PathBuf,
    loaded: RwLock<Loaded>,
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
        let stamp = Stamp {
            cert: stamp_of(&cert_file),
            key: stamp_of(&key_file),
        };
        let key = read_pair(&cert_file, &key_file)?;
        Ok(ReloadingResolver {
            cert_file,
            key_file,
            loaded: RwLock::new(Loaded {
                key,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&loaded.key)
    }

    /// Reads the files again if they changed since the last read; at most
    /// once per [`CHECK_EVERY`].
    fn refresh(&self) {
        {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            if loaded.checked.elapsed() < CHECK_EVERY {
                return;
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() < CHECK_EVERY {
            return;
        }
        loaded.checked = Instant::now();
        let stamp = Stamp {
            cert: stamp_of(&self.cert_file),
            key: stamp_of(&self.key_file),
        };
        if stamp == loaded.stamp {
            return;
        }
        match read_pair(&self.cert_file, &self.key_file) {
            Ok(key) => {
                tracing::info!(cert = %self.cert_file.display(), "tls certificate reloaded");
                loaded.key = key;
                loaded.stamp = stamp;
            }
            // Mid-rotation or broken: keep serving the pair that works and
            // look again at the next check.
            Err(err) => tracing::warn!(%err, "tls certificate not reloaded"),
        }
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current())
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
