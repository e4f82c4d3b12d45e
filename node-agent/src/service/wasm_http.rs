//! HTTP to and from a `wasm` handler: the client's request (method, path,
//! query, headers, body within the handler's cap) passed to the component,
//! its response passed back; a failure answered with its status and a JSON
//! error.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::body::{self, Unread};
use super::http::answer;
use crate::handlers::HttpAnswer;
use crate::handlers::wasm::{CallError, WasmHandler};

pub async fn serve(handler: &WasmHandler, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // The body is read within the call's deadline: a client that sends it
    // slowly leaves the component less time, and cannot hold an instance
    // slot or this task for longer.
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let body = match body::read_within(body, handler.max_request_bytes, handler.timeout()).await {
        Ok(body) => body,
        Err(Unread::Failed(err)) => return answer(body::unreadable(&err)),
        Err(Unread::TooLarge) => {
            let err = CallError::RequestTooLarge(handler.max_request_bytes);
            return failure(&handler.refused(started, err));
        }
        Err(Unread::Timeout) => {
            return failure(&handler.refused(started, CallError::Timeout(handler.timeout())));
        }
    };
    // HTTP/1.0 clients may send no Host; the component's request needs an
    // authority.
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    match handler
        .call_since(Request::from_parts(parts, Full::new(body)), started)
        .await
    {
        Ok(answer) => {
            let mut response = Response::new(Full::new(answer.body));
            *response.status_mut() =
                StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut headers = answer.headers;
            // Framing is this connection's business: hyper sets the length
            // of the whole body it sends.
            for name in [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONNECTION,
            ] {
                headers.remove(name);
            }
            *response.headers_mut() = headers;
            response
        }
        Err(err) => failure(&err),
    }
}

fn failure(err: &CallError) -> Response<Full<Bytes>> {
    refusal(HttpAnswer::error(err.status(), &err.to_string()))
}

/// An error answer; a 503 says when to try again.
pub(super) fn refusal(error: HttpAnswer) -> Response<Full<Bytes>> {
    let unavailable = error.status == 503;
    let mut response = answer(error);
    if unavailable {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
