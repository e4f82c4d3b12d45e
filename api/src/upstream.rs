//! An `upstream` handler's settings: where it forwards to, and the bounds on
//! each forward (deadline, retries, concurrency, circuit breaker, body
//! sizes). Every field but `url` has a safe default.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{HandlerKind, HandlerSpec};
use crate::error::FieldError;

/// Where an `upstream` handler forwards, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamSpec {
    /// `http://` or `https://` host, optional port, and path; no query (the
    /// client's query string is appended) and no user info.
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s?#@]+$"))]
    pub url: String,
    /// The whole forward's deadline, from the request's arrival (reading its
    /// body, the attempts and the backoff between them); past it the client
    /// gets 504.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1, max = 300000))]
    pub timeout_ms: u32,
    /// Further attempts after a failed one (connection refused or lost, 502,
    /// 503 or 504), with exponential backoff and jitter, for idempotent
    /// requests only: GET, HEAD, OPTIONS, PUT and DELETE, never POST (so a
    /// relay `call`, a POST, is not retried) unless `idempotent` is set.
    #[serde(default = "default_retries")]
    #[schemars(range(min = 0, max = 10))]
    pub retries: u32,
    /// The upstream tolerates a repeated request of any method: POSTs (and
    /// relay `call`s) are retried too.
    #[serde(default)]
    pub idempotent: bool,
    /// Forwards in flight at once; more answer 503 at once rather than queue.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent: u32,
    #[serde(default)]
    pub breaker: BreakerSpec,
    /// The largest request body forwarded; larger answers 413.
    #[serde(default = "default_body_bytes")]
    #[schemars(range(min = 0, max = 16777216))]
    pub max_request_bytes: u32,
    /// The largest response body taken from the upstream; larger answers 502.
    #[serde(default = "default_body_bytes")]
    #[schemars(range(min = 0, max = 16777216))]
    pub max_response_bytes: u32,
    /// PEM file of the CA certificates that sign the upstream's certificate,
    /// instead of the system's roots (for an `https://` url). A path on the
    /// node, read when the handler starts: the standalone agent's only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub ca_file: Option<String>,
    /// In an EdgeService, instead of `caFile`: the key of a Secret in its
    /// namespace holding the PEM CA certificates. The agent stores it as a
    /// file of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<crate::auth::SecretKeyRef>,
}

/// The circuit breaker: after `failures` consecutive failed attempts the
/// handler answers 503 at once for `cooldownMs`; then one probe goes
/// through, and its success closes the breaker (its failure opens it again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BreakerSpec {
    #[schemars(range(min = 1, max = 1000))]
    pub failures: u32,
    #[schemars(range(min = 1, max = 600000))]
    pub cooldown_ms: u32,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            failures: 5,
            cooldown_ms: 10_000,
        }
    }
}

fn default_timeout_ms() -> u32 {
    10_000
}

fn default_retries() -> u32 {
    2
}

fn default_max_concurrent() -> u32 {
    64
}

fn default_body_bytes() -> u32 {
    1024 * 1024
}

const MAX_TIMEOUT_MS: u32 = 300_000;
const MAX_RETRIES: u32 = 10;
const MAX_CONCURRENT: u32 = 10_000;
const MAX_BODY: u32 = 16 * 1024 * 1024;
const MAX_FAILURES: u32 = 1000;
const MAX_COOLDOWN_MS: u32 = 600_000;

impl UpstreamSpec {
    /// A spec with every default, forwarding to `url`.
    pub fn to(url: &str) -> UpstreamSpec {
        UpstreamSpec {
            url: url.into(),
            timeout_ms: default_timeout_ms(),
            retries: default_retries(),
            idempotent: false,
            max_concurrent: default_max_concurrent(),
            breaker: BreakerSpec::default(),
            max_request_bytes: default_body_bytes(),
            max_response_bytes: default_body_bytes(),
            ca_file: None,
            ca_secret: None,
        }
    }

    /// Whether the url's scheme is `https`.
    pub fn is_https(&self) -> bool {
        self.url.starts_with("https://")
    }

    pub fn validate_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        if let Err(why) = check_url(&self.url) {
            errors.push(FieldError::new(format!("{at}.url"), why));
        }
        let mut check = |field: &str, ok: bool, why: String| {
            if !ok {
                errors.push(FieldError::new(format!("{at}.{field}"), why));
            }
        };
        check(
            "timeoutMs",
            (1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms),
            format!("must be between 1 and {MAX_TIMEOUT_MS}"),
        );
        check(
            "retries",
            self.retries <= MAX_RETRIES,
            format!("must be at most {MAX_RETRIES}"),
        );
        check(
            "maxConcurrent",
            (1..=MAX_CONCURRENT).contains(&self.max_concurrent),
            format!("must be between 1 and {MAX_CONCURRENT}"),
        );
        check(
            "breaker.failures",
            (1..=MAX_FAILURES).contains(&self.breaker.failures),
            format!("must be between 1 and {MAX_FAILURES}"),
        );
        check(
            "breaker.cooldownMs",
            (1..=MAX_COOLDOWN_MS).contains(&self.breaker.cooldown_ms),
            format!("must be between 1 and {MAX_COOLDOWN_MS}"),
        );
        check(
            "maxRequestBytes",
            self.max_request_bytes <= MAX_BODY,
            format!("must be at most {MAX_BODY}"),
        );
        check(
            "maxResponseBytes",
            self.max_response_bytes <= MAX_BODY,
            format!("must be at most {MAX_BODY}"),
        );
        if let Some(file) = &self.ca_file {
            check("caFile", !file.is_empty(), "must name a PEM file".into());
            check(
                "caFile",
                self.is_https(),
                "only an https:// url uses a CA".into(),
            );
        }
        if let Some(secret) = &self.ca_secret {
            let named = crate::auth::check_secret_name(&secret.name)
                .and_then(|()| crate::auth::check_secret_key(&secret.key));
            check("caSecret", named.is_ok(), named.err().unwrap_or_default());
            check(
                "caSecret",
                self.ca_file.is_none(),
                "exactly one of caFile and caSecret may be set".into(),
            );
            check(
                "caSecret",
                self.is_https(),
                "only an https:// url uses a CA".into(),
            );
        }
    }
}

