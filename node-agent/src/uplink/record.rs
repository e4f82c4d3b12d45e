//! One uplink message as the queue stores it on disk: a frame of
//! `len: u32 LE | crc32(body): u32 LE | body`, the body being
//! `seq: u64 LE | enqueued_ms: u64 LE | channel_len: u16 LE | channel | data`
//! (`data` the message's JSON text). The checksum finds a record torn by a
//! crash in the middle of a write. Pure functions.

/// Bytes before the body.
pub const HEADER: usize = 8;
const FIXED: usize = 8 + 8 + 2;

/// A queued message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its place in this node's queue: increasing, never reused.
    pub seq: u64,
    /// When it was queued, by this node's wall clock (milliseconds since
    /// the Unix epoch); only ever compared with the same node's clock.
    pub enqueued_ms: u64,
    pub channel: String,
    /// The message's `data`, as JSON text.
    pub data: String,
}

impl Record {
    /// The bytes it takes on disk, which is also what it counts against the
    /// queue's byte bound.
    pub fn size(&self) -> usize {
        HEADER + FIXED + self.channel.len() + self.data.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size());
        let body_len = self.size() - HEADER;
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.enqueued_ms.to_le_bytes());
        out.extend_from_slice(&(self.channel.len() as u16).to_le_bytes());
        out.extend_from_slice(self.channel.as_bytes());
        out.extend_from_slice(self.data.as_bytes());
        let crc = crc32fast::hash(&out[HEADER..]);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out
    }
}

/// What reading the front of a byte slice found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole record and the bytes it took.
    Record(Record, usize),
    /// The slice ends inside a record (a write cut short), or is empty.
    Short,
    /// The bytes are not a record (a torn or damaged write).
    Corrupt,
}

pub fn decode(bytes: &[u8]) -> Decoded {
    if bytes.len() < HEADER {
        return Decoded::Short;
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if len < FIXED {
        return Decoded::Corrupt;
    }
    let Some(body) = bytes.get(HEADER..HEADER + len) else {
        return Decoded::Short;
    };
    if crc32fast::hash(body) != crc {
        return Decoded::Corrupt;
    }
    let u64_at = |at: usize| {
        let mut raw = [0; 8];
        raw.copy_from_slice(&body[at..at + 8]);
        u64::from_le_bytes(raw)
    };
    let channel_len = u16::from_le_bytes([body[16], body[17]]) as usize;
    let Some(channel) = body.get(FIXED..FIXED + channel_len) else {
        return Decoded::Corrupt;
    };
    let (Ok(channel), Ok(data)) = (
        std::str::from_utf8(channel),
        std::str::from_utf8(&body[FIXED + channel_len..]),
    ) else {
        return Decoded::Corrupt;
    };
    Decoded::Record(
        Record {
            seq: u64_at(0),
            enqueued_ms: u64_at(8),
            channel: channel.to_string(),
            data: data.to_string(),
        },
        HEADER + len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Record {
        Record {
            seq,
            enqueued_ms: 1_700_000_000_000 + seq,
            channel: "telemetry".into(),
            data: format!(r#"{{"n":{seq},"s":"é"}}"#),
        }
    }

    #[test]
    fn records_round_trip_and_know_their_size() {
        let mut bytes = record(1).encode();
        bytes.extend(record(2).encode());
        assert_eq!(record(1).encode().len(), record(1).size());
        let Decoded::Record(first, used) = decode(&bytes) else {
            panic!("first record");
        };
        assert_eq!(first, record(1));
        assert_eq!(
            decode(&bytes[used..]),
            Decoded::Record(record(2), record(2).size())
        );
    }

    #[test]
    fn a_cut_or_damaged_record_is_recognised() {
        let bytes = record(7).encode();
        for cut in [0, 3, HEADER, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut]), Decoded::Short, "cut at {cut}");
        }
        let mut damaged = bytes.clone();
        let last = damaged.len() - 2;
        damaged[last] ^= 0x20;
        assert_eq!(decode(&damaged), Decoded::Corrupt);
        assert_eq!(
            decode(&[0xff; 32]),
            Decoded::Short,
            "a huge length is a cut write"
        );
        let mut tiny = bytes;
        tiny[0..4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode(&tiny), Decoded::Corrupt);
    }
}
