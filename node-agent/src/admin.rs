//! The admin endpoint: `/metrics` for Prometheus, `/healthz` (the process
//! answers) and `/readyz` (every configured service listens), with the status
//! of each service as JSON.
//!
//! It holds against clients that open connections and never finish a
//! request (slowloris): at most `max_connections` are served at once (more
//! wait in the kernel's accept queue) and a connection that has not sent a
//! complete request head within `header_timeout` (also between requests on
//! a kept-alive connection) is closed by hyper.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// How much of itself the admin server gives to its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time to send a complete request head, from the connection's start or
    /// the previous response.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // Prometheus, the kubelet's probes and an operator's curl need
            // a handful; the rest is headroom.
            max_connections: 64,
            // A scraper sends its request head at once; a client that has
            // not in 10 s is not a scraper.
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, or an IPv6 address followed by `:PORT` without
/// brackets, as `$(NODE_IP):9180` expands to in a pod spec on an IPv6 node.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not IP:PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    limits: Limits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // A free slot first: at the cap, new connections wait in the accept
        // queue instead of taking memory and a task each.
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let agent = Arc::clone(&agent);
                async move { Ok::<_, Infallible>(route(&agent, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn route(agent: &Agent, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            agent.metrics().render(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let ready = agent.is_ready().await;
            let body = serde_json::json!({
                "ready": ready,
                "services": agent.status().await,
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", body.to_string())
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::parse_address;

    #[test]
    fn addresses_parse_with_and_without_brackets() {
        assert_eq!(
            parse_address("10.0.0.5:9180").unwrap().to_string(),
            "10.0.0.5:9180"
        );
        assert_eq!(
            parse_address("[2001:db8::5]:9180").unwrap().to_string(),
            "[2001:db8::5]:9180"
        );
        assert_eq!(
            parse_address("2001:db8::5:9180").unwrap().to_string(),
            "[2001:db8::5]:9180"
        );
        for bad in ["", "10.0.0.5", "node-1:9180", "10.0.0.5:99999", ":9180"] {
            assert!(parse_address(bad).is_err(), "{bad} parsed");
        }
    }
}
