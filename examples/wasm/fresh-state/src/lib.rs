//! Tells what a call finds left by earlier calls, then leaves its own marks:
//! a static with an initial value (in the module's data), a zeroed static
//! (in its bss), one word in each page of a zeroed 256 KiB array, and a word
//! in each page of a heap buffer it grows memory for. A host that runs each
//! call in a fresh instance answers `{"data":7,"bss":0,"pages":0,"heap":0}`
//! every time.

use std::sync::atomic::{AtomicU64, Ordering};

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

wasip2::http::proxy::export!(FreshState);

const PAGE_WORDS: usize = 65536 / 8;
const PAGES: usize = 4;
/// More than the initial heap holds, so memory grows on each call.
const HEAP_BYTES: usize = 1 << 20;

static DATA: AtomicU64 = AtomicU64::new(7);
static BSS: AtomicU64 = AtomicU64::new(0);
static ARRAY: [AtomicU64; PAGE_WORDS * PAGES] = [const { AtomicU64::new(0) }; PAGE_WORDS * PAGES];

struct FreshState;

impl wasip2::exports::http::incoming_handler::Guest for FreshState {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let data = DATA.fetch_add(1, Ordering::Relaxed);
        let bss = BSS.fetch_add(1, Ordering::Relaxed);
        let pages = (0..PAGES)
            .filter(|page| ARRAY[page * PAGE_WORDS].swap(1, Ordering::Relaxed) != 0)
            .count();
        // Zeroed by the allocator's request for fresh memory: a page that
        // reads non-zero before this call writes it was left by another.
        let mut heap = std::hint::black_box(vec![0u64; HEAP_BYTES / 8]);
        let stale = heap.iter().step_by(PAGE_WORDS).filter(|w| **w != 0).count();
        for word in heap.iter_mut().step_by(PAGE_WORDS) {
            *word = u64::MAX;
        }
        std::hint::black_box(&heap);
        example_common::respond_json(
            out,
            200,
            &format!(r#"{{"data":{data},"bss":{bss},"pages":{pages},"heap":{stale}}}"#),
        );
    }
}
