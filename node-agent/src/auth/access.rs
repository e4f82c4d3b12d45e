//! What a client may do once its token (or its lack of one) is judged, and
//! the bounded labels every decision is counted under. Pure functions only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgewire_api::Grants;
use edgewire_api::auth::pattern_matches;
use serde::Deserialize;

/// Something a client asks to do, checked against its access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
    Call,
    /// Publish as an edge node's hub link: with the `origin` of that node,
    /// whose sequence numbers the hub deduplicates by.
    Forward,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
            Action::Call => "call",
            Action::Forward => "forward",
        }
    }
}

/// The claims edgewire reads from a token, after its signature and time
/// claims have been checked. The grants follow Centrifugo's model: the token
/// names what its holder may subscribe to, publish to and call.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Expiry (seconds since the epoch); required.
    pub exp: u64,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub call: Vec<String>,
    /// The edge nodes whose messages the holder may forward (a hub link's
    /// `origin`). A hub drops what it has seen from an origin, so a client
    /// that could name any origin could silence that node's uplink.
    #[serde(default)]
    pub origins: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    /// A service without `auth`: everything it serves.
    Everything,
    Only(Grants),
}

/// What one client may do, for as long as its token lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    scope: Scope,
    /// The origins it may forward as (see `Claims::origins`); open access
    /// may forward as any.
    origins: Vec<String>,
    /// When the access ends (seconds since the epoch, leeway included);
    /// `None` for open services and anonymous clients.
    pub expires_at: Option<u64>,
}

impl Access {
    /// The access every client has to a service without `auth`.
    pub fn open() -> Access {
        Access {
            scope: Scope::Everything,
            origins: Vec::new(),
            expires_at: None,
        }
    }

    /// A client without a token, on a service that allows some anonymous use.
    pub fn anonymous(grants: Grants) -> Access {
        Access {
            scope: Scope::Only(grants),
            origins: Vec::new(),
            expires_at: None,
        }
    }

    /// A client whose token checked out; it lasts until `exp` plus `leeway`.
    pub fn from_claims(claims: Claims, leeway_seconds: u32) -> Access {
        Access {
            expires_at: Some(claims.exp.saturating_add(leeway_seconds.into())),
            origins: claims.origins,
            scope: Scope::Only(Grants {
                subscribe: claims.subscribe,
                publish: claims.publish,
                call: claims.call,
            }),
        }
    }

    /// Whether this access allows `action` on the channel or handler `name`.
    pub fn allows(&self, action: Action, name: &str) -> bool {
        let grants = match &self.scope {
            Scope::Everything => return true,
            Scope::Only(grants) => grants,
        };
        let patterns = match action {
            Action::Subscribe => &grants.subscribe,
            Action::Publish => &grants.publish,
            Action::Call => &grants.call,
            Action::Forward => &self.origins,
        };
        patterns.iter().any(|p| pattern_matches(p, name))
    }

    /// How long until the access ends, judged by this machine's clock at
    /// `now`; `None` when it does not end. Zero once it has ended.
    pub fn time_left(&self, now: SystemTime) -> Option<Duration> {
        let expires_at = UNIX_EPOCH + Duration::from_secs(self.expires_at?);
        Some(expires_at.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// Why a request's token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, and the service allows no anonymous use.
    MissingToken,
    /// Not a JWT, an oversize one, or claims of the wrong shape.
    Malformed,
    BadSignature,
    /// Signed with an algorithm other than the service's.
    WrongAlgorithm,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::MissingToken,
        Refusal::Malformed,
        Refusal::BadSignature,
        Refusal::WrongAlgorithm,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::WrongIssuer,
        Refusal::WrongAudience,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::Malformed => "malformed",
            Refusal::BadSignature => "bad_signature",
            Refusal::WrongAlgorithm => "wrong_algorithm",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::WrongIssuer => "wrong_issuer",
            Refusal::WrongAudience => "wrong_audience",
        }
    }

