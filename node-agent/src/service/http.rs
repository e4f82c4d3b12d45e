//! HTTP for one service connection: routes each request to a handler, the
//! relay, or a WebSocket upgrade.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use edgewire_api::{HandlerKind, HandlerSpec};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::batch;
use super::socket::ClientSocket;
use super::transport::Transport;
use super::websocket::{self, Mode};
use super::{ServiceRuntime, gate};
use crate::auth::Access;
use crate::handlers::{self, Handler, HttpAnswer};
use crate::metrics::Outcome;

/// The upgrade answer's header naming the largest message the service reads.
pub const MAX_MESSAGE_BYTES_HEADER: &str = "edgewire-max-message-bytes";

/// How long an HTTP connection that is mid-request gets to finish when the
/// service stops.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn serve_connection<S>(runtime: Arc<ServiceRuntime>, io: S, accepted_at: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let runtime = Arc::clone(&runtime);
        service_fn(move |req| {
            let runtime = Arc::clone(&runtime);
            async move { Ok::<_, Infallible>(route(&runtime, req, accepted_at).await) }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(runtime.handshake_timeout());
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                if err.is_timeout() {
                    runtime.metrics.connection(runtime.name(), Outcome::HandshakeTimeout);
                }
                tracing::debug!(service = runtime.name(), %err, "http connection ended");
            }
        }
        _ = runtime.stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HTTP_DRAIN, conn).await;
        }
    }
}

async fn route(
    runtime: &Arc<ServiceRuntime>,
    req: Request<Incoming>,
    accepted_at: Instant,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let wants_upgrade = is_websocket_upgrade(req.headers());
    if path == runtime.config.relay_path {
        return if wants_upgrade {
            let batch = batch::asks_for_batch(
                req.headers()
                    .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            match gate::admit(runtime, req.headers(), req.uri().query()) {
                Ok(access) => upgrade(runtime, req, Mode::Relay { batch }, access, accepted_at),
                Err(turned) => turned.response(),
            }
        } else {
            upgrade_required("the relay speaks WebSocket")
        };
    }
    let Some(handler) = runtime
        .config
        .handlers
        .iter()
        .find(|h| h.path.as_deref() == Some(path))
    else {
        return answer(HttpAnswer::error(404, &format!("no handler at {path}")));
    };
    let access = match gate::admit_call(runtime, req.headers(), req.uri().query(), &handler.name) {
        Ok(access) => access,
        Err(turned) => return turned.response(),
    };
    match runtime.handlers.get(&handler.name) {
        Some(Handler::Wasm(_) | Handler::Upstream(_)) if wants_upgrade => {
            return answer(HttpAnswer::error(
                400,
                &format!("handler {:?} answers HTTP, not WebSocket", handler.name),
            ));
        }
        Some(Handler::Wasm(wasm)) => {
            let wasm = Arc::clone(wasm);
            return super::wasm_http::serve(&wasm, req).await;
        }
        Some(Handler::Upstream(upstream)) => {
            let upstream = Arc::clone(upstream);
            return super::upstream_http::serve(&upstream, req).await;
        }
        Some(Handler::Builtin(_)) | None => {}
    }
    if wants_upgrade {
        return match handler.kind {
            HandlerKind::Echo => upgrade(
                runtime,
                req,
                Mode::Echo {
                    handler: handler.name.clone(),
                },
                access,
                accepted_at,
            ),
            HandlerKind::Add | HandlerKind::Wasm | HandlerKind::Upstream => {
                answer(HttpAnswer::error(
                    400,
                    &format!(
                        "handler {:?} answers HTTP GET; over WebSocket, call it through the relay at {}",
                        handler.name, runtime.config.relay_path
                    ),
                ))
            }
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = answer(HttpAnswer::error(405, "only GET is allowed"));
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    answer(run_handler(runtime, handler, req.uri().query()))
}

fn run_handler(runtime: &ServiceRuntime, handler: &HandlerSpec, query: Option<&str>) -> HttpAnswer {
    let started = Instant::now();
    let answer = handlers::http_get(handler.kind, query);
    runtime
        .metrics
        .handler_duration
        .with_label_values(&[runtime.name(), &handler.name])
        .observe(started.elapsed().as_secs_f64());
    answer
}

pub(super) fn answer(answer: HttpAnswer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(answer.content_type),
    );
    response
}

fn upgrade_required(why: &str) -> Response<Full<Bytes>> {
    let mut response = answer(HttpAnswer::error(426, why));
    response
        .headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    response
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
}

/// Answers an RFC 6455 opening handshake and hands the upgraded socket to a
/// WebSocket session.
fn upgrade(
    runtime: &Arc<ServiceRuntime>,
    mut req: Request<Incoming>,
    mode: Mode,
    access: Access,
    accepted_at: Instant,
) -> Response<Full<Bytes>> {
    let service = runtime.name();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let (Some(key), true, true) = (key, version_ok, req.method() == Method::GET) else {
        runtime
            .metrics
            .connection(service, Outcome::HandshakeFailed);
        let mut response = answer(HttpAnswer::error(
            400,
            "a WebSocket upgrade needs GET, Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
        ));
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    };
    let Some(slot) = runtime.try_open() else {
        runtime.metrics.connection(service, Outcome::RejectedLimit);
        let mut response = answer(HttpAnswer::error(503, "connection limit reached"));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };

    let batch = matches!(mode, Mode::Relay { batch: true });
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_runtime = Arc::clone(runtime);
    runtime.tracker.spawn(async move {
        let runtime = task_runtime;
        match on_upgrade.await {
            Ok(upgraded) => {
                // The plain socket back from hyper: its read buffer and boxing
                // are not kept for the life of the connection.
                let (io, read_buf) = match upgraded.downcast::<TokioIo<TcpStream>>() {
                    Ok(parts) => (Transport::from(parts.io.into_inner()), parts.read_buf),
                    Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
                        Ok(parts) => (Transport::from(parts.io.into_inner()), parts.read_buf),
                        Err(_) => {
                            runtime
                                .metrics
                                .connection(runtime.name(), Outcome::HandshakeFailed);
                            tracing::error!(
                                service = runtime.name(),
                                "upgraded connection is neither TCP nor TLS"
                            );
                            return;
                        }
                    },
                };
                // Copied out: the bytes hyper read behind the handshake sit in
                // its read buffer, which must not live as long as the session.
                let socket = ClientSocket::new(io, &read_buf);
                drop(read_buf);
                let ws =
                    WebSocketStream::from_raw_socket(socket, Role::Server, Some(runtime.ws_config))
                        .await;
                runtime
                    .metrics
                    .handshake_duration
                    .with_label_values(&[runtime.name()])
                    .observe(accepted_at.elapsed().as_secs_f64());
                runtime
                    .metrics
                    .connection(runtime.name(), Outcome::Accepted);
                websocket::run(runtime, ws, mode, access, slot).await;
            }
            Err(err) => {
                runtime
                    .metrics
                    .connection(runtime.name(), Outcome::HandshakeFailed);
                tracing::debug!(service = runtime.name(), %err, "upgrade failed");
            }
        }
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if batch {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(batch::SUBPROTOCOL),
        );
    }
    // The largest message this service reads; a larger one closes the
    // connection (1009). An edge's hub link reads this so it never sends
    // one that would close the link at every attempt.
    headers.insert(
        MAX_MESSAGE_BYTES_HEADER,
        HeaderValue::from(runtime.config.limits.max_message_bytes),
    );
    response
}
