//! What travels on a mesh link, one JSON text frame each.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum LinkFrame {
    /// Acceptor to dialer, first: prove yourself against this nonce.
    Challenge {
        nonce: String,
    },
    /// Dialer's answer, with its own nonce for the acceptor to answer.
    Hello {
        node: String,
        proof: String,
        nonce: String,
    },
    /// Acceptor's answer: authenticated both ways.
    Welcome {
        node: String,
        proof: String,
    },
    /// The sender has local subscribers on these channels of `service`
    /// (a full snapshot, sent when the link comes up).
    Interest {
        service: String,
        channels: Vec<String>,
    },
    Subscribe {
        service: String,
        channel: String,
    },
    Unsubscribe {
        service: String,
        channel: String,
    },
    /// A publish at the sender: `message` is the relay frame to deliver as
    /// is; `sent_us` the publish time (µs since the Unix epoch) for the
    /// mesh latency metric.
    Message {
        service: String,
        channel: String,
        message: String,
        sent_us: u64,
    },
}

impl LinkFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Microseconds since the Unix epoch, by the wall clock (the only clock two
/// nodes share).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