    /// What a client is told: enough to fix its token, nothing about the key.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::MissingToken => "a token is required (Authorization: Bearer, or ?token=)",
            Refusal::Malformed => "the token is not a well-formed JWT with the expected claims",
            Refusal::BadSignature => "the token's signature does not verify",
            Refusal::WrongAlgorithm => {
                "the token is signed with an algorithm this service does not accept"
            }
            Refusal::Expired => "the token has expired",
            Refusal::NotYetValid => "the token is not valid yet (nbf)",
            Refusal::WrongIssuer => "the token's issuer is not accepted",
            Refusal::WrongAudience => "the token's audience is not this service",
        }
    }
}

/// One decision, as counted in `edgewire_auth_total{outcome, reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A request with a valid token.
    AcceptedToken,
    /// A request without a token, on a service that allows anonymous use.
    AcceptedAnonymous,
    Rejected(Refusal),
    /// An authenticated request for something its access does not allow.
    Denied(Action),
    /// A live connection closed because its token expired.
    Expired,
}

impl Decision {
    /// Every (outcome, reason) pair, to show each series at zero.
    pub fn all() -> impl Iterator<Item = Decision> {
        [Decision::AcceptedToken, Decision::AcceptedAnonymous]
            .into_iter()
            .chain(Refusal::ALL.map(Decision::Rejected))
            .chain(
                [
                    Action::Subscribe,
                    Action::Publish,
                    Action::Call,
                    Action::Forward,
                ]
                .map(Decision::Denied),
            )
            .chain([Decision::Expired])
    }

    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Decision::AcceptedToken => ("accepted", "token"),
            Decision::AcceptedAnonymous => ("accepted", "anonymous"),
            Decision::Rejected(refusal) => ("rejected", refusal.as_str()),
            Decision::Denied(action) => ("denied", action.as_str()),
            Decision::Expired => ("expired", "connection_closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(subscribe: &[&str], publish: &[&str], call: &[&str]) -> Claims {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Claims {
            exp: 1_000,
            subscribe: owned(subscribe),
            publish: owned(publish),
            call: owned(call),
            origins: Vec::new(),
        }
    }

    #[test]
    fn claims_grant_exactly_what_they_name() {
        let access = Access::from_claims(claims(&["chat", "sensors.*"], &["chat"], &["add"]), 5);
        assert!(access.allows(Action::Subscribe, "chat"));
        assert!(access.allows(Action::Subscribe, "sensors.t1"));
        assert!(!access.allows(Action::Subscribe, "telemetry"));
        assert!(access.allows(Action::Publish, "chat"));
        assert!(!access.allows(Action::Publish, "sensors.t1"));
        assert!(access.allows(Action::Call, "add"));
        assert!(!access.allows(Action::Call, "echo"));
        assert_eq!(access.expires_at, Some(1_005), "leeway extends the end");
    }

    #[test]
    fn no_claims_grant_nothing_and_open_grants_all() {
        let none = Access::from_claims(claims(&[], &[], &[]), 0);
        let anonymous = Access::anonymous(Grants::default());
        for action in [
            Action::Subscribe,
            Action::Publish,
            Action::Call,
            Action::Forward,
        ] {
            assert!(!none.allows(action, "chat"));
            assert!(!anonymous.allows(action, "chat"));
            assert!(Access::open().allows(action, "chat"));
        }
        assert_eq!(Access::open().time_left(SystemTime::now()), None);
    }

    #[test]
    fn only_the_origins_a_token_names_may_be_forwarded_as() {
        let mut edge = claims(&[], &["telemetry"], &[]);
        edge.origins = vec!["edge-7".into(), "site-b-*".into()];
        let access = Access::from_claims(edge, 0);
        assert!(access.allows(Action::Forward, "edge-7"));
        assert!(access.allows(Action::Forward, "site-b-2"));
        assert!(!access.allows(Action::Forward, "edge-8"));
        // Publishing on the channel is no licence to speak for a node.
        let client = Access::from_claims(claims(&[], &["*"], &[]), 0);
        assert!(!client.allows(Action::Forward, "edge-7"));
    }

    #[test]
    fn time_left_is_zero_after_expiry() {
        let access = Access::from_claims(claims(&[], &[], &[]), 0);
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(access.time_left(at(400)), Some(Duration::from_secs(600)));
        assert_eq!(access.time_left(at(5_000)), Some(Duration::ZERO));
    }

    #[test]
    fn decision_labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> = Decision::all().map(Decision::labels).collect();
        assert_eq!(labels.len(), Decision::all().count());
    }
}
