//! One handler's HTTP client (hyper-util's pooled client over rustls, HTTP/1.1)
//! and one attempt with it: the answer read within the body cap and the
//! time left, or how the attempt failed.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use edgewire_api::UpstreamSpec;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::HeaderMap;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::outcome::Outcome;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an idle pooled connection to an upstream is kept.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// The upstream's complete answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The client for `spec`: its CA file's certificates as the only roots, or
/// the system's. Fails when the CA file cannot be read or holds none.
pub fn build(spec: &UpstreamSpec) -> Result<HttpClient, String> {
    let roots = match &spec.ca_file {
        Some(path) => Arc::new(roots_from_file(Path::new(path))?),
        None => system_roots(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| format!("TLS setup: {err}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // Connecting counts against the forward's deadline too; this bounds a
    // connect that the deadline's timer would otherwise cut.
    http.set_connect_timeout(Some(Duration::from_millis(spec.timeout_ms.into())));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(https))
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read caFile {}: {err}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|err| format!("caFile {}: {err}", path.display()))?;
        roots
            .add(cert)
            .map_err(|err| format!("caFile {}: {err}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("caFile {} holds no certificate", path.display()));
    }
    Ok(roots)
}

/// The system's CA certificates, read once per agent.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for err in &found.errors {
            tracing::warn!(%err, "reading the system's CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                ignored,
                "no system CA certificates; https upstreams without caFile will fail"
            );
        }
        Arc::new(roots)
    }))
}

/// One attempt: sends `request` and reads the whole answer within `time`.
pub async fn attempt(
    client: &HttpClient,
    request: hyper::Request<Full<Bytes>>,
    time: Duration,
    max_response_bytes: usize,
) -> Result<Answer, (Outcome, String)> {
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| classify(&err))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, max_response_bytes)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<LengthLimitError>() {
                    (Outcome::ResponseTooLarge, err.to_string())
                } else {
                    (Outcome::ConnectionLost, chain(err.as_ref()))
                }
            })?
            .to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(time, exchange).await {
        Ok(result) => result,
        Err(_) => Err((Outcome::Timeout, format!("no answer within {time:?}"))),
    }
}

/// Sorts a client error: a TLS failure anywhere in its causes, a failure to
/// connect, or a connection lost on the way.
fn classify(err: &hyper_util::client::legacy::Error) -> (Outcome, String) {
    let text = chain(err);
    let outcome = if is_tls(err) {
        Outcome::Tls
    } else if err.is_connect() {
        Outcome::ConnectFailed
    } else {
        Outcome::ConnectionLost
    };
    (outcome, text)
}

fn is_tls(err: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<rustls::Error>() {
            return true;
        }
        // An io::Error's `source` skips the error it wraps; look at it too.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && (inner.is::<rustls::Error>() || is_tls(inner))
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// The error and its causes on one line.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(cause) = current {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        current = cause.source();
    }
    text
}
