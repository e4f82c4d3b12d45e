//! A request body read whole before it is handed on (to a component or an
//! upstream): within a byte cap, and within the call's deadline, so a
//! client that sends it slowly cannot hold a slot or a task for longer.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::handlers::HttpAnswer;

pub enum Unread {
    TooLarge,
    Timeout,
    Failed(String),
}

pub async fn read_within(
    body: Incoming,
    max_bytes: usize,
    time: Duration,
) -> Result<Bytes, Unread> {
    match tokio::time::timeout(time, Limited::new(body, max_bytes).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(err)) if err.is::<LengthLimitError>() => Err(Unread::TooLarge),
        Ok(Err(err)) => Err(Unread::Failed(err.to_string())),
        Err(_) => Err(Unread::Timeout),
    }
}

/// The answer to a body that broke off or was malformed.
pub fn unreadable(err: &str) -> HttpAnswer {
    HttpAnswer::error(400, &format!("cannot read the body: {err}"))
}
