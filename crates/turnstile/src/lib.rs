//! The `turnstile` binary as a library, so the integration tests can start
//! a whole cluster in-process. Only this crate uses clap, YAML and anyhow.
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod config;
pub mod identity_file;
pub mod process;
pub mod profile;
