//! One service's handlers by name, built when the service starts, and the
//! two ways of calling a `wasm` handler that are not plain HTTP: a relay
//! `call` (JSON args in, JSON result out) and a channel processor (a
//! message's data in, the messages to deliver out).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use edgewire_api::{HandlerKind, ServiceConfig};
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::upstream::{UpstreamError, UpstreamHandler};
use super::wasm::{CallError, ModuleError, WasmHandler, WasmRuntime};
use crate::metrics::Metrics;

#[derive(Clone)]
pub enum Handler {
    Builtin(HandlerKind),
    Wasm(Arc<WasmHandler>),
    Upstream(Arc<UpstreamHandler>),
}

#[derive(Clone, Default)]
pub struct HandlerSet {
    by_name: BTreeMap<String, Handler>,
}

/// The header that names the channel a processor is called for.
pub const CHANNEL_HEADER: &str = "edgewire-channel";

impl HandlerSet {
    /// Loads each `wasm` handler's module; their file watchers end at `stop`.
    pub async fn build(
        config: &ServiceConfig,
        metrics: &Metrics,
        wasm: &WasmRuntime,
        stop: &CancellationToken,
    ) -> HandlerSet {
        let mut by_name = BTreeMap::new();
        for spec in &config.handlers {
            let handler = match spec.kind {
                HandlerKind::Wasm => Handler::Wasm(
                    WasmHandler::start(spec, &config.name, metrics, wasm, stop.clone()).await,
                ),
                HandlerKind::Upstream => Handler::Upstream(UpstreamHandler::start(
                    spec,
                    &config.name,
                    metrics,
                    config.auth.is_some(),
                )),
                kind => Handler::Builtin(kind),
            };
            by_name.insert(spec.name.clone(), handler);
        }
        HandlerSet { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Handler> {
        self.by_name.get(name)
    }

    pub fn wasm(&self, name: &str) -> Option<&Arc<WasmHandler>> {
        match self.by_name.get(name) {
            Some(Handler::Wasm(handler)) => Some(handler),
            _ => None,
        }
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamHandler>> {
        match self.by_name.get(name) {
            Some(Handler::Upstream(handler)) => Some(handler),
            _ => None,
        }
    }

    /// Each `wasm` handler's module: its digest, or why it has none.
    pub fn modules(&self) -> Vec<(String, Result<String, ModuleError>)> {
        self.by_name
            .iter()
            .filter_map(|(name, handler)| match handler {
                Handler::Wasm(wasm) => Some((name.clone(), wasm.module_status())),
                Handler::Builtin(_) | Handler::Upstream(_) => None,
            })
            .collect()
    }
}

/// A POST of `body` as JSON to the component, as the relay's `call` and a
/// channel processor make it.
fn json_post(path: &str, body: &Value, channel: Option<&str>) -> hyper::Request<Full<Bytes>> {
    let mut request = hyper::Request::new(Full::new(Bytes::from(body.to_string())));
    *request.method_mut() = hyper::Method::POST;
    // The component sees the handler's own path; only the authority is
    // made up, as for any request without one.
    if let Ok(uri) = hyper::Uri::builder()
        .scheme("http")
        .authority("localhost")
        .path_and_query(path)
        .build()
    {
        *request.uri_mut() = uri;
    }
    let headers = request.headers_mut();
    headers.insert(header::HOST, HeaderValue::from_static("localhost"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(channel) = channel.and_then(|c| HeaderValue::from_str(c).ok()) {
        headers.insert(CHANNEL_HEADER, channel);
    }
    request
}

/// Why a relay `call` of a `wasm` or `upstream` handler has no result.
#[derive(Debug, thiserror::Error)]
pub enum JsonCallError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The component answered, but not with 2xx: the status and its body.
    #[error("the handler answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the handler's answer is not JSON: {0}")]
    NotJson(String),
}

impl JsonCallError {
    /// The HTTP status the failure stands for.
    pub fn status(&self) -> u16 {
        match self {
            JsonCallError::Call(err) => err.status(),
            JsonCallError::Upstream(err) => err.status(),
            JsonCallError::Status { status, .. } => *status,
            JsonCallError::NotJson(_) => 502,
        }
    }
}

/// A relay `call`: `args` as the JSON body of a POST to the handler's path
/// (`/` when it has none); the JSON response body is the result.
pub async fn call_json(
    handler: &WasmHandler,
    path: &str,
    args: &Value,
) -> Result<Value, JsonCallError> {
    let answer = handler.call(json_post(path, args, None)).await?;
    success(answer.status, &answer.body)?;
    serde_json::from_slice(&answer.body).map_err(|err| JsonCallError::NotJson(err.to_string()))
}

/// A relay `call` of an `upstream` handler: `args` POSTed as JSON to its
/// url; the JSON response body is the result.
pub async fn call_upstream(
    handler: &UpstreamHandler,
    args: &Value,
) -> Result<Value, JsonCallError> {
    let answer = handler.call_json(args).await?;
    success(answer.status, &answer.body)?;
    serde_json::from_slice(&answer.body).map_err(|err| JsonCallError::NotJson(err.to_string()))
}

/// A channel processor: the message's `data` as the JSON body of a POST
/// (header `edgewire-channel` names the channel); the answer must be a JSON
/// array, each element the `data` of one message to deliver instead.
pub async fn process(
    handler: &WasmHandler,
    path: &str,
    channel: &str,
    data: &Value,
) -> Result<Vec<Value>, JsonCallError> {
    let answer = handler.call(json_post(path, data, Some(channel))).await?;
    success(answer.status, &answer.body)?;
    match serde_json::from_slice(&answer.body) {
        Ok(Value::Array(messages)) => Ok(messages),
        Ok(other) => Err(JsonCallError::NotJson(format!(
            "a processor answers a JSON array of messages, got {}",
            kind_of(&other)
        ))),
        Err(err) => Err(JsonCallError::NotJson(err.to_string())),
    }
}

fn success(status: u16, body: &[u8]) -> Result<(), JsonCallError> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        let mut body = String::from_utf8_lossy(body).into_owned();
        body.truncate(body.floor_char_boundary(512));
        Err(JsonCallError::Status { status, body })
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
