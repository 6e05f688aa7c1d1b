//! The one binary: parses the command line, sets up logging to stderr, runs
//! the subcommand, prints the error chain and exits with the right status.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use turnstile::cli::{Cli, Command};
use turnstile::commands;

/// OpenSSH's status when the client itself fails.
const CLIENT_FAILURE: u8 = 255;

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn report(e: &anyhow::Error) {
    eprintln!("turnstile: error: {e:#}");
}

/// Runs a client command: errors exit 255, as OpenSSH's client does.
fn client_command(
    runtime: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    init_logging("warn");
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::from(CLIENT_FAILURE)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnstile: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Command::Start(args) => {
            init_logging("info");
            return match runtime.block_on(commands::start::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            };
        }
        Command::Login(args) => client_command(&runtime, commands::login::run(args)),
        Command::Ls(args) => client_command(&runtime, commands::ls::run(args)),
        Command::Play(args) => client_command(&runtime, commands::recordings::play(args)),
        Command::Recordings(cmd) => client_command(&runtime, commands::recordings::run(cmd)),
        Command::Ssh(args) => {
            init_logging("warn");
            let code = match runtime.block_on(commands::ssh::run(args)) {
                Ok(status) => u8::try_from(status).unwrap_or(CLIENT_FAILURE),
                Err(e) => {
                    report(&e);
                    CLIENT_FAILURE
                }
            };
            // Standard input may still be read by a blocking thread; don't wait for it.
            std::process::exit(i32::from(code));
        }
        Command::Admin(args) => {
            init_logging("warn");
            match runtime.block_on(commands::admin::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
    };
    // A client's standard input may still be read by a blocking thread (the
    // player's keys): dropping the runtime would wait for the next key.
    runtime.shutdown_background();
    code
}
