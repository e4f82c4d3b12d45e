//! HTTP to and from an `upstream` handler: the client's request (method,
//! query, headers, body within the handler's cap) forwarded, the upstream's
//! answer passed back; a forward that got no answer is answered with its
//! status and a JSON body naming the reason.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::body::{self, Unread};
use super::http::answer;
use super::wasm_http::refusal;
use crate::handlers::HttpAnswer;
use crate::handlers::upstream::{self, UpstreamError, UpstreamHandler};

pub async fn serve(handler: &UpstreamHandler, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let body = match body::read_within(body, handler.max_request_bytes(), handler.timeout()).await {
        Ok(body) => body,
        Err(Unread::TooLarge) => {
            let err = UpstreamError::RequestTooLarge(handler.max_request_bytes());
            return failure(&handler.refused(started, err));
        }
        Err(Unread::Timeout) => {
            return failure(&handler.refused(started, UpstreamError::Timeout(handler.timeout())));
        }
        Err(Unread::Failed(err)) => return answer(body::unreadable(&err)),
    };
    match handler
        .forward(
            started,
            parts.method,
            parts.uri.query(),
            &parts.headers,
            body,
        )
        .await
    {
        Ok(answer) => {
            let mut response = Response::new(Full::new(answer.body));
            *response.status_mut() =
                StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            *response.headers_mut() = upstream::response_headers(&answer.headers);
            response
        }
        Err(err) => failure(&err),
    }
}

fn failure(err: &UpstreamError) -> Response<Full<Bytes>> {
    refusal(HttpAnswer {
        status: err.status(),
        content_type: "application/json",
        body: json!({ "error": err.to_string(), "reason": err.reason() }).to_string(),
    })
}
