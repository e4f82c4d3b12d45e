//! A channel processor for sensor readings. It receives each message published
//! on its channel as a POST whose body is the message's `data`, and answers a
//! JSON array of the messages to deliver instead:
//!
//! - a reading without a numeric `t`, or with `t` outside -50..=150 °C (a
//!   glitching sensor), is dropped: `[]`;
//! - a plausible one is passed on with `"alert": true|false` (above 30 °C).

use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

wasip2::http::proxy::export!(Filter);

struct Filter;

const HOT: f64 = 30.0;
const PLAUSIBLE: std::ops::RangeInclusive<f64> = -50.0..=150.0;

impl wasip2::exports::http::incoming_handler::Guest for Filter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let body = example_common::body(request);
        let out_messages = match serde_json::from_slice::<Value>(&body) {
            Ok(reading) => process(reading),
            Err(_) => Vec::new(),
        };
        example_common::respond_json(out, 200, &Value::Array(out_messages).to_string());
    }
}

fn process(mut reading: Value) -> Vec<Value> {
    let Some(t) = reading.get("t").and_then(Value::as_f64) else {
        return Vec::new();
    };
    if !PLAUSIBLE.contains(&t) {
        return Vec::new();
    }
    if let Value::Object(map) = &mut reading {
        map.insert("alert".into(), json!(t > HOT));
    }
    vec![reading]
}
