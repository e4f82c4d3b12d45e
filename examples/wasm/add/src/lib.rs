//! The seed's `add` handler as a component:
//! `GET /add?a=1&b=2` answers `{"result":3}`, and a POST of `{"a":1,"b":2}`
//! (what a relay `call` sends) answers the same.

use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

wasip2::http::proxy::export!(Add);

struct Add;

impl wasip2::exports::http::incoming_handler::Guest for Add {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let sum = match request.method() {
            Method::Get | Method::Head => {
                let query = example_common::query(&request);
                from_query(&query)
            }
            Method::Post => from_json(&example_common::body(request)),
            _ => Err((405, "only GET and POST are allowed".to_string())),
        };
        match sum {
            Ok(sum) => {
                example_common::respond_json(out, 200, &json!({ "result": sum }).to_string())
            }
            Err((status, why)) => {
                example_common::respond_json(out, status, &json!({ "error": why }).to_string())
            }
        }
    }
}

type Answer = Result<i64, (u16, String)>;

fn from_query(query: &str) -> Answer {
    let number = |name: &str| -> Result<i64, (u16, String)> {
        let text = example_common::param(query, name)
            .ok_or_else(|| (400, format!("missing argument \"{name}\"")))?;
        text.trim().parse().map_err(|_| {
            (
                400,
                format!("argument \"{name}\" must be an integer, got {text:?}"),
            )
        })
    };
    add(number("a")?, number("b")?)
}

fn from_json(body: &[u8]) -> Answer {
    let args: Value = serde_json::from_slice(body)
        .map_err(|err| (400, format!("the body must be a JSON object: {err}")))?;
    let number = |name: &str| -> Result<i64, (u16, String)> {
        match args.get(name) {
            None => Err((400, format!("missing argument \"{name}\""))),
            Some(value) => value.as_i64().ok_or_else(|| {
                (
                    400,
                    format!("argument \"{name}\" must be a 64-bit integer, got {value}"),
                )
            }),
        }
    };
    add(number("a")?, number("b")?)
}

fn add(a: i64, b: i64) -> Answer {
    a.checked_add(b)
        .ok_or_else(|| (400, format!("{a} + {b} does not fit a 64-bit integer")))
}
