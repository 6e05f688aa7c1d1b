//! Session control on a node: a cluster-wide slot per connection for users
//! whose roles set `max_connections` (`ConnectionLease`), and a count of
//! session channels per connection for `max_sessions` (`ChannelLimit`). Both
//! give back what they hold the moment their guard is dropped.

mod channel_limit;
mod connection_lease;

pub use channel_limit::{ChannelLimit, ChannelSlot};
pub use connection_lease::{AcquireError, ConnectionLease, LeaseParams, LeaseService};
