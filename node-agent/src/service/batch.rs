//! Batch mode of the relay protocol: a client that asks for the WebSocket
//! subprotocol [`SUBPROTOCOL`] in its handshake gets every text frame from
//! the agent as a JSON array of one or more relay messages, so the messages
//! pending for it leave in one frame instead of one frame each. What the
//! client sends is unchanged. Pure functions: choosing the subprotocol and
//! packing frames.

use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The subprotocol a client names in `Sec-WebSocket-Protocol` for batch mode.
pub const SUBPROTOCOL: &str = "edgewire.batch.v1";
/// Messages packed into one frame at most.
pub const MAX_MESSAGES: usize = 256;
/// Bytes packed into one frame at most, unless one message alone is larger
/// (it then goes in a frame of its own).
pub const MAX_BYTES: usize = 64 * 1024;

/// Whether the `Sec-WebSocket-Protocol` values a client sent (each a
/// comma-separated list) ask for batch mode. Any other subprotocol is not
/// chosen: the client gets the default framing and no subprotocol in the
/// answer, as RFC 6455 lets a server do.
pub fn asks_for_batch<'a>(offered: impl IntoIterator<Item = &'a str>) -> bool {
    offered
        .into_iter()
        .flat_map(|value| value.split(','))
        .any(|token| token.trim() == SUBPROTOCOL)
}

/// Packs relay messages (each a JSON object) into one batch frame: `[m1,m2,...]`.
#[derive(Debug, Default)]
pub struct Packer {
    text: String,
    count: usize,
}

impl Packer {
    /// Whether a message of `len` bytes may join this frame.
    pub fn fits(&self, len: usize) -> bool {
        self.count == 0 || (self.count < MAX_MESSAGES && self.text.len() + len < MAX_BYTES)
    }

    pub fn push(&mut self, message: &str) {
        self.text.push(if self.count == 0 { '[' } else { ',' });
        self.text.push_str(message);
        self.count += 1;
    }

    /// The frame; an empty packer gives an empty array.
    pub fn finish(mut self) -> Utf8Bytes {
        if self.count == 0 {
            self.text.push('[');
        }
        self.text.push(']');
        Utf8Bytes::from(self.text)
    }
}

/// One message alone as a batch frame.
pub fn single(message: &str) -> Utf8Bytes {
    let mut packer = Packer::default();
    packer.push(message);
    packer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_batch_subprotocol_is_chosen() {
        assert!(asks_for_batch(["edgewire.batch.v1"]));
        assert!(asks_for_batch(["chat, edgewire.batch.v1"]));
        assert!(asks_for_batch(["chat", " edgewire.batch.v1 "]));
        assert!(!asks_for_batch(["edgewire.batch.v2"]));
        assert!(!asks_for_batch(["Edgewire.Batch.V1"]), "tokens are exact");
        assert!(!asks_for_batch([]));
    }

    #[test]
    fn frames_are_json_arrays_of_the_messages() {
        let mut packer = Packer::default();
        packer.push(r#"{"type":"message","channel":"a","data":1}"#);
        packer.push(r#"{"type":"message","channel":"a","data":"x,]"}"#);
        let frame = packer.finish();
        let parsed: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!([
                {"type": "message", "channel": "a", "data": 1},
                {"type": "message", "channel": "a", "data": "x,]"}
            ])
        );
        assert_eq!(single("{}").as_str(), "[{}]");
        assert_eq!(Packer::default().finish().as_str(), "[]");
    }

    #[test]
    fn frames_are_bounded_in_messages_and_bytes_but_take_one_of_any_size() {
        let mut packer = Packer::default();
        assert!(packer.fits(10 * MAX_BYTES), "a large message goes alone");
        for _ in 0..MAX_MESSAGES {
            assert!(packer.fits(2));
            packer.push("{}");
        }
        assert!(!packer.fits(2));
        let mut packer = Packer::default();
        packer.push(&"x".repeat(MAX_BYTES - 100));
        assert!(packer.fits(50));
        assert!(!packer.fits(200));
    }
}
