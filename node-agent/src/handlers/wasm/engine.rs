//! The agent's one wasmtime engine, shared by every `wasm` handler: the
//! pooling allocator (instances come from preallocated slots, so a fresh
//! instance per request is cheap), epoch interruption (a ticker advances the
//! epoch; a call checks its wall-clock deadline at each tick), and the linker
//! for the wasi:http proxy world (no filesystem, no sockets: only what the
//! proxy world imports).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

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

pub struct WasmHost {
    pub(super) engine: Engine,
    pub(super) linker: Linker<CallState>,
    /// Where precompiled code is kept, by module digest; `None` compiles
    /// every time (no writable state directory).
    pub(super) cache_dir: Option<PathBuf>,
    _ticker: AbortOnDropHandle<()>,
}

impl WasmHost {
    /// Builds the engine and starts the epoch ticker (needs a tokio runtime).
    pub fn new(state_dir: Option<PathBuf>) -> wasmtime::Result<Arc<WasmHost>> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_COMPONENT_INSTANCES)
            .total_core_instances(POOL_COMPONENT_INSTANCES * 4)
            .total_memories(POOL_COMPONENT_INSTANCES * 2)
            .total_tables(POOL_COMPONENT_INSTANCES * 2)
            .total_stacks(POOL_COMPONENT_INSTANCES)
            .max_memory_size(POOL_MAX_MEMORY);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi_http::p2::add_to_linker_async(&mut linker)?;
        let cache_dir = state_dir.map(|dir| dir.join("wasm-cache").join(super::cache::engine_key(&engine)));

        let ticking = engine.clone();
        let ticker = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EPOCH_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                ticking.increment_epoch();
            }
        }));
        Ok(Arc::new(WasmHost {
            engine,
            linker,
            cache_dir,
            _ticker: ticker,
        }))
    }
}
