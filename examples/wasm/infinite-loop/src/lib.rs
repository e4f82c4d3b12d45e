//! Never answers: spins forever. The host's per-call deadline must end it
//! (HTTP 504) without harming the next call.

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

wasip2::http::proxy::export!(Spin);

struct Spin;

impl wasip2::exports::http::incoming_handler::Guest for Spin {
    fn handle(_request: IncomingRequest, _out: ResponseOutparam) {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}
