//! Generated gRPC messages and service stubs of `proto/turnstile.proto`, and the
//! conversions between wire records and the typed values of this crate.

#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("turnstile.v1");
}

pub use proto::auth_client::AuthClient;
pub use proto::auth_server::{Auth, AuthServer};

/// The DNS name every auth server's TLS certificate carries, so that callers can
/// verify it whatever address they reach it by.
pub const AUTH_SERVER_NAME: &str = "turnstile-auth";
