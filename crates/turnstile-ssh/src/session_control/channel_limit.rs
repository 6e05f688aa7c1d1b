//! `max_sessions`: the session channels open on one connection, counted by
//! guards. A channel's slot is given back exactly once, when its guard drops.
//! The set of open channels is also who to tell when the connection must close.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use russh::ChannelId;

#[derive(Debug, Default)]
pub struct ChannelLimit {
    /// 0 = unlimited.
    max: u32,
    open: Mutex<BTreeSet<ChannelId>>,
}

/// One open session channel; dropping it frees the slot.
#[derive(Debug)]
pub struct ChannelSlot {
    limit: Arc<ChannelLimit>,
    id: ChannelId,
}

impl ChannelLimit {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// A slot for channel `id`, or `None` at the limit.
    pub fn try_open(self: &Arc<Self>, id: ChannelId) -> Option<ChannelSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.max > 0 && open.len() >= self.max as usize {
            return None;
        }
        open.insert(id);
        Some(ChannelSlot {
            limit: self.clone(),
            id,
        })
    }

    /// The channels open now.
    pub fn open_channels(&self) -> Vec<ChannelId> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    pub fn count(&self) -> u32 {
        u32::try_from(self.open.lock().unwrap_or_else(|e| e.into_inner()).len()).unwrap_or(u32::MAX)
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.limit
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}
