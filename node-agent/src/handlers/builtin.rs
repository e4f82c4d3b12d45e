//! Built-in compute handlers as pure functions: arguments in, a result or a
//! typed error out. The HTTP and WebSocket layers only translate to and from these.

use edgewire_api::HandlerKind;
use serde_json::{Value, json};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandlerError {
    #[error("{0}")]
    InvalidArguments(String),
    /// A `wasm` or `upstream` handler has no built-in behaviour.
    #[error("handler kind {0:?} is not built in")]
    NotBuiltin(&'static str),
}

/// The echo handler's reply, exactly as the seed's server words it.
pub fn echo(text: &str) -> String {
    format!("Echo: {text}")
}

/// Runs a handler called over the relay with JSON arguments.
pub fn call(kind: HandlerKind, args: &Value) -> Result<Value, HandlerError> {
    let Value::Object(map) = args else {
        return Err(HandlerError::InvalidArguments(
            "\"args\" must be a JSON object".into(),
        ));
    };
    match kind {
        HandlerKind::Echo => {
            let text = match map.get("text") {
                Some(Value::String(text)) => text,
                Some(other) => return Err(wrong_type("text", "a string", other)),
                None => return Err(missing("text")),
            };
            Ok(Value::String(echo(text)))
        }
        HandlerKind::Add => {
            let a = json_integer(map.get("a"), "a")?;
            let b = json_integer(map.get("b"), "b")?;
            add(a, b).map(Value::from)
        }
        HandlerKind::Wasm | HandlerKind::Upstream => Err(HandlerError::NotBuiltin(kind.as_str())),
    }
}

/// An HTTP answer from a handler: status, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl HttpAnswer {
    fn json(status: u16, value: Value) -> HttpAnswer {
        HttpAnswer {
            status,
            content_type: "application/json",
            body: value.to_string(),
        }
    }

    pub fn error(status: u16, message: &str) -> HttpAnswer {
        HttpAnswer::json(status, json!({ "error": message }))
    }
}

/// Runs a handler called as `GET <path>?<query>`.
pub fn http_get(kind: HandlerKind, query: Option<&str>) -> HttpAnswer {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let result = match kind {
        HandlerKind::Echo => match param("text") {
            Some(text) => {
                return HttpAnswer {
                    status: 200,
                    content_type: "text/plain; charset=utf-8",
                    body: echo(text),
                };
            }
            None => Err(missing("text")),
        },
        HandlerKind::Add => query_integer(param("a"), "a")
            .and_then(|a| query_integer(param("b"), "b").and_then(|b| add(a, b))),
        HandlerKind::Wasm | HandlerKind::Upstream => Err(HandlerError::NotBuiltin(kind.as_str())),
    };
    match result {
        Ok(value) => HttpAnswer::json(200, json!({ "result": value })),
        Err(HandlerError::InvalidArguments(why)) => HttpAnswer::error(400, &why),
        Err(err @ HandlerError::NotBuiltin(_)) => HttpAnswer::error(500, &err.to_string()),
    }
}

fn add(a: i64, b: i64) -> Result<i64, HandlerError> {
    a.checked_add(b).ok_or_else(|| {
        HandlerError::InvalidArguments(format!("{a} + {b} does not fit a 64-bit integer"))
    })
}

fn missing(name: &str) -> HandlerError {
    HandlerError::InvalidArguments(format!("missing argument \"{name}\""))
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> HandlerError {
    HandlerError::InvalidArguments(format!("argument \"{name}\" must be {expected}, got {got}"))
}

fn json_integer(value: Option<&Value>, name: &str) -> Result<i64, HandlerError> {
    match value {
        None => Err(missing(name)),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| wrong_type(name, "a 64-bit integer", v)),
    }
}

fn query_integer(value: Option<&str>, name: &str) -> Result<i64, HandlerError> {
    let text = value.ok_or_else(|| missing(name))?;
    text.trim().parse().map_err(|_| {
        HandlerError::InvalidArguments(format!(
            "argument \"{name}\" must be an integer, got {text:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_matches_the_seed() {
        assert_eq!(echo("Hello, WebSocket!"), "Echo: Hello, WebSocket!");
    }

    #[test]
    fn add_over_http_matches_the_seed() {
        let answer = http_get(HandlerKind::Add, Some("a=1&b=2"));
        assert_eq!(answer.status, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&answer.body).unwrap(),
            json!({"result": 3})
        );
        let negative = http_get(HandlerKind::Add, Some("a=-5&b=2"));
        assert_eq!(negative.body, r#"{"result":-3}"#);
    }

    #[test]
    fn add_over_http_refuses_bad_arguments() {
        for (query, needle) in [
            (None, "missing argument \"a\""),
            (Some("a=1"), "missing argument \"b\""),
            (Some("a=x&b=2"), "\"a\" must be an integer"),
            (Some("a=1.5&b=2"), "\"a\" must be an integer"),
            (Some("a=9223372036854775807&b=1"), "does not fit"),
        ] {
            let answer = http_get(HandlerKind::Add, query);
            assert_eq!(answer.status, 400, "{query:?}");
            let body: Value = serde_json::from_str(&answer.body).unwrap();
            let error = body["error"].as_str().unwrap_or_default();
            assert!(error.contains(needle), "{query:?}: {error}");
        }
    }

    #[test]
    fn echo_over_http_decodes_the_query() {
        let answer = http_get(HandlerKind::Echo, Some("text=hi%20there"));
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "Echo: hi there")
        );
    }

    #[test]
    fn call_checks_argument_types() {
        assert_eq!(
            call(HandlerKind::Add, &json!({"a": 1, "b": 2})),
            Ok(json!(3))
        );
        assert_eq!(
            call(HandlerKind::Echo, &json!({"text": "x"})),
            Ok(json!("Echo: x"))
        );
        for args in [
            json!({"a": "1", "b": 2}),
            json!({"a": 1.5, "b": 2}),
            json!({"a": 1}),
            json!([1, 2]),
        ] {
            assert!(
                matches!(
                    call(HandlerKind::Add, &args),
                    Err(HandlerError::InvalidArguments(_))
                ),
                "{args}"
            );
        }
        assert!(call(HandlerKind::Echo, &json!({"text": 5})).is_err());
    }
}
