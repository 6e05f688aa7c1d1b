//! The auth service: the cluster's certificate authorities, users, roles and
//! node presence, kept in a [`backend::Backend`] and served over gRPC on mutual
//! TLS. Nodes, proxies and the admin CLI reach it only through that API.
#![forbid(unsafe_code)]

pub mod audit_log;
pub mod authority;
pub mod backend;
pub mod ca;
pub mod change_feed;
pub mod cluster_config;
pub mod locks;
pub mod login_guard;
pub mod passwords;
pub mod recording_stream;
pub mod recordings;
pub mod rpc;
pub mod semaphores;
pub mod service;
pub mod session_trackers;
pub mod tokens;

pub use authority::Authority;

pub use service::{AuthService, AuthServiceConfig};
