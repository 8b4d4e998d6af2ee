//! rdmem's remote memory allocator: allocation and free done entirely from the client, with
//! one-sided verbs only. The memory node's CPU is never involved, and the memory node knows
//! nothing about this format: the first client formats a fresh (zeroed) pool.
//!
//! # Quick start
//! ```
//! use std::sync::Arc;
//! use rdmem_allocator::{Allocator, AllocatorOptions, RemoteBox};
//! use rdmem_core::LoopbackTransport;
//!
//! let transport = Arc::new(LoopbackTransport::new(&[64 << 20, 64 << 20])); // or RdmaTransport
//! let allocator = Allocator::new(transport, AllocatorOptions::default())?;
//! let alloc = allocator.thread()?; // one per thread
//!
//! let addr = alloc.alloc(std::alloc::Layout::from_size_align(100, 8).unwrap())?;
//! alloc.free(addr)?;
//!
//! let counter = RemoteBox::new(&alloc, 41u64)?; // freed when dropped
//! counter.write(&(counter.read()? + 1))?;
//! assert_eq!(counter.read()?, 42);
//! # Ok::<(), rdmem_allocator::AllocError>(())
//! ```
//!
//! # Model
//! - Level 1, on the pool ([`layout`]): a header, a bitmap of fixed-size chunks, and a
//!   descriptor per chunk (owner, size class, remote free list). A chunk is claimed by a CAS
//!   of its descriptor's owner word from 0, and only then is its bit set; it is released by
//!   clearing its bit, then its descriptor. So a client killed at any step leaves every chunk
//!   it touched naming it, and reclaiming it (below) loses nothing. Usage is the bitmap's
//!   count of set bits.
//! - Level 2, per thread ([`ThreadAlloc`]): each size class (powers of two from 16 bytes to half
//!   a chunk) carves blocks from a chunk the thread owns, mimalloc-style: allocating and freeing
//!   its own blocks costs no network operation; a refill claims a chunk in two round trips
//!   (the owner word's CAS, then its bit's CAS with the descriptor's WRITE). Blocks are
//!   aligned to their class, so alignments up to the chunk size hold. Larger requests take
//!   contiguous chunks: the first one's owner word, then the others' in one doorbell, each
//!   naming the first.
//! - Frees of blocks another thread or client owns go on that chunk's remote free list (a
//!   lock-free stack in the descriptor); the owner takes the list back when it runs short and on
//!   [`ThreadAlloc::flush`].
//! - Several memory nodes: [`Placement`] (round-robin, least-loaded by the pools' bitmaps,
//!   or one node) and [`Mode`]: stealing from other nodes when one is full, or strict,
//!   with an optional per-arena quota per node, failing with `OutOfMemory` naming the node.
//!
//! # Errors, not corruption
//! Zero-size and over-aligned or oversized requests, exhausted pools, addresses on unknown
//! nodes, outside the data area, inside a block or a free chunk, never-allocated slots of one's
//! own chunks, and double frees are errors.
//! - A double free of one's own block or of a large allocation is caught at once
//!   ([`AllocError::DoubleFree`]).
//! - A block on a remote free list carries a freed mark (its second word, see
//!   [`layout::FREED_MAGIC`]), so freeing it remotely again is caught at once by the freeing
//!   thread, whichever client it is in ([`AllocError::DoubleFree`]).
//! - What the freeing side cannot see (a block its owner freed itself, a never-allocated slot,
//!   or a block written to after its free, which erases the mark) is caught by the owner when
//!   it takes the list back: the walk is bounded by the chunk's block count and stops at the
//!   first bad link, the chunk is quarantined (never allocated from or released again, so no
//!   block is handed out twice), and the owner's next [`ThreadAlloc::flush`] returns
//!   [`AllocError::CorruptFreeList`] naming the block (found while allocating, it is also
//!   logged as a warning). The bad `free` itself returned `Ok`.
//!
//! Memory handed out by `alloc` is not zeroed: a block holds whatever its last user left (a
//! fresh pool is zero, and a freed block's first 16 bytes hold the free list's link and mark).
//!
//! # Dead clients
//! Every claimed chunk records its owner ([`layout::owner`]: the client table's node, the
//! client id, the arena). A client holds a slot in the client table on its cluster's first
//! node and beats it from a heartbeat thread every quarter of its lease
//! ([`AllocatorOptions::lease`], [`DEFAULT_CLIENT_LEASE`]); a client that exits cleanly frees
//! its slot. [`Allocator::reclaim_dead_clients`] (or `rdmem-pools reclaim`) takes back the
//! chunks of dead clients: those holding no slot, and those whose heartbeat has not moved for
//! two of their leases (their slot is freed too). Each chunk is taken by a CAS on its owner
//! word, so a racing reclaimer or free loses harmlessly; a reclaimer killed half-way leaves
//! the chunks it was releasing naming it, a dead client, for the next one. Everything a dead client allocated is
//! freed, even blocks others still use; a client stalled for two leases is taken for dead.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod boxed;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod layout;
pub mod pool;
pub mod roots;
pub mod stress;
mod table;

pub use alloc::{
    Allocator, AllocatorOptions, ClientSnapshot, DEFAULT_CLIENT_LEASE, Mode, Placement, Reclaimed, ThreadAlloc,
};
pub use boxed::RemoteBox;
pub use error::{AllocError, Result};
pub use pool::NodeUsage;
pub use roots::Root;
