//! What travels on a mesh link (inside Noise, see `noise`): interest as JSON
//! text frames, and publishes as binary frames that carry the relay message
//! as bytes, length-delimited, never re-escaped inside JSON (see [`Publish`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum LinkFrame {
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
}

impl LinkFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A publish at the sender. `message` is the relay frame to deliver as is;
/// `sent_us` the publish time (µs since the Unix epoch) for the mesh latency
/// metric.
///
/// On the link, one binary WebSocket frame:
/// `1u8 | service length u16 | service | channel length u16 | channel |
/// sent_us u64 | message`, integers big-endian, the message running to the
/// end of the frame (whose length the WebSocket framing gives).
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    pub service: String,
    pub channel: String,
    pub sent_us: u64,
    pub message: Utf8Bytes,
}

const PUBLISH: u8 = 1;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the frame ends inside its header")]
    Truncated,
    #[error("unknown binary frame kind {0}")]
    UnknownKind(u8),
    #[error("a name or the message is not valid UTF-8")]
    InvalidUtf8,
    #[error("a name is longer than 65535 bytes")]
    NameTooLong,
}

impl Publish {
    /// Encodes the publish once; the result is shared by every link.
    pub fn encode(
        service: &str,
        channel: &str,
        sent_us: u64,
        message: &[u8],
    ) -> Result<Bytes, FrameError> {
        let service_len = u16::try_from(service.len()).map_err(|_| FrameError::NameTooLong)?;
        let channel_len = u16::try_from(channel.len()).map_err(|_| FrameError::NameTooLong)?;
        let mut out =
            BytesMut::with_capacity(1 + 2 + service.len() + 2 + channel.len() + 8 + message.len());
        out.put_u8(PUBLISH);
        out.put_u16(service_len);
        out.put_slice(service.as_bytes());
        out.put_u16(channel_len);
        out.put_slice(channel.as_bytes());
        out.put_u64(sent_us);
        out.put_slice(message);
        Ok(out.freeze())
    }

    /// Decodes a binary frame; the message shares the frame's bytes.
    pub fn decode(mut frame: Bytes) -> Result<Publish, FrameError> {
        fn name(frame: &mut Bytes) -> Result<String, FrameError> {
            if frame.remaining() < 2 {
                return Err(FrameError::Truncated);
            }
            let len = usize::from(frame.get_u16());
            if frame.remaining() < len {
                return Err(FrameError::Truncated);
            }
            String::from_utf8(frame.split_to(len).to_vec()).map_err(|_| FrameError::InvalidUtf8)
        }
        if !frame.has_remaining() {
            return Err(FrameError::Truncated);
        }
        match frame.get_u8() {
            PUBLISH => {}
            kind => return Err(FrameError::UnknownKind(kind)),
        }
        let service = name(&mut frame)?;
        let channel = name(&mut frame)?;
        if frame.remaining() < 8 {
            return Err(FrameError::Truncated);
        }
        let sent_us = frame.get_u64();
        let message = Utf8Bytes::try_from(frame).map_err(|_| FrameError::InvalidUtf8)?;
        Ok(Publish {
            service,
            channel,
            sent_us,
            message,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_round_trips_and_costs_its_bytes_plus_a_small_header() {
        let message = format!(
            r#"{{"type":"message","channel":"c","data":"{}"}}"#,
            "\\\"".repeat(1000)
        );
        let frame = Publish::encode("ns/svc", "c", 42, message.as_bytes()).unwrap();
        assert_eq!(
            frame.len(),
            message.len() + 1 + 2 + 6 + 2 + 1 + 8,
            "no escaping"
        );
        let publish = Publish::decode(frame).unwrap();
        assert_eq!(
            publish,
            Publish {
                service: "ns/svc".into(),
                channel: "c".into(),
                sent_us: 42,
                message: Utf8Bytes::from(message),
            }
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        let good = Publish::encode("s", "c", 1, b"hello").unwrap();
        for cut in 0..(1 + 2 + 1 + 2 + 1 + 8) {
            assert_eq!(
                Publish::decode(good.slice(..cut)).unwrap_err(),
                FrameError::Truncated,
                "cut at {cut}"
            );
        }
        let mut other = good.to_vec();
        other[0] = 9;
        assert_eq!(
            Publish::decode(Bytes::from(other)).unwrap_err(),
            FrameError::UnknownKind(9)
        );
        let bad_utf8 = Publish::encode("s", "c", 1, &[0xff, 0xfe]).unwrap();
        assert_eq!(
            Publish::decode(bad_utf8).unwrap_err(),
            FrameError::InvalidUtf8
        );
        assert_eq!(
            Publish::encode(&"s".repeat(70_000), "c", 1, b"").unwrap_err(),
            FrameError::NameTooLong
        );
    }
}