/// An absolute `http(s)://host[:port][/path]` URL without user info, query
/// or fragment.
fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must begin with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if url.len() > 2048 {
        Err("must be at most 2048 characters".into())
    } else if url.contains(['?', '#']) {
        Err(format!(
            "{url:?} may not have a query or fragment; the client's query is appended"
        ))
    } else if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("{url:?} may not contain spaces"))
    } else if authority.contains('@') {
        Err(format!("{url:?} may not carry user info"))
    } else if let Err(why) = check_authority(authority) {
        Err(format!("{url:?}: {why}"))
    } else {
        Ok(())
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn check_authority(authority: &str) -> Result<(), &'static str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or("an IPv6 host needs its ']'")?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or("junk after the IPv6 host")?),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        Err("must name a host")
    } else if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        Err("has an invalid port")
    } else {
        Ok(())
    }
}

impl HandlerSpec {
    /// An `upstream` handler needs `upstream`; no other kind takes it.
    pub(crate) fn validate_upstream_into(&self, at: &str, errors: &mut Vec<FieldError>) {
        match (&self.upstream, self.kind == HandlerKind::Upstream) {
            (Some(spec), true) => spec.validate_into(&format!("{at}.upstream"), errors),
            (None, true) => errors.push(FieldError::new(
                format!("{at}.upstream"),
                "an upstream handler needs upstream.url",
            )),
            (Some(_), false) => errors.push(FieldError::new(
                format!("{at}.upstream"),
                "only an upstream handler takes upstream",
            )),
            (None, false) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_absolute_http_without_query_or_user_info() {
        for ok in [
            "http://127.0.0.1:5000/add",
            "https://api.example.com",
            "https://api.example.com/v1/sum",
            "http://[::1]:8080/x",
            "http://[::1]/x",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://example.com/",
            "example.com/add",
            "http:///add",
            "http://:80/add",
            "http://example.com/add?a=1",
            "http://example.com/add#x",
            "http://user:pw@example.com/",
            "http://example.com:http/",
            "http://example.com:99999/",
            "http://exa mple.com/",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_upstream_handler_needs_its_url_and_only_it_takes_one() {
        let config = crate::AgentConfig::parse(
            r#"
services:
  - name: edge
    port: 0
    handlers:
      - name: add
        kind: upstream
        path: /add
        upstream: {url: "http://127.0.0.1:5001/add", retries: 0, breaker: {failures: 3}}
"#,
        )
        .unwrap();
        let spec = config.services[0].handlers[0].upstream.clone().unwrap();
        assert_eq!(spec.retries, 0);
        assert_eq!(spec.breaker.failures, 3);
        assert_eq!(spec.breaker.cooldown_ms, BreakerSpec::default().cooldown_ms);
        assert_eq!(spec.timeout_ms, 10_000);

        let err = crate::AgentConfig::parse(
            r#"
services:
  - name: edge
    port: 0
    handlers:
      - {name: add, kind: upstream, path: /add}
      - {name: echo, kind: echo, path: /, upstream: {url: "http://x/"}}
      - {name: bad, kind: upstream, upstream: {url: "http://x/?q=1", maxConcurrent: 0}}
"#,
        )
        .unwrap_err()
        .to_string();
        for field in [
            "services[0].handlers[0].upstream",
            "services[0].handlers[1].upstream",
            "services[0].handlers[2].upstream.url",
            "services[0].handlers[2].upstream.maxConcurrent",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
    }

    #[test]
    fn the_upstream_example_is_valid() {
        let es: crate::crd::EdgeService =
            serde_yaml_ng::from_str(include_str!("../../examples/upstream.yaml")).unwrap();
        let service = crate::ServiceConfig {
            name: "cloud-add".into(),
            port: 5000,
            handlers: es.spec.handlers,
            channels: es.spec.channels,
            relay_path: es.spec.relay_path,
            limits: es.spec.limits,
            peers: Vec::new(),
            auth: None,
            tls: None,
            hub: None,
        };
        let mut errors = Vec::new();
        service.validate_into("spec", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn bounds_are_checked_and_named() {
        let mut spec = UpstreamSpec::to("http://127.0.0.1:1/");
        spec.timeout_ms = 0;
        spec.retries = 11;
        spec.max_concurrent = 0;
        spec.breaker.failures = 0;
        spec.max_response_bytes = MAX_BODY + 1;
        spec.ca_file = Some("ca.pem".into());
        let mut errors = Vec::new();
        spec.validate_into("h", &mut errors);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "h.timeoutMs",
                "h.retries",
                "h.maxConcurrent",
                "h.breaker.failures",
                "h.maxResponseBytes",
                "h.caFile"
            ]
        );
        let mut errors = Vec::new();
        UpstreamSpec::to("https://x/").validate_into("h", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
