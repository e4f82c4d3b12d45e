//! Where a request carries its token: `Authorization: Bearer <token>`, or,
//! for browsers (whose WebSocket API cannot set headers), the `token` query
//! parameter. Pure functions over the request's parts.

use hyper::header::{AUTHORIZATION, HeaderMap};

/// The query parameter that carries a token.
pub const QUERY_PARAMETER: &str = "token";

/// The request's token, the header first; `None` when it carries none.
pub fn from_request(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    from_header(headers).or_else(|| query.and_then(from_query))
}

fn from_header(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn from_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == QUERY_PARAMETER)
        .map(|(_, value)| value.into_owned())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        headers
    }

    #[test]
    fn header_then_query() {
        assert_eq!(
            from_request(&headers("Bearer abc"), Some("token=q")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            from_request(&headers("bearer  abc "), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            from_request(&HeaderMap::new(), Some("a=1&token=q%2Bx")).as_deref(),
            Some("q+x")
        );
        assert_eq!(from_request(&headers("Basic abc"), None), None);
        assert_eq!(from_request(&headers("Bearer "), Some("token=")), None);
        assert_eq!(from_request(&HeaderMap::new(), None), None);
    }
}
