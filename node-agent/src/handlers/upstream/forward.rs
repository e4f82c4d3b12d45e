//! What of a client's request goes upstream, and what of the upstream's
//! answer comes back, as pure functions over headers and URIs: hop-by-hop
//! headers (RFC 9110 §7.6.1) belong to one connection and stop here; the
//! client's token for this service is not the upstream's business.

use hyper::Uri;
use hyper::header::{self, HeaderMap};

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `headers` without the hop-by-hop ones, those the `Connection` header
/// names, and the body's framing (the forwarder sets the length of the body
/// it sends).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let drop = HOP_BY_HOP.contains(&name.as_str())
            || name == header::CONTENT_LENGTH
            || named.iter().any(|n| n == name.as_str());
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The headers sent upstream. `Host` is the upstream's (the client set it
/// from the URI); the client's `Authorization` stays here when it is this
/// service's token.
pub fn request_headers(headers: &HeaderMap, strip_authorization: bool) -> HeaderMap {
    let mut out = end_to_end(headers);
    out.remove(header::HOST);
    if strip_authorization {
        out.remove(header::AUTHORIZATION);
    }
    out
}

/// The upstream's headers passed back to the client.
pub fn response_headers(headers: &HeaderMap) -> HeaderMap {
    end_to_end(headers)
}

/// The URI of one forward: the handler's url, with the client's query
/// (less the `token` parameter when it carried this service's token).
pub fn target(url: &str, query: Option<&str>, strip_token: bool) -> Result<Uri, String> {
    let query = query.filter(|q| !q.is_empty()).map(|q| {
        if strip_token && has_param(q, crate::auth::token::QUERY_PARAMETER) {
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(
                    form_urlencoded::parse(q.as_bytes())
                        .filter(|(k, _)| k != crate::auth::token::QUERY_PARAMETER),
                )
                .finish()
        } else {
            q.to_string()
        }
    });
    let text = match query.filter(|q| !q.is_empty()) {
        Some(query) => format!("{url}?{query}"),
        None => url.to_string(),
    };
    text.parse::<Uri>()
        .map_err(|err| format!("cannot forward to {text:?}: {err}"))
}

fn has_param(query: &str, name: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == name)
}

#[cfg(test)]
mod tests {
    use hyper::header::{HeaderName, HeaderValue};

    use super::*;

    fn name(text: &'static str) -> HeaderName {
        HeaderName::from_static(text)
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(name(k), HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_stop_here() {
        let headers = map(&[
            ("host", "edge:5000"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("accept", "a"),
            ("accept", "b"),
            ("authorization", "Bearer edge-token"),
        ]);
        let sent = request_headers(&headers, true);
        let mut names: Vec<&str> = sent.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accept", "content-type"]);
        assert_eq!(sent.get_all("accept").iter().count(), 2);
        assert!(request_headers(&headers, false).contains_key("authorization"));
        let back = response_headers(&map(&[("upgrade", "h2c"), ("x-result", "3")]));
        assert_eq!(
            back.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-result"]
        );
    }

    #[test]
    fn the_clients_query_is_appended_without_the_token() {
        let url = "http://127.0.0.1:5000/add";
        assert_eq!(target(url, None, true).unwrap(), url);
        assert_eq!(target(url, Some(""), true).unwrap(), url);
        assert_eq!(
            target(url, Some("a=1&b=2"), true).unwrap(),
            "http://127.0.0.1:5000/add?a=1&b=2"
        );
        assert_eq!(
            target(url, Some("a=1&token=secret&b=2"), true).unwrap(),
            "http://127.0.0.1:5000/add?a=1&b=2"
        );
        assert_eq!(target(url, Some("token=secret"), true).unwrap(), url);
        assert_eq!(
            target(url, Some("token=t"), false).unwrap(),
            "http://127.0.0.1:5000/add?token=t",
            "an open service's clients may mean it for the upstream"
        );
    }
}
