//! What one call may use, enforced inside the store: linear memory (all the
//! instance's memories together) and table space. A refused growth makes
//! `memory.grow` fail as the Wasm spec says; the flag lets the caller tell a
//! call that died of it from any other trap.

use wasmtime::ResourceLimiter;

pub struct MemoryCap {
    max_bytes: usize,
    used_bytes: usize,
    /// Set when a growth was refused for the cap.
    pub hit: bool,
}

/// Table elements an instance may have; a pointer each, generous for
/// compiled languages' function tables.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl MemoryCap {
    pub fn new(max_bytes: u64) -> MemoryCap {
        MemoryCap {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            used_bytes: 0,
            hit: false,
        }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self
            .used_bytes
            .saturating_add(desired.saturating_sub(current));
        if after > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        self.used_bytes = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_memory_against_one_cap() {
        let mut cap = MemoryCap::new(3 * 65536);
        assert!(cap.memory_growing(0, 2 * 65536, None).unwrap());
        assert!(!cap.hit);
        assert!(
            cap.memory_growing(0, 65536, None).unwrap(),
            "a second memory"
        );
        assert!(!cap.memory_growing(65536, 2 * 65536, None).unwrap());
        assert!(cap.hit);
    }
}
