//! The relay requests that reach a `wasm` handler: a `call` of one, and a
//! publish on a channel with a processor; and a `call` of an `upstream`
//! handler. All await the handler, so they are resolved here, before the
//! session's synchronous request handling.

use edgewire_api::wire::{ClientMessage, ErrorCode, RequestId, ServerMessage};
use serde_json::Value;

use super::ServiceRuntime;
use crate::handlers::set::{self, JsonCallError};
use crate::metrics::DropReason;

/// What the session does with a request after this step.
pub enum Prepared {
    /// Not a wasm matter: handle it as always.
    Request(ClientMessage),
    /// Answered here.
    Reply(ServerMessage),
    /// A processed publish: deliver these messages on `channel` instead.
    Publish {
        id: Option<RequestId>,
        channel: String,
        messages: Vec<Value>,
    },
}

pub async fn prepare(runtime: &ServiceRuntime, request: ClientMessage) -> Prepared {
    match request {
        ClientMessage::Call { id, handler, args } => {
            if let Some(upstream) = runtime.handlers.upstream(&handler) {
                return match set::call_upstream(upstream, &args).await {
                    Ok(result) => Prepared::Reply(ServerMessage::Result {
                        id,
                        handler,
                        result,
                    }),
                    Err(err) => Prepared::Reply(failed(Some(id), &err)),
                };
            }
            let (Some(wasm), Some(spec)) = (
                runtime.handlers.wasm(&handler),
                runtime.config.handler(&handler),
            ) else {
                return Prepared::Request(ClientMessage::Call { id, handler, args });
            };
            let path = spec.path.as_deref().unwrap_or("/");
            match set::call_json(wasm, path, &args).await {
                Ok(result) => Prepared::Reply(ServerMessage::Result {
                    id,
                    handler,
                    result,
                }),
                Err(err) => Prepared::Reply(failed(Some(id), &err)),
            }
        }
        ClientMessage::Publish {
            id,
            channel,
            data,
            origin,
        } => {
            let Some((wasm, spec)) = runtime.config.processor(&channel).and_then(|name| {
                Some((runtime.handlers.wasm(name)?, runtime.config.handler(name)?))
            }) else {
                return Prepared::Request(ClientMessage::Publish {
                    id,
                    channel,
                    data,
                    origin,
                });
            };
            let path = spec.path.as_deref().unwrap_or("/");
            match set::process(wasm, path, &channel, &data).await {
                Ok(messages) => Prepared::Publish {
                    id,
                    channel,
                    messages,
                },
                Err(err) => {
                    runtime
                        .metrics
                        .dropped(runtime.name(), DropReason::HandlerFailed);
                    Prepared::Reply(failed(id, &err))
                }
            }
        }
        other => Prepared::Request(other),
    }
}

fn failed(id: Option<RequestId>, err: &JsonCallError) -> ServerMessage {
    ServerMessage::Error {
        id,
        code: ErrorCode::HandlerFailed,
        message: err.to_string(),
        status: Some(err.status()),
    }
}
