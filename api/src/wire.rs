//! The relay's wire protocol: JSON text frames, one message each, with a `type`.
//!
//! Client to agent: `subscribe`, `unsubscribe`, `publish`, `call`.
//! Agent to client: `subscribed`, `unsubscribed`, `published`, `message`,
//! `result`, `error`. Requests may carry an `id` (string or non-negative integer;
//! required for `call`), which the reply repeats. The README shows a full session.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

const MAX_ID_LEN: usize = 128;
/// The longest node name an origin may carry (a Kubernetes node name).
const MAX_ORIGIN_NODE_LEN: usize = 253;

/// Where a publish first entered the relay, for a message an edge agent
/// forwards to its hub: the edge's node name and the message's sequence
/// number in that node's uplink queue. The hub delivers each (node,
/// channel) sequence once, so a resend after a lost acknowledgement is
/// dropped, and an edge recognises its own messages coming back down.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub node: String,
    pub seq: u64,
}

/// A client's request id, echoed in the reply.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Number(u64),
    Text(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    Subscribe {
        id: Option<RequestId>,
        channel: String,
    },
    Unsubscribe {
        id: Option<RequestId>,
        channel: String,
    },
    Publish {
        id: Option<RequestId>,
        channel: String,
        data: Value,
        /// Set by an edge agent forwarding to its hub; absent from clients.
        origin: Option<Origin>,
    },
    Call {
        id: RequestId,
        handler: String,
        args: Value,
    },
}

impl ClientMessage {
    pub fn id(&self) -> Option<&RequestId> {
        match self {
            ClientMessage::Subscribe { id, .. }
            | ClientMessage::Unsubscribe { id, .. }
            | ClientMessage::Publish { id, .. } => id.as_ref(),
            ClientMessage::Call { id, .. } => Some(id),
        }
    }

    /// The JSON a client sends for this request.
    pub fn to_json(&self) -> String {
        let mut map = Map::new();
        let (kind, id) = match self {
            ClientMessage::Subscribe { id, channel } => {
                map.insert("channel".into(), Value::from(channel.as_str()));
                ("subscribe", id.as_ref())
            }
            ClientMessage::Unsubscribe { id, channel } => {
                map.insert("channel".into(), Value::from(channel.as_str()));
                ("unsubscribe", id.as_ref())
            }
            ClientMessage::Publish {
                id,
                channel,
                data,
                origin,
            } => {
                map.insert("channel".into(), Value::from(channel.as_str()));
                map.insert("data".into(), data.clone());
                if let Some(origin) = origin {
                    map.insert(
                        "origin".into(),
                        serde_json::to_value(origin).unwrap_or(Value::Null),
                    );
                }
                ("publish", id.as_ref())
            }
            ClientMessage::Call { id, handler, args } => {
                map.insert("handler".into(), Value::from(handler.as_str()));
                map.insert("args".into(), args.clone());
                ("call", Some(id))
            }
        };
        map.insert("type".into(), Value::from(kind));
        if let Some(id) = id {
            map.insert("id".into(), serde_json::to_value(id).unwrap_or(Value::Null));
        }
        Value::Object(map).to_string()
    }
}

/// What the agent sends to a relay client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Subscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        channel: String,
    },
    Unsubscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        channel: String,
    },
    Published {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        channel: String,
    },
    Message {
        channel: String,
        data: Value,
        /// For a message an edge agent forwarded: where it came from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<Origin>,
    },
    Result {
        id: RequestId,
        handler: String,
        result: Value,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        /// For `handler_failed`: the HTTP status the handler's failure
        /// stands for (its own non-2xx answer, or 500, 503, 504 ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Why a request was refused; also the `reason` label of the drop counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    UnknownType,
    UnknownChannel,
    UnknownHandler,
    InvalidArguments,
    /// A `wasm` handler failed or answered non-2xx; `status` says how.
    HandlerFailed,
    /// The client's token (or, without one, the service's anonymous grants)
    /// does not allow this subscribe, publish or call.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::UnknownHandler => "unknown_handler",
            ErrorCode::InvalidArguments => "invalid_arguments",
            ErrorCode::HandlerFailed => "handler_failed",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// A request the agent cannot act on, with what to tell the client.
#[derive(Clone, Debug, PartialEq, Error)]
#[error("{message}")]
pub struct WireError {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            id,
            code,
            message: message.into(),
        }
    }

    pub fn to_server_message(&self) -> ServerMessage {
        ServerMessage::Error {
            id: self.id.clone(),
            code: self.code,
            message: self.message.clone(),
            status: None,
        }
    }
}

