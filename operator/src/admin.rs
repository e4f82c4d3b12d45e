//! `/healthz`, `/readyz` and `/metrics` for the operator.
//!
//! Held against clients that never finish a request (slowloris): at most
//! `max_connections` are served at once (more wait in the kernel's accept
//! queue) and hyper closes a connection that has not sent a complete request
//! head within `header_timeout` (also between requests on a kept-alive one).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Ready once the process has an API client and is either leading or
/// standing by; false during shutdown.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
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
            // Prometheus and the kubelet's probes need a handful.
            max_connections: 64,
            // A scraper sends its request head at once.
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, or an IPv6 address followed by `:PORT` without
/// brackets, as `$(POD_IP):9181` expands to in a pod spec on IPv6.
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
    metrics: Metrics,
    health: Arc<Health>,
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
        let metrics = metrics.clone();
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let ready = health.ready.load(Ordering::Acquire);
                let (status, content_type, body) = answer(req.uri().path(), ready, &metrics);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The exposition format's content type: Prometheus 3 refuses a scrape
/// that has none.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin server answers on `path`: status, content type and body.
fn answer(path: &str, ready: bool, metrics: &Metrics) -> (StatusCode, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    match path {
        "/metrics" => (StatusCode::OK, METRICS_CONTENT_TYPE, metrics.render()),
        "/healthz" => (StatusCode::OK, text, "ok\n".to_string()),
        "/readyz" if ready => (StatusCode::OK, text, "ok\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "not ready\n".to_string(),
        ),
        _ => (StatusCode::NOT_FOUND, text, "not found\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::{METRICS_CONTENT_TYPE, StatusCode, answer, parse_address};
    use crate::metrics::Metrics;

    #[test]
    fn metrics_are_served_with_the_exposition_content_type() {
        let metrics = Metrics::new();
        let (status, content_type, body) = answer("/metrics", true, &metrics);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, METRICS_CONTENT_TYPE);
        assert!(body.contains("edgewire_operator_"), "{body}");
        assert_eq!(
            answer("/readyz", false, &metrics).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(answer("/nope", true, &metrics).0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn addresses_parse_with_and_without_brackets() {
        assert_eq!(
            parse_address("10.0.0.5:9181").unwrap().to_string(),
            "10.0.0.5:9181"
        );
        assert_eq!(
            parse_address("2001:db8::5:9181").unwrap().to_string(),
            "[2001:db8::5]:9181"
        );
        for bad in ["", "10.0.0.5", "pod:9181", "10.0.0.5:99999"] {
            assert!(parse_address(bad).is_err(), "{bad} parsed");
        }
    }
}
