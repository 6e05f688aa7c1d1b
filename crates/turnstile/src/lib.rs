//! The `turnstile` binary as a library, so the integration tests can start
//! a whole cluster in-process. Only this crate uses clap, YAML and anyhow.
// `memory.rs` holds the crate's only `unsafe` (a call to `malloc_trim`).
#![deny(unsafe_code)]

/// `println!` for what commands print: when the reader went away
/// (`turnstile admin audit search | head -1`), the command ends quietly
/// instead of panicking on the broken pipe.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(e)
        }
    }};
}

/// Ends the process after a write to standard output failed: quietly (and
/// successfully, as the reader wanted no more) on a broken pipe.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("turnstile: error: cannot write to standard output: {e}");
    std::process::exit(1)
}

pub mod cli;
pub mod commands;
pub mod config;
pub mod host_cert;
pub mod identity_file;
pub mod memory;
pub mod metrics_endpoint;
pub mod process;
pub mod profile;
