//! Everything on russh: the node that runs sessions, the proxy users enter
//! through, the client behind `turnstile ssh`, and the cached view of the
//! cluster they share. Reaches auth only through its gRPC API.
#![deny(unsafe_code)]

pub mod audit_forwarder;
pub mod audit_queue;
pub mod client;
pub mod cluster_view;
pub mod identity;
pub mod join;
pub mod live;
pub mod node;
pub mod pre_auth;
pub mod proxy;
pub mod proxy_header;
pub mod server;
pub mod session_control;
pub mod user_cert;
