//! Benchmarks that print a table: `turnstile-bench semaphores|recording|sessions|audit`
//! (see each module).
//!
//! Starts a one-process cluster (auth on SQLite, proxy, node) on loopback in
//! a temporary directory and measures, from the node's side of the gRPC API
//! (its own TLS identity, so every number includes the RPC to auth):
//! - connection-slot acquire and acquire+release latency, and throughput, with
//!   1, 16 and 64 contenders on one user's semaphore;
//! - the time to connect and run `true` for a user with `max_connections`
//!   against one without, with Turnstile's client and with OpenSSH, next to
//!   OpenSSH's own sshd as a baseline.
#![forbid(unsafe_code)]

use anyhow::bail;

mod audit;
mod common;
mod recording;
mod semaphores;
mod sessions;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_default();
    match what.as_str() {
        "semaphores" => semaphores::run().await,
        "recording" => recording::run().await,
        "sessions" => sessions::run().await,
        "audit" => audit::run().await,
        _ => bail!("usage: turnstile-bench semaphores|recording|sessions|audit"),
    }
}
