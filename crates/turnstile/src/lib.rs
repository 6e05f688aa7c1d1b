//! The `turnstile` binary as a library, so the integration tests can start
//! a whole cluster in-process. Only this crate uses clap, YAML and anyhow.
// `memory.rs` holds the crate's only `unsafe` (a call to `malloc_trim`).
#![deny(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod config;
pub mod identity_file;
pub mod memory;
pub mod metrics_endpoint;
pub mod process;
pub mod profile;
