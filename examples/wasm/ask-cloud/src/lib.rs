//! The edge asking the cloud, from inside a component: `POST
//! /ask?upstream=HOST:PORT` with a JSON body sends that body on to
//! `http://HOST:PORT/sum` (outbound HTTP, `wasi:http/outgoing-handler`) and
//! answers with the cloud's status and body. An outbound request the host
//! refuses (its host not in the handler's `allowedOutboundHosts`) or that
//! fails answers 502 with the error code the host gave.

use std::io::{Read as _, Write as _};

use serde_json::json;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, ResponseOutparam,
    Scheme,
};

wasip2::http::proxy::export!(AskCloud);

struct AskCloud;

impl wasip2::exports::http::incoming_handler::Guest for AskCloud {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = example_common::query(&request);
        let Some(upstream) = example_common::param(&query, "upstream").map(str::to_string) else {
            let why = json!({"error": "missing query parameter \"upstream\" (HOST:PORT)"});
            return example_common::respond_json(out, 400, &why.to_string());
        };
        let body = example_common::body(request);
        match ask(&upstream, &body) {
            Ok((status, answer)) => {
                example_common::respond_json(out, status, &String::from_utf8_lossy(&answer))
            }
            Err(code) => {
                let why = json!({"error": format!("{code:?}")});
                example_common::respond_json(out, 502, &why.to_string())
            }
        }
    }
}

/// POSTs `body` to `http://{upstream}/sum`; the answer's status and body.
fn ask(upstream: &str, body: &[u8]) -> Result<(u16, Vec<u8>), ErrorCode> {
    let other = |what: &str| ErrorCode::InternalError(Some(what.to_string()));
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"application/json".to_vec()]);
    let request = OutgoingRequest::new(headers);
    let set = request
        .set_method(&Method::Post)
        .and(request.set_scheme(Some(&Scheme::Http)))
        .and(request.set_authority(Some(upstream)))
        .and(request.set_path_with_query(Some("/sum")));
    set.map_err(|()| other("invalid upstream"))?;
    let outgoing = request.body().map_err(|()| other("no request body"))?;
    let pending = outgoing_handler::handle(request, None)?;
    // A request the host refuses has its body closed at once: the write
    // fails, and the response says why.
    let written = outgoing
        .write()
        .map_err(|()| other("no body stream"))
        .and_then(|mut stream| {
            stream
                .write_all(body)
                .and_then(|()| std::io::Write::flush(&mut stream))
                .map_err(|err| other(&err.to_string()))
        });
    let finished = written.and_then(|()| OutgoingBody::finish(outgoing, None));
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or_else(|| other("no response"))?
        .map_err(|()| other("response taken twice"))??;
    finished?;
    let status = response.status();
    let mut answer = Vec::new();
    let incoming = response.consume().map_err(|()| other("no response body"))?;
    {
        let mut stream = incoming.stream().map_err(|()| other("no body stream"))?;
        stream
            .read_to_end(&mut answer)
            .map_err(|err| other(&err.to_string()))?;
    }
    Ok((status, answer))
}
