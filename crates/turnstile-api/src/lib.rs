//! Turnstile's shared vocabulary: what the services say to each other and what
//! operators write, with no I/O but the transport of calls to auth
//! ([`auth_channel`]). Every other crate of the workspace depends on this one;
//! this one depends on no crate of ours.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth_channel;
pub mod clock;
pub mod door;
pub mod duration;
pub mod error;
pub mod identity;
pub mod labels;
pub mod lock;
pub mod metrics;
pub mod pin;
pub mod recording;
pub mod role;
pub mod rpc;
pub mod semaphore;

/// The version every process reports, shared so mismatches are visible in `Ping`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
