//! Allocates 1 MiB after 1 MiB and touches each, until the allocator fails.
//! The host's linear memory cap must end it (HTTP 500) without harming the
//! agent or the next call.

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

wasip2::http::proxy::export!(Bomb);

struct Bomb;

impl wasip2::exports::http::incoming_handler::Guest for Bomb {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        // 4 GiB is all a 32-bit linear memory can address; the cap comes first.
        for _ in 0..4096 {
            hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
        }
        example_common::respond_json(out, 200, &format!("{{\"held\":{}}}", hoard.len()));
    }
}
