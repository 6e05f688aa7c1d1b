//! The single integration-test binary. `support` starts clusters; the other
//! modules are what users do with them.

mod access_plane;
mod cli;
mod cluster;
mod compromised_node;
mod forwarding;
mod ha;
mod host_identity;
mod locks;
mod object_stores;
mod openssh;
mod pre_auth;
mod pty;
mod recording;
mod recording_modes;
mod refusals;
mod session_control;
mod shutdown;
mod support;
mod web_console;
