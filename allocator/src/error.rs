//! The allocator's errors.

use rdmem_core::{GlobalAddr, NodeId};

/// Why an allocation or a free failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// A zero-byte request.
    #[error("cannot allocate zero bytes")]
    ZeroSize,
    /// The alignment is not a power of two, or larger than a chunk.
    #[error("alignment {align} is not supported: use a power of two up to the chunk size ({chunk_size} bytes)")]
    BadAlignment {
        /// The alignment asked for.
        align: u64,
        /// The pool's chunk size.
        chunk_size: u64,
    },
    /// The request is larger than any node's pool could hold.
    #[error("{size} bytes is more than a memory node can hold ({max} bytes)")]
    TooLarge {
        /// Bytes asked for.
        size: u64,
        /// The largest allocation possible.
        max: u64,
    },
    /// No memory left where the placement and mode allow.
    #[error("out of memory on {node}: {reason}")]
    OutOfMemory {
        /// The node that could not serve the request.
        node: NodeId,
        /// Pool full, or the quota reached.
        reason: String,
    },
    /// The block was already freed.
    #[error("double free of {addr}")]
    DoubleFree {
        /// The address.
        addr: GlobalAddr,
    },
    /// A chunk's remote free list held a block that is not a live block of the chunk: a block
    /// was freed twice (or a stray address freed) in a way the freeing side could not see.
    /// The chunk is quarantined: nothing more is allocated from it and it is never released,
    /// so no block is handed out twice.
    #[error(
        "the remote free list of chunk {chunk} on {node} held {block}, {reason}: a double free (or a stray free) by another thread or client; the chunk is quarantined and never reused"
    )]
    CorruptFreeList {
        /// The node.
        node: NodeId,
        /// The chunk's index.
        chunk: u64,
        /// The bad block.
        block: GlobalAddr,
        /// What is wrong with it.
        reason: String,
    },
    /// The address was never handed out by an allocator of this pool.
    #[error("{addr} was not allocated: {reason}")]
    InvalidAddress {
        /// The address.
        addr: GlobalAddr,
        /// What is wrong with it.
        reason: String,
    },
    /// A fixed limit of the allocator was reached (thread allocators per client, ...).
    #[error("{what}: the limit is {limit}")]
    Limit {
        /// What ran out.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// The options cannot work (a lease too short, a transport with no memory node, ...).
    #[error("bad allocator options: {0}")]
    BadOptions(String),
    /// A named root that cannot be opened or set (empty name, full table, address 0).
    #[error("root {name:?}: {reason}")]
    BadRoot {
        /// The root's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A node's pool is not in rdmem's format, or in another version.
    #[error("the pool of {node} is not usable: {reason}")]
    BadPool {
        /// The node.
        node: NodeId,
        /// What was found.
        reason: String,
    },
    /// The network operation underneath failed.
    #[error(transparent)]
    Transport(#[from] rdmem_core::Error),
}

/// `Result` with [`AllocError`].
pub type Result<T, E = AllocError> = std::result::Result<T, E>;
