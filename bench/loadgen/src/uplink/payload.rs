//! What an uplink publisher sends and what the hub's subscriber makes of
//! it. A measured payload is `publisher:seq:sent_us:` padded with `.` to a
//! fixed size, `sent_us` on the load generator's own monotonic clock (the
//! subscriber is in the same process, so one clock judges both ends); a
//! warm-up payload is `w:publisher:`. The tally counts each publisher's
//! messages once and tells what was duplicated or reordered (and, by its count, lost).

/// A measured payload of exactly `size` bytes (longer only if its fields
/// alone are).
pub fn measured(publisher: usize, seq: u64, sent_us: u64, size: usize) -> String {
    let mut text = format!("{publisher}:{seq}:{sent_us}:");
    if text.len() < size {
        text.extend(std::iter::repeat_n('.', size - text.len()));
    }
    text
}

pub fn warm(publisher: usize) -> String {
    format!("w:{publisher}:")
}

#[derive(Debug, PartialEq, Eq)]
pub enum Payload {
    Warm {
        publisher: usize,
    },
    Measured {
        publisher: usize,
        seq: u64,
        sent_us: u64,
    },
}

pub fn parse(text: &str) -> Option<Payload> {
    let mut fields = text.split(':');
    let first = fields.next()?;
    if first == "w" {
        return Some(Payload::Warm {
            publisher: fields.next()?.parse().ok()?,
        });
    }
    Some(Payload::Measured {
        publisher: first.parse().ok()?,
        seq: fields.next()?.parse().ok()?,
        sent_us: fields.next()?.parse().ok()?,
    })
}

/// Sequences beyond this are not a publisher's (a run publishes far fewer):
/// counted as foreign rather than grown into a huge bitmap.
const MAX_SEQ: u64 = 50_000_000;

/// What arrived of each publisher's messages.
#[derive(Debug)]
pub struct Tally {
    seen: Vec<Vec<u64>>,
    /// Per publisher, one past the highest sequence seen.
    next: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
    /// Arrived after a later message of the same publisher.
    pub reordered: u64,
    /// Not a payload of this run's publishers.
    pub foreign: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    New,
    Duplicate,
    Foreign,
}

impl Tally {
    pub fn new(publishers: usize) -> Tally {
        Tally {
            seen: vec![Vec::new(); publishers],
            next: vec![0; publishers],
            unique: 0,
            duplicates: 0,
            reordered: 0,
            foreign: 0,
        }
    }

    pub fn record(&mut self, publisher: usize, seq: u64) -> Arrival {
        let Some(bits) = self.seen.get_mut(publisher) else {
            self.foreign += 1;
            return Arrival::Foreign;
        };
        if seq >= MAX_SEQ {
            self.foreign += 1;
            return Arrival::Foreign;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        bits[word] |= 1 << bit;
        self.unique += 1;
        if seq < self.next[publisher] {
            self.reordered += 1;
        } else {
            self.next[publisher] = seq + 1;
        }
        Arrival::New
    }

    /// Up to `limit` of the messages never seen, as (publisher, sequence),
    /// given how many each publisher sent.
    pub fn missing(&self, published: &[u64], limit: usize) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (publisher, &count) in published.iter().enumerate() {
            let bits = self.seen.get(publisher).map(Vec::as_slice).unwrap_or(&[]);
            for seq in 0..count {
                let word = bits.get((seq / 64) as usize).copied().unwrap_or(0);
                if word & (1 << (seq % 64)) == 0 {
                    if out.len() == limit {
                        return out;
                    }
                    out.push((publisher, seq));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_at_a_fixed_size() {
        let text = measured(2, 41, 123_456, 256);
        assert_eq!(text.len(), 256);
        assert_eq!(
            parse(&text),
            Some(Payload::Measured {
                publisher: 2,
                seq: 41,
                sent_us: 123_456
            })
        );
        assert_eq!(parse(&warm(1)), Some(Payload::Warm { publisher: 1 }));
        assert_eq!(parse("hello"), None);
    }

    #[test]
    fn the_tally_tells_duplicates_reorders_and_losses() {
        let mut tally = Tally::new(2);
        assert_eq!(tally.record(0, 0), Arrival::New);
        assert_eq!(tally.record(0, 2), Arrival::New);
        assert_eq!(tally.record(0, 1), Arrival::New);
        assert_eq!(tally.record(0, 2), Arrival::Duplicate);
        assert_eq!(tally.record(1, 100), Arrival::New);
        assert_eq!(tally.record(5, 0), Arrival::Foreign);
        assert_eq!(tally.record(1, MAX_SEQ), Arrival::Foreign);
        assert_eq!(
            (
                tally.unique,
                tally.duplicates,
                tally.reordered,
                tally.foreign
            ),
            (4, 1, 1, 2)
        );
        // Publisher 0 sent 0..=3 (3 never came), publisher 1 sent 0..=100
        // (only 100 came).
        assert_eq!(tally.missing(&[4, 101], 3), [(0, 3), (1, 0), (1, 1)]);
        assert_eq!(tally.missing(&[4, 101], 1000).len(), 101);
        assert_eq!(tally.missing(&[3, 101], 1000).last(), Some(&(1, 99)));
    }
}
