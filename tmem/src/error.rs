//! What can go wrong with the page store.

use rdmem_allocator::AllocError;
use rdmem_core::GlobalAddr;

use crate::store::{Key, PoolId};

/// A page store error.
#[derive(Debug, thiserror::Error)]
pub enum TmemError {
    /// No pool has this id (never created, or destroyed).
    #[error("no pool {0}: it was never created or has been destroyed")]
    UnknownPool(PoolId),
    /// A persistent pool has no room: the local tier is full and no memory node could take more
    /// (the page was not stored; nothing else changed).
    #[error(
        "persistent pool {pool} is full: {local_bytes} bytes in the local tier (capacity {local_capacity}) and no memory node has room ({reason})"
    )]
    Full {
        /// The pool.
        pool: PoolId,
        /// Bytes in the local tier.
        local_bytes: usize,
        /// Its capacity.
        local_capacity: usize,
        /// Why no memory node took the pages (the allocator's error).
        reason: String,
    },
    /// A page's stored bytes do not decode to the page that was put (a remote block written by
    /// someone else, or memory corruption). The page is dropped from the store.
    #[error(
        "{key}: its stored bytes {at} do not decode to the page that was put (checksum or format mismatch); dropped"
    )]
    Corrupt {
        /// The page.
        key: Key,
        /// Where its bytes were ("locally", or the remote address).
        at: Where,
    },
    /// Options that cannot work.
    #[error("invalid page store options: {0}")]
    InvalidOptions(String),
    /// The remote allocator failed (other than by running out of memory).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A one-sided operation failed.
    #[error(transparent)]
    Transport(#[from] rdmem_core::Error),
}

/// Where a page's bytes were kept, for [`TmemError::Corrupt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// In the local tier.
    Local,
    /// In a memory node's pool.
    Remote(GlobalAddr),
}

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Where::Local => f.write_str("in the local tier"),
            Where::Remote(addr) => write!(f, "at {addr}"),
        }
    }
}

/// The page store's result type.
pub type Result<T> = std::result::Result<T, TmemError>;
