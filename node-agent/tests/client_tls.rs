//! Client TLS against a real agent process: `wss://` and `https://` with the
//! certificate from files, and a rotated certificate served to new
//! connections while an open one carries on.
//!
//! `tests/fixtures/tls/` holds a throwaway CA certificate and two server
//! certificates it signed (for 127.0.0.1), made for these tests with openssl.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn leaf_der(name: &str) -> Vec<u8> {
    CertificateDer::pem_file_iter(fixture(name))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Replaces `path` in one step, as a Secret volume's update does.
fn replace(path: &Path, from: &Path) {
    let staged = path.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn connector() -> tokio_rustls::TlsConnector {
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

/// A verified TLS connection and the leaf certificate the agent served.
async fn tls_connect(addr: SocketAddr) -> (TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tokio::time::timeout(WAIT, connector().connect(name, tcp))
        .await
        .expect("tls handshake in time")
        .expect("the certificate verifies against the test CA");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, leaf)
}

async fn https_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (stream, _) = tls_connect(addr).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("an answer");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn echo_round(ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>, text: &str) {
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

#[tokio::test]
async fn wss_and_https_from_files_and_a_rotation_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    replace(&cert, &fixture("server1.pem"));
    replace(&key, &fixture("server1.key"));
    let agent = AgentProcess::start(&format!(
        r#"
services:
  - name: edge
    port: 0
    handlers:
      - {{name: echo, kind: echo, path: /}}
      - {{name: add, kind: add, path: /add}}
    tls:
      certFile: {}
      keyFile: {}
"#,
        cert.display(),
        key.display()
    ))
    .await;
    let addr = agent.service_addr("edge").await;

    let (stream, served) = tls_connect(addr).await;
    assert_eq!(served, leaf_der("server1.pem"));
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/"), stream)
        .await
        .expect("wss upgrade");
    echo_round(&mut ws, "over tls").await;
    assert_eq!(
        https_get(addr, "/add?a=1&b=2").await,
        (200, r#"{"result":3}"#.into())
    );

    // Half a rotation (the new certificate, the old key) is not served: the
    // pair that works stays.
    replace(&cert, &fixture("server2.pem"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, served) = tls_connect(addr).await;
    assert_eq!(
        served,
        leaf_der("server1.pem"),
        "a mismatched pair was served"
    );

    replace(&key, &fixture("server2.key"));
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, served) = tls_connect(addr).await;
        if served == leaf_der("server2.pem") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not picked up; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection opened before the rotation was not dropped.
    echo_round(&mut ws, "still here").await;
    assert_eq!(
        https_get(addr, "/add?a=2&b=2").await,
        (200, r#"{"result":4}"#.into())
    );
}
