//! The agent's one wasmtime engine, shared by every `wasm` handler: the
//! pooling allocator (instances come from preallocated slots, so a fresh
//! instance per request is cheap, and a slot's written pages are reset in
//! place rather than faulted in anew), epoch interruption (a ticker advances the
//! epoch; a call checks its wall-clock deadline at each tick), and the linker:
//! WASI 0.2 and wasi:http, as `wasmtime serve` links them (components built
//! by language toolchains import `wasi:cli` and `wasi:filesystem` beside the
//! proxy world). What a call may reach is decided per call, in `call`: no
//! preopened directory, no socket, no environment.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::call::CallState;

/// How often running Wasm is interrupted to check its deadline and yield to
/// the other tasks of the agent.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Component instances alive at once across all handlers of the agent (the
/// pool's slots; each handler's `maxInstances` is a share of these).
const POOL_COMPONENT_INSTANCES: u32 = 256;
/// The largest linear memory the pool gives a slot; each handler's
/// `maxMemoryBytes` caps it lower.
const POOL_MAX_MEMORY: usize = 4 << 30;
/// Bytes of a slot's linear memory (and of its tables) reset in place when
/// an instance ends, rather than handed back to the kernel: only the pages
/// the instance wrote are copied back from the module's image or zeroed, so
/// the next instance in the slot finds them mapped instead of faulting each
/// in again. Pages written beyond this are handed back as before.
const POOL_KEEP_RESIDENT: usize = 2 << 20;

pub struct WasmHost {
    pub(super) engine: Engine,
    pub(super) linker: Linker<CallState>,
    /// Where precompiled code is kept, by module digest; `None` compiles
    /// every time (no writable state directory).
    pub(super) cache_dir: Option<PathBuf>,
}

impl WasmHost {
    /// Builds the engine and starts the epoch ticker.
    pub fn new(state_dir: Option<PathBuf>) -> wasmtime::Result<Arc<WasmHost>> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_COMPONENT_INSTANCES)
            .total_core_instances(POOL_COMPONENT_INSTANCES * 4)
            .total_memories(POOL_COMPONENT_INSTANCES * 2)
            .total_tables(POOL_COMPONENT_INSTANCES * 2)
            .total_stacks(POOL_COMPONENT_INSTANCES)
            .max_memory_size(POOL_MAX_MEMORY);
        // Resetting in place pays only where the kernel tells which pages
        // were written (PAGEMAP_SCAN, Linux 6.7); without it wasmtime would
        // rewrite the whole resident span on every call, so the slots are
        // then handed back to the kernel whole.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(POOL_KEEP_RESIDENT)
                .table_keep_resident(POOL_KEEP_RESIDENT);
        }
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        let cache_dir = state_dir.map(|dir| {
            dir.join("wasm-cache")
                .join(super::cache::engine_key(&engine))
        });

        // A thread of its own: a guest spinning on every async worker must
        // not be able to keep the ticker (and so its own deadline) from
        // running. It ends with the engine.
        let ticking = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticking.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Arc::new(WasmHost {
            engine,
            linker,
            cache_dir,
        }))
    }
}
