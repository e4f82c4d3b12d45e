//! Outbound HTTP from a component: denied unless the request's host is in the
//! handler's `allowedOutboundHosts`; allowed requests are timed in
//! `edgewire_upstream_duration_seconds`, with the handler's name as the
//! `upstream` label and the outcome as an `upstream` handler's attempts
//! name it, and their body bytes both ways counted in
//! `edgewire_upstream_bytes_total` (the seed's C_data, as for an `upstream`
//! handler).

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::handlers::upstream::Outcome;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Outbound {
    pub allowed: Arc<[String]>,
    pub service: Arc<str>,
    pub handler: Arc<str>,
    pub metrics: Metrics,
}

/// How an outbound request ended, in an upstream attempt's terms.
fn outcome(sent: &Result<u16, &Error>) -> Outcome {
    match sent {
        Ok(status) => Outcome::Answered(*status),
        Err(
            Error::DnsTimeout
            | Error::ConnectionTimeout
            | Error::ConnectionReadTimeout
            | Error::ConnectionWriteTimeout
            | Error::HttpResponseTimeout,
        ) => Outcome::Timeout,
        Err(
            Error::Tls(_)
            | Error::TlsProtocolError
            | Error::TlsCertificateError
            | Error::TlsAlertReceived { .. },
        ) => Outcome::Tls,
        Err(Error::Hyper(_) | Error::ConnectionTerminated | Error::HttpResponseIncomplete) => {
            Outcome::ConnectionLost
        }
        Err(_) => Outcome::ConnectFailed,
    }
}

/// Whether `host` (with `port`, when the URI names one) is on the list. An
/// entry `host` allows any port; `host:port` that port only. Hosts compare
/// without case.
pub fn allowed(list: &[String], host: &str, port: Option<u16>) -> bool {
    list.iter().any(|entry| {
        match entry
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        {
            Some((entry_host, entry_port)) => {
                entry_host.eq_ignore_ascii_case(host) && port == Some(entry_port)
            }
            None => entry.eq_ignore_ascii_case(host),
        }
    })
}

/// `body`, its data bytes counted in `direction` as they pass.
fn counted<B>(
    body: B,
    metrics: &Metrics,
    service: &str,
    handler: &str,
    direction: &'static str,
) -> WasiBody
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = Error> + Send + 'static,
{
    let bytes = metrics.upstream_bytes_counter(service, handler, direction);
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            bytes.inc_by(data.len() as u64);
        }
        frame
    })
    .boxed_unsync()
}

type Sent = Box<
    dyn Future<
            Output = Result<
                (
                    hyper::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: hyper::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Sent {
        let uri = request.uri();
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let permitted = uri
            .host()
            .is_some_and(|host| allowed(&self.allowed, host, port));
        if !permitted {
            tracing::debug!(service = %self.service, uri = %uri, "outbound HTTP denied");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let service = Arc::clone(&self.service);
        let handler = Arc::clone(&self.handler);
        let metrics = self.metrics.clone();
        let request = request.map(|body| counted(body, &metrics, &service, &handler, "sent"));
        Box::new(async move {
            let started = Instant::now();
            let sent = wasmtime_wasi_http::default_send_request(request, options).await;
            let ended = outcome(&sent.as_ref().map(|(r, _)| r.status().as_u16()));
            metrics.upstream_attempt(
                &service,
                &handler,
                ended.label(),
                started.elapsed().as_secs_f64(),
            );
            let (response, io) = sent?;
            Ok((
                response.map(|body| counted(body, &metrics, &service, &handler, "received")),
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_with_or_without_a_port() {
        let list = vec!["api.example.com".to_string(), "127.0.0.1:8080".to_string()];
        assert!(allowed(&list, "api.example.com", None));
        assert!(allowed(&list, "API.example.com", Some(443)));
        assert!(allowed(&list, "127.0.0.1", Some(8080)));
        assert!(!allowed(&list, "127.0.0.1", Some(8081)));
        assert!(!allowed(&list, "127.0.0.1", None));
        assert!(!allowed(&list, "example.com", None));
        assert!(!allowed(&[], "api.example.com", None));
    }
}
