//! What travels on a mesh link (inside Noise, see `noise`): interest as JSON
//! text frames, and publishes as binary frames that carry the relay message
//! as bytes, length-delimited, never re-escaped inside JSON (see [`Publish`]).
//! Several queued publishes may travel as one binary frame, a batch (see
//! [`encode_batch`]), once the peer said it reads them.

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
    /// Sent by the accepting side of a link: it reads publish batches, so
    /// the dialer may send them. A dialer that never hears it (an agent of
    /// an earlier version) sends one publish per frame.
    PublishBatches,
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
    /// Both names share the frame's bytes, as the message does: a publish
    /// read from a link allocates nothing of its own.
    pub service: Utf8Bytes,
    pub channel: Utf8Bytes,
    pub sent_us: u64,
    pub message: Utf8Bytes,
}

const PUBLISH: u8 = 1;
/// `2u8 | (publish frame length u32 | publish frame)*`, at least one
/// publish, each a whole kind-1 frame.
const PUBLISH_BATCH: u8 = 2;
/// What a publish costs in a batch beyond its own frame.
pub const BATCH_ENTRY: usize = 4;

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
    #[error("a publish batch holds no publish, or one that is not a plain publish")]
    BadBatch,
}

/// How many of the leading `frames` (publish frame lengths, in queue order)
/// one batch of at most `max_bytes` carries; 0 or 1 means the first goes
/// alone, as a plain publish frame.
pub fn batch_len(frames: impl IntoIterator<Item = usize>, max_bytes: usize) -> usize {
    let mut bytes = 1;
    let mut count = 0;
    for len in frames {
        bytes += BATCH_ENTRY + len;
        if bytes > max_bytes {
            break;
        }
        count += 1;
    }
    count
}

/// Packs publish frames (each from [`Publish::encode`]) into one batch frame.
pub fn encode_batch<'a>(frames: impl Iterator<Item = &'a [u8]> + Clone) -> Bytes {
    let size = 1 + frames.clone().map(|f| BATCH_ENTRY + f.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(PUBLISH_BATCH);
    for frame in frames {
        // A publish frame is bounded by the link's frame limit, far below 4 GiB.
        out.put_u32(u32::try_from(frame.len()).unwrap_or(u32::MAX));
        out.put_slice(frame);
    }
    out.freeze()
}

/// Decodes a binary link frame: a plain publish or each publish of a batch,
/// in order. A batch is refused whole if any part of it is malformed.
pub fn decode_publishes(mut frame: Bytes) -> Result<Vec<Publish>, FrameError> {
    if frame.first() != Some(&PUBLISH_BATCH) {
        return Publish::decode(frame).map(|p| vec![p]);
    }
    frame.advance(1);
    let mut publishes = Vec::new();
    while frame.has_remaining() {
        if frame.remaining() < BATCH_ENTRY {
            return Err(FrameError::Truncated);
        }
        let len = usize::try_from(frame.get_u32()).map_err(|_| FrameError::Truncated)?;
        if frame.remaining() < len {
            return Err(FrameError::Truncated);
        }
        let one = frame.split_to(len);
        if one.first() != Some(&PUBLISH) {
            return Err(FrameError::BadBatch);
        }
        publishes.push(Publish::decode(one)?);
    }
    if publishes.is_empty() {
        return Err(FrameError::BadBatch);
    }
    Ok(publishes)
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
        fn name(frame: &mut Bytes) -> Result<Utf8Bytes, FrameError> {
            if frame.remaining() < 2 {
                return Err(FrameError::Truncated);
            }
            let len = usize::from(frame.get_u16());
            if frame.remaining() < len {
                return Err(FrameError::Truncated);
            }
            Utf8Bytes::try_from(frame.split_to(len)).map_err(|_| FrameError::InvalidUtf8)
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

    #[test]
    fn a_batch_carries_its_publishes_in_order_and_a_plain_frame_decodes_as_one() {
        let frames: Vec<Bytes> = (0..3)
            .map(|i| Publish::encode("s", &format!("c{i}"), i, b"{}").unwrap())
            .collect();
        let batch = encode_batch(frames.iter().map(|f| &f[..]));
        assert_eq!(
            batch.len(),
            1 + frames.iter().map(|f| BATCH_ENTRY + f.len()).sum::<usize>()
        );
        let publishes = decode_publishes(batch).unwrap();
        let channels: Vec<&str> = publishes.iter().map(|p| p.channel.as_str()).collect();
        assert_eq!(channels, ["c0", "c1", "c2"]);
        assert_eq!(
            decode_publishes(frames[0].clone()).unwrap(),
            [Publish::decode(frames[0].clone()).unwrap()]
        );
    }

    #[test]
    fn malformed_batches_are_refused_whole() {
        let one = Publish::encode("s", "c", 1, b"hello").unwrap();
        let batch = encode_batch([&one[..], &one[..]].into_iter());
        let first_whole = 1 + BATCH_ENTRY + one.len();
        for cut in (1..batch.len()).filter(|&cut| cut != first_whole) {
            assert!(
                decode_publishes(batch.slice(..cut)).is_err(),
                "cut at {cut} decodes"
            );
        }
        assert_eq!(
            decode_publishes(batch.slice(..first_whole)).unwrap().len(),
            1,
            "a batch of the first publish alone"
        );
        assert_eq!(
            decode_publishes(Bytes::from_static(&[PUBLISH_BATCH])).unwrap_err(),
            FrameError::BadBatch,
            "empty"
        );
        let nested = encode_batch([&batch[..]].into_iter());
        assert_eq!(
            decode_publishes(nested).unwrap_err(),
            FrameError::BadBatch,
            "a batch inside a batch"
        );
    }

    #[test]
    fn a_batch_takes_what_fits_and_a_large_publish_goes_alone() {
        let fit = 1 + 3 * (BATCH_ENTRY + 100);
        assert_eq!(batch_len([100; 10], fit), 3);
        assert_eq!(batch_len([100; 10], fit - 1), 2);
        assert_eq!(batch_len([100, 100], 4096), 2, "no more than is queued");
        assert_eq!(batch_len([5000, 100], 4096), 0, "too large for a batch");
        assert_eq!(
            batch_len([100, 5000, 100], 4096),
            1,
            "stops at the first that does not fit"
        );
        assert_eq!(batch_len([], 4096), 0);
    }
}
