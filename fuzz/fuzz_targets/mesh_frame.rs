//! What a peer sends on a mesh link: a binary publish frame (one publish or
//! a batch of them) either decodes or is refused, never panics, and what
//! decodes encodes back to the same bytes; a text control frame either
//! parses or is refused.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

// The agent's own codec, compiled here alone: the fuzz build then needs
// none of the agent's runtime (Kubernetes client, Wasm engine).
#[allow(dead_code)]
#[path = "../../node-agent/src/mesh/frame.rs"]
mod frame;

use frame::{LinkFrame, Publish, decode_publishes, encode_batch};

fn encode(publish: &Publish) -> Bytes {
    Publish::encode(
        &publish.service,
        &publish.channel,
        publish.sent_us,
        publish.message.as_bytes(),
    )
    .unwrap_or_else(|e| panic!("{publish:?} decoded but does not encode: {e}"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(publish) = Publish::decode(Bytes::copy_from_slice(data)) {
        assert_eq!(&encode(&publish)[..], data);
    }
    if let Ok(publishes) = decode_publishes(Bytes::copy_from_slice(data)) {
        let frames: Vec<Bytes> = publishes.iter().map(encode).collect();
        let encoded = match frames.as_slice() {
            [one] if data.first() != Some(&2) => one.clone(),
            _ => encode_batch(frames.iter().map(|f| &f[..])),
        };
        assert_eq!(&encoded[..], data);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(frame) = serde_json::from_str::<LinkFrame>(text)
    {
        let again: LinkFrame = serde_json::from_str(&frame.to_json())
            .unwrap_or_else(|e| panic!("{frame:?} written back does not parse: {e}"));
        assert_eq!(again, frame);
    }
});