/// Parses one text frame from a relay client.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, WireError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| WireError::new(None, ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(WireError::new(
            None,
            ErrorCode::InvalidRequest,
            "a request must be a JSON object with a \"type\"",
        ));
    };
    // The id is read first so that every later error can be correlated.
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(raw) => Some(parse_id(raw)?),
    };
    let err = |code, message: String| WireError::new(id.clone(), code, message);
    let kind = match map.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(_) => {
            return Err(err(
                ErrorCode::InvalidRequest,
                "\"type\" must be a string".into(),
            ));
        }
        None => {
            return Err(err(
                ErrorCode::InvalidRequest,
                "missing \"type\"; expected one of subscribe, unsubscribe, publish, call".into(),
            ));
        }
    };
    let mut fields = Fields {
        map,
        kind: &kind,
        id: &id,
    };
    let message = match kind.as_str() {
        "subscribe" => ClientMessage::Subscribe {
            channel: fields.string("channel")?,
            id: id.clone(),
        },
        "unsubscribe" => ClientMessage::Unsubscribe {
            channel: fields.string("channel")?,
            id: id.clone(),
        },
        "publish" => ClientMessage::Publish {
            channel: fields.string("channel")?,
            data: fields.any("data")?,
            origin: fields.origin()?,
            id: id.clone(),
        },
        "call" => {
            let handler = fields.string("handler")?;
            let args = fields
                .map
                .remove("args")
                .unwrap_or(Value::Object(Map::new()));
            let Some(call_id) = id.clone() else {
                return Err(err(
                    ErrorCode::InvalidRequest,
                    "\"call\" needs an \"id\" to carry its result".into(),
                ));
            };
            ClientMessage::Call {
                id: call_id,
                handler,
                args,
            }
        }
        other => {
            return Err(err(
                ErrorCode::UnknownType,
                format!(
                    "unknown type {other:?}; expected one of subscribe, unsubscribe, publish, call"
                ),
            ));
        }
    };
    fields.finish()?;
    Ok(message)
}

fn parse_id(raw: Value) -> Result<RequestId, WireError> {
    let bad = |why: &str| WireError::new(None, ErrorCode::InvalidRequest, why.to_string());
    match raw {
        Value::String(s) if s.len() <= MAX_ID_LEN => Ok(RequestId::Text(s)),
        Value::String(_) => Err(bad("\"id\" must be at most 128 bytes")),
        Value::Number(n) => n
            .as_u64()
            .map(RequestId::Number)
            .ok_or_else(|| bad("\"id\" must be a string or a non-negative integer")),
        _ => Err(bad("\"id\" must be a string or a non-negative integer")),
    }
}

/// Takes named fields out of a request, so that what is left over can be
/// reported as unknown.
struct Fields<'a> {
    map: Map<String, Value>,
    kind: &'a str,
    id: &'a Option<RequestId>,
}

