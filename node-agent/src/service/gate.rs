//! Where a service's connections meet its token rules: at the HTTP request or
//! WebSocket upgrade (401/403), per relay request (an `error` reply with code
//! `forbidden`), and at the token's expiry (close code 4401). The decisions
//! are `auth`'s; this counts them and words the answers.

use std::future::Future;
use std::time::SystemTime;

use bytes::Bytes;
use edgewire_api::wire::{ErrorCode, RequestId, WireError};
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::ServiceRuntime;
use crate::auth::{Access, Action, Decision, Refusal, token};

/// The close code of a connection whose token expired: private use range
/// (RFC 6455 §7.4.2), 4000 + the HTTP status a fresh request would get.
pub const TOKEN_EXPIRED: u16 = 4401;

/// Counts every decision series of a service at zero, so dashboards see them.
pub fn init_metrics(runtime: &ServiceRuntime) {
    if runtime.auth.is_some() {
        for decision in Decision::all() {
            runtime.metrics.auth_init(runtime.name(), decision.labels());
        }
    }
}

/// Why a request was turned away before reaching a handler or the relay.
#[derive(Debug)]
pub enum Turned {
    /// 401: no token where one is needed, or a token that fails.
    Unauthorized(Refusal),
    /// 403: a valid token (or anonymous access) that does not grant calling
    /// this handler.
    Forbidden { handler: String },
}

impl Turned {
    pub fn response(self) -> Response<Full<Bytes>> {
        match self {
            Turned::Unauthorized(refusal) => unauthorized(refusal),
            Turned::Forbidden { handler } => error_response(
                StatusCode::FORBIDDEN,
                &format!("this token does not allow calling handler {handler:?}"),
            ),
        }
    }
}

/// The access a request's token grants, or why it is refused (401).
pub fn admit(
    runtime: &ServiceRuntime,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Access, Turned> {
    let Some(auth) = &runtime.auth else {
        return Ok(Access::open());
    };
    let token = token::from_request(headers, query);
    let decided = auth.authenticate(token.as_deref());
    let decision = match &decided {
        Ok(_) if token.is_some() => Decision::AcceptedToken,
        Ok(_) => Decision::AcceptedAnonymous,
        Err(refusal) => Decision::Rejected(*refusal),
    };
    runtime.metrics.auth(runtime.name(), decision.labels());
    decided.map_err(Turned::Unauthorized)
}

/// As [`admit`], for a request that calls `handler`: 403 when the access does
/// not allow it.
pub fn admit_call(
    runtime: &ServiceRuntime,
    headers: &HeaderMap,
    query: Option<&str>,
    handler: &str,
) -> Result<Access, Turned> {
    let access = admit(runtime, headers, query)?;
    if access.allows(Action::Call, handler) {
        Ok(access)
    } else {
        runtime
            .metrics
            .auth(runtime.name(), Decision::Denied(Action::Call).labels());
        Err(Turned::Forbidden {
            handler: handler.to_string(),
        })
    }
}

/// A relay request's permission: the `forbidden` error reply when the
/// connection's access does not allow `action` on `name`.
pub fn permit(
    runtime: &ServiceRuntime,
    access: &Access,
    id: &Option<RequestId>,
    action: Action,
    name: &str,
) -> Result<(), WireError> {
    if access.allows(action, name) {
        return Ok(());
    }
    runtime
        .metrics
        .auth(runtime.name(), Decision::Denied(action).labels());
    let what = match action {
        Action::Subscribe => "subscribing to channel",
        Action::Publish => "publishing to channel",
        Action::Call => "calling handler",
        Action::Forward => "forwarding the messages of node",
    };
    Err(WireError::new(
        id.clone(),
        ErrorCode::Forbidden,
        format!("this token does not allow {what} {name:?}"),
    ))
}

/// Resolves when the connection's access ends (never for open or anonymous
/// access). Judged by this machine's clock, as the token's `exp` was.
pub fn expiry(access: &Access) -> impl Future<Output = ()> + Send + 'static {
    let left = access.time_left(SystemTime::now());
    async move {
        match left {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    }
}

/// What a live connection is closed with when its token expires, counted.
pub fn expired(runtime: &ServiceRuntime) -> (CloseCode, &'static str) {
    runtime
        .metrics
        .auth(runtime.name(), Decision::Expired.labels());
    (CloseCode::from(TOKEN_EXPIRED), "token expired")
}

fn unauthorized(refusal: Refusal) -> Response<Full<Bytes>> {
    let mut response = error_response(StatusCode::UNAUTHORIZED, refusal.message());
    // RFC 6750 §3: the scheme, and why a presented token failed.
    let challenge = match refusal {
        Refusal::MissingToken => "Bearer realm=\"edgewire\"".to_string(),
        other => format!(
            "Bearer realm=\"edgewire\", error=\"invalid_token\", error_description=\"{}\"",
            other.as_str()
        ),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
