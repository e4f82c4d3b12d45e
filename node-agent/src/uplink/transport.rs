//! Dialling a relay hub: TCP (and TLS for `wss://`), then the WebSocket
//! handshake with the agent's bearer token and the batch subprotocol, all
//! within one deadline. Each failure has a reason for the metrics.

use std::sync::Arc;
use std::time::Duration;

use edgewire_api::HubSpec;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::service::{BATCH_SUBPROTOCOL, MAX_MESSAGE_BYTES_HEADER};

/// TCP connect, TLS and the WebSocket upgrade together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type HubSocket = WebSocketStream<Box<dyn Io>>;

/// Why the hub could not be reached; [`ConnectError::reason`] is the
/// `reason` label of `edgewire_uplink_connect_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the hub token file {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the NATS credentials file {path}: {why}")]
    Credentials { path: String, why: String },
    #[error("hub URL {0:?} is not usable: {1}")]
    Url(String, String),
    #[error("hub unreachable: {0}")]
    Unreachable(String),
    #[error("TLS with the hub failed: {0}")]
    Tls(String),
    #[error("the hub refused the credential ({0})")]
    Unauthorized(String),
    #[error("the hub refused the WebSocket upgrade (HTTP {0})")]
    Refused(u16),
    #[error("WebSocket handshake with the hub failed: {0}")]
    Handshake(String),
}

impl ConnectError {
    pub const REASONS: [&'static str; 6] = [
        "credential",
        "unreachable",
        "tls",
        "unauthorized",
        "refused",
        "handshake",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Token { .. }
            | ConnectError::Credentials { .. }
            | ConnectError::Url(..) => "credential",
            ConnectError::Unreachable(_) => "unreachable",
            ConnectError::Tls(_) => "tls",
            ConnectError::Unauthorized(_) => "unauthorized",
            ConnectError::Refused(_) => "refused",
            ConnectError::Handshake(_) => "handshake",
        }
    }

    /// Whether the attempt reached the hub and was turned away (TLS, the
    /// credential, the upgrade or the handshake failed there): each such
    /// attempt costs the hub a handshake, so it is retried more slowly than
    /// one that never reached it.
    pub fn turned_away(&self) -> bool {
        matches!(
            self,
            ConnectError::Tls(_)
                | ConnectError::Unauthorized(_)
                | ConnectError::Refused(_)
                | ConnectError::Handshake(_)
        )
    }
}

/// Opens a relay connection to the hub; with the largest message the hub
/// reads, when it says.
pub async fn connect(
    spec: &HubSpec,
    max_message_bytes: usize,
) -> Result<(HubSocket, Option<usize>), ConnectError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, dial(spec, max_message_bytes)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Unreachable(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

async fn dial(
    spec: &HubSpec,
    max_message_bytes: usize,
) -> Result<(HubSocket, Option<usize>), ConnectError> {
    let url_error = |why: String| ConnectError::Url(spec.url.clone(), why);
    let mut request = spec
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| url_error(e.to_string()))?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(BATCH_SUBPROTOCOL),
    );
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| url_error("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = spec.is_tls();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| ConnectError::Unreachable(format!("{host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    // Read once the hub answered, so an absent hub is reported as such.
    if let Some(token) = read_token(spec).await? {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| url_error("the token file does not hold a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let stream: Box<dyn Io> = if tls {
        let connector = tls_connector(spec).map_err(ConnectError::Tls)?;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| ConnectError::Tls(format!("{host}: {e}")))?;
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Tls(e.to_string()))?,
        )
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message_bytes.max(1 << 20) * 2))
        .max_frame_size(Some(max_message_bytes.max(1 << 20) * 2));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((socket, response)) => {
            let hub_max = response
                .headers()
                .get(MAX_MESSAGE_BYTES_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            Ok((socket, hub_max))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            Err(if matches!(status, 401 | 403) {
                ConnectError::Unauthorized(format!("HTTP {status}"))
            } else {
                ConnectError::Refused(status)
            })
        }
        Err(err) => Err(ConnectError::Handshake(err.to_string())),
    }
}

/// The token in `tokenFile` (without surrounding whitespace), read anew at
/// each connect so a rotated token is used from the next one.
pub async fn read_token(spec: &HubSpec) -> Result<Option<String>, ConnectError> {
    let Some(path) = &spec.token_file else {
        return Ok(None);
    };
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| ConnectError::Token {
            path: path.clone(),
            source,
        })?;
    Ok(Some(token.trim().to_string()))
}

/// TLS towards the hub: its certificate must chain to `caFile`, or to the
/// system's roots.
fn tls_connector(spec: &HubSpec) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &spec.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read caFile {path}: {e}"))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("caFile {path}: {e}"))?;
                roots.add(cert).map_err(|e| format!("caFile {path}: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to check the hub against".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