impl Fields<'_> {
    fn error(&self, message: String) -> WireError {
        WireError::new(self.id.clone(), ErrorCode::InvalidRequest, message)
    }

    fn string(&mut self, name: &str) -> Result<String, WireError> {
        match self.map.remove(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.error(format!("\"{name}\" must be a string"))),
            None => Err(self.error(format!("{:?} needs \"{name}\"", self.kind))),
        }
    }

    fn any(&mut self, name: &str) -> Result<Value, WireError> {
        self.map
            .remove(name)
            .ok_or_else(|| self.error(format!("{:?} needs \"{name}\"", self.kind)))
    }

    /// The optional `origin` of a forwarded publish: `{"node": ..., "seq": ...}`.
    fn origin(&mut self) -> Result<Option<Origin>, WireError> {
        let Some(raw) = self.map.remove("origin") else {
            return Ok(None);
        };
        match serde_json::from_value::<Origin>(raw) {
            Ok(origin) if !origin.node.is_empty() && origin.node.len() <= MAX_ORIGIN_NODE_LEN => {
                Ok(Some(origin))
            }
            _ => Err(self.error(format!(
                "\"origin\" must be {{\"node\": a name of 1 to {MAX_ORIGIN_NODE_LEN} bytes, \"seq\": a non-negative integer}}"
            ))),
        }
    }

    fn finish(self) -> Result<(), WireError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(extra) => Err(self.error(format!("unknown field {extra:?} in {:?}", self.kind))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_each_request() {
        assert_eq!(
            parse_client_message(r#"{"type":"subscribe","channel":"chat","id":1}"#).unwrap(),
            ClientMessage::Subscribe {
                id: Some(RequestId::Number(1)),
                channel: "chat".into()
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"publish","channel":"chat","data":{"t":21.5}}"#)
                .unwrap(),
            ClientMessage::Publish {
                id: None,
                channel: "chat".into(),
                data: json!({"t": 21.5}),
                origin: None,
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"call","id":"r1","handler":"add","args":{"a":1}}"#)
                .unwrap(),
            ClientMessage::Call {
                id: RequestId::Text("r1".into()),
                handler: "add".into(),
                args: json!({"a": 1})
            }
        );
    }

    #[test]
    fn to_json_parses_back() {
        for message in [
            ClientMessage::Unsubscribe {
                id: Some(RequestId::Text("x".into())),
                channel: "a".into(),
            },
            ClientMessage::Publish {
                id: None,
                channel: "a".into(),
                data: json!([1, "two"]),
                origin: None,
            },
            ClientMessage::Publish {
                id: Some(RequestId::Number(9)),
                channel: "a".into(),
                data: json!({"t": 1}),
                origin: Some(Origin {
                    node: "edge-1".into(),
                    seq: 9,
                }),
            },
            ClientMessage::Call {
                id: RequestId::Number(7),
                handler: "add".into(),
                args: json!({"a": 1, "b": 2}),
            },
        ] {
            assert_eq!(parse_client_message(&message.to_json()).unwrap(), message);
        }
    }

    /// Found by the `relay_message` fuzz target: a published number must reach
    /// subscribers as the number the publisher sent, to the last bit.
    #[test]
    fn published_numbers_are_read_exactly() {
        let text = r#"{"type":"publish","channel":"n","data":{"x":2.11122e59,"y":0.1}}"#;
        let message = parse_client_message(text).unwrap();
        let ClientMessage::Publish { data, .. } = &message else {
            panic!("{message:?}");
        };
        assert_eq!(data["x"].as_f64(), Some(2.11122e59));
        assert_eq!(data["y"].as_f64(), Some(0.1));
        assert_eq!(parse_client_message(&message.to_json()).unwrap(), message);
    }

    #[test]
    fn errors_carry_code_and_id() {
        let cases = [
            ("{not json", ErrorCode::InvalidJson, None),
            ("[1,2]", ErrorCode::InvalidRequest, None),
            (r#"{"id":"q"}"#, ErrorCode::InvalidRequest, Some("q")),
            (
                r#"{"type":"shout","id":"q"}"#,
                ErrorCode::UnknownType,
                Some("q"),
            ),
            (
                r#"{"type":"subscribe","id":"q"}"#,
                ErrorCode::InvalidRequest,
                Some("q"),
            ),
            (
                r#"{"type":"subscribe","channel":5,"id":"q"}"#,
                ErrorCode::InvalidRequest,
                Some("q"),
            ),
            (
                r#"{"type":"subscribe","channel":"a","colour":"red","id":"q"}"#,
                ErrorCode::InvalidRequest,
                Some("q"),
            ),
            (
                r#"{"type":"publish","channel":"a"}"#,
                ErrorCode::InvalidRequest,
                None,
            ),
            (
                r#"{"type":"call","handler":"add"}"#,
                ErrorCode::InvalidRequest,
                None,
            ),
            (
                r#"{"type":"call","handler":"add","id":-1}"#,
                ErrorCode::InvalidRequest,
                None,
            ),
        ];
        for (text, code, id) in cases {
            let err = parse_client_message(text).unwrap_err();
            assert_eq!(err.code, code, "{text}: {err}");
            assert_eq!(
                err.id,
                id.map(|s| RequestId::Text(s.into())),
                "{text}: {err}"
            );
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn a_forwarded_publish_names_its_origin_and_a_bad_one_is_refused() {
        let message = parse_client_message(
            r#"{"type":"publish","channel":"t","data":1,"id":3,"origin":{"node":"edge-1","seq":3}}"#,
        )
        .unwrap();
        let ClientMessage::Publish { origin, .. } = &message else {
            panic!("{message:?}");
        };
        assert_eq!(
            origin,
            &Some(Origin {
                node: "edge-1".into(),
                seq: 3
            })
        );
        for bad in [
            r#"{"type":"publish","channel":"t","data":1,"origin":{"node":"","seq":3}}"#,
            r#"{"type":"publish","channel":"t","data":1,"origin":{"node":"a","seq":-1}}"#,
            r#"{"type":"publish","channel":"t","data":1,"origin":{"node":"a"}}"#,
            r#"{"type":"publish","channel":"t","data":1,"origin":"a"}"#,
        ] {
            let err = parse_client_message(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{bad}");
            assert!(err.message.contains("origin"), "{bad}: {err}");
        }
        let down = ServerMessage::Message {
            channel: "t".into(),
            data: json!(1),
            origin: Some(Origin {
                node: "edge-1".into(),
                seq: 3,
            }),
        };
        assert_eq!(
            serde_json::from_str::<Value>(&down.to_json()).unwrap(),
            json!({"type": "message", "channel": "t", "data": 1, "origin": {"node": "edge-1", "seq": 3}})
        );
    }

    #[test]
    fn server_messages_have_stable_json() {
        let msg = ServerMessage::Result {
            id: RequestId::Text("r1".into()),
            handler: "add".into(),
            result: json!(3),
        };
        assert_eq!(
            serde_json::from_str::<Value>(&msg.to_json()).unwrap(),
            json!({"type": "result", "id": "r1", "handler": "add", "result": 3})
        );
        let err = WireError::new(None, ErrorCode::UnknownChannel, "no such channel");
        assert_eq!(
            serde_json::from_str::<Value>(&err.to_server_message().to_json()).unwrap(),
            json!({"type": "error", "code": "unknown_channel", "message": "no such channel"})
        );
        let back: ServerMessage = serde_json::from_str(&msg.to_json()).unwrap();
        assert_eq!(back, msg);
    }
}
