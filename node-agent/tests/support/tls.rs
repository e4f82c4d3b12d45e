//! Client TLS for the tests, against the throwaway CA and server
//! certificates of `tests/fixtures/tls/` (made with openssl for
//! `localhost` and 127.0.0.1).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::WAIT;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// The DER of the first certificate in fixture `name`.
pub fn leaf_der(name: &str) -> Vec<u8> {
    CertificateDer::pem_file_iter(fixture(name))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// A client that trusts the test CA alone.
pub fn connector() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection whose certificate verifies for `localhost` against the
/// test CA, and the leaf certificate served; why not, when the port serves
/// no TLS, the wrong certificate or nothing.
pub async fn try_connect(addr: SocketAddr) -> Result<(TlsStream<TcpStream>, Vec<u8>), String> {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").unwrap();
    let stream = tokio::time::timeout(WAIT, connector().connect(name, tcp))
        .await
        .map_err(|_| "tls handshake timed out".to_string())?
        .map_err(|e| format!("tls handshake: {e}"))?;
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((stream, leaf))
}

/// As [`try_connect`], for a port that must serve TLS.
pub async fn connect(addr: SocketAddr) -> (TlsStream<TcpStream>, Vec<u8>) {
    try_connect(addr)
        .await
        .expect("a TLS connection whose certificate verifies against the test CA")
}

/// An HTTPS GET, with `token` as a bearer header: the status and body.
pub async fn https_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let (stream, _) = connect(addr).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut request = hyper::Request::get(path).header("host", "localhost");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("an answer");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `text` to an `echo` handler and checks the answer.
pub async fn echo_round(ws: &mut WebSocketStream<TlsStream<TcpStream>>, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a reply in time")
            .expect("open")
            .expect("no error");
        match msg {
            Message::Text(reply) => {
                assert_eq!(reply.as_str(), format!("Echo: {text}"));
                return;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}
