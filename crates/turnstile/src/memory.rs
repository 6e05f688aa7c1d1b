//! Gives back to the system memory the allocator keeps but does not use.
//! glibc's malloc keeps freed memory in its arenas (one per thread that
//! allocated): after a bulk session, a service's resident memory would stay
//! near its peak for good. A service trims every [`TRIM_EVERY`]. This module
//! holds the crate's only `unsafe`: the call to `malloc_trim(3)`, which takes
//! an integer, has no preconditions and touches only malloc's own state.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a running service gives unused memory back.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Trims until `shutdown`.
pub fn spawn_trimmer(shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TRIM_EVERY) => {}
            }
            // Walking the arenas takes a while when they are large: off the workers.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it releases free memory of
    // malloc's arenas and returns whether it released any.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
