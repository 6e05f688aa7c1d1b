//! One file per subcommand.

pub mod admin;
pub mod login;
pub mod ls;
pub mod recordings;
pub mod ssh;
pub mod start;
