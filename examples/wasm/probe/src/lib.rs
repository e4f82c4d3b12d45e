//! A component that reports what it sees of its request and what it can
//! reach of the host, and fails on request; the tests use it to check the
//! sandbox and the error paths.
//!
//! - Over HTTP: answers a JSON report: the method, path and query, the
//!   `x-probe` header, the body's length, and what became of reading a file
//!   (`/etc/hostname`), listing the current directory, connecting to the
//!   TCP address in the query's `tcp`, and the environment's size.
//!   `?do=trap` traps instead (a Rust panic is a Wasm `unreachable`).
//! - As a channel processor (the request carries `edgewire-channel`): the
//!   message `{"copies": N}` fans out as N messages `{"copy": i}`;
//!   `{"trap": true}` traps.

use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

wasip2::http::proxy::export!(Probe);

struct Probe;

impl wasip2::exports::http::incoming_handler::Guest for Probe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let headers = request.headers();
        let header = |name: &str| {
            headers
                .get(name)
                .first()
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (probe_header, channel) = (header("x-probe"), header("edgewire-channel"));
        drop(headers);
        if channel.is_some() {
            let message: Value =
                serde_json::from_slice(&example_common::body(request)).unwrap_or_default();
            return example_common::respond_json(out, 200, &process(&message).to_string());
        }
        let query = example_common::query(&request);
        if example_common::param(&query, "do") == Some("trap") {
            panic!("asked to trap");
        }
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Post => "POST".to_string(),
            other => format!("{other:?}"),
        };
        let path = request.path_with_query().unwrap_or_default();
        let body = example_common::body(request);
        let report = json!({
            "method": method,
            "path": path,
            "header": probe_header,
            "bodyBytes": body.len(),
            "file": outcome(std::fs::read_to_string("/etc/hostname").map(|_| ())),
            "dir": outcome(std::fs::read_dir(".").map(|_| ())),
            "tcp": example_common::param(&query, "tcp")
                .map(|addr| outcome(std::net::TcpStream::connect(addr).map(|_| ()))),
            "env": std::env::vars().count(),
        });
        example_common::respond_json(out, 200, &report.to_string());
    }
}

/// `"ok"`, or the error's text.
fn outcome(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(err) => format!("error: {err}"),
    }
}

fn process(message: &Value) -> Value {
    if message["trap"] == json!(true) {
        panic!("asked to trap");
    }
    let copies = message["copies"].as_u64().unwrap_or(1);
    Value::Array((0..copies).map(|i| json!({ "copy": i })).collect())
}
