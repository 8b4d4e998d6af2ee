//! Locks by id: a table of lock words in remote memory, spread over the memory nodes.
//!
//! Lock `id` lives on node `id % nodes`, in that node's part of the table at index
//! `id / nodes`, so consecutive ids land on different nodes and spread the atomics' load.

use std::time::Duration;

use rdmem_core::GlobalAddr;

use super::error::{LockError, Result};
use super::lock::RemoteLock;

/// Where the lock words are: one 8-aligned region per memory node.
#[derive(Debug, Clone)]
pub struct LockTable {
    bases: Vec<GlobalAddr>,
    count: u64,
}

impl LockTable {
    /// A table of `count` locks over the regions at `bases` (one per node, each with room for
    /// `count.div_ceil(bases.len())` zeroed words: allocate them with
    /// `rdmem_allocator::ThreadAlloc::alloc_zeroed`, as `alloc` does not zero). Every process
    /// must use the same bases.
    pub fn new(bases: Vec<GlobalAddr>, count: u64) -> Result<Self> {
        if let Some(&word) = bases.iter().find(|b| !b.is_aligned(8)) {
            return Err(LockError::Misaligned { word });
        }
        if bases.is_empty() {
            return Err(LockError::IdOutOfRange { id: 0, count: 0 });
        }
        Ok(LockTable { bases, count })
    }

    /// The number of locks.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True for an empty table.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The word of lock `id`.
    pub fn word(&self, id: u64) -> Result<GlobalAddr> {
        if id >= self.count {
            return Err(LockError::IdOutOfRange { id, count: self.count });
        }
        let n = self.bases.len() as u64;
        let base = self.bases[(id % n) as usize];
        Ok(base.checked_add((id / n) * 8).expect("table inside the pool"))
    }

    /// Lock `id`, taken as `holder` with `lease`.
    pub fn lock(&self, id: u64, holder: u32, lease: Duration) -> Result<RemoteLock> {
        RemoteLock::new(self.word(id)?, holder, lease)
    }
}
