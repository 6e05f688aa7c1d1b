//! One file per subcommand.

pub mod admin;
pub mod ssh;
pub mod start;
