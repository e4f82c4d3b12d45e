//! Client authentication: a service's token rules, the decision a token
//! leads to, and what the decided access allows.
//!
//! - [`access`]: what a client may do, and the labels of each decision (pure).
//! - [`token`]: where a request carries its token (pure).
//! - [`verify`]: a service's key and rules, turning a token into access.

pub mod access;
pub mod token;
pub mod verify;

pub use access::{Access, Action, Decision, Refusal};
pub use verify::{Authenticator, KeyError};
