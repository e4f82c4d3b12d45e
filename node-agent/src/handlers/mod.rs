//! Compute handlers. The built-in ones are pure functions (`builtin`); `wasm`
//! runs a user's WebAssembly component; `upstream` forwards to an HTTP(S)
//! service; `set` is one service's handlers by name, built when the service
//! starts.

pub mod builtin;
pub mod set;
pub mod upstream;
pub mod wasm;

pub use builtin::{HandlerError, HttpAnswer, call, echo, http_get};
pub use set::{Handler, HandlerSet};
