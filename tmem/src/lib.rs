//! rdmem's page store: pages kept compressed, first in local memory and then on memory nodes,
//! behind the transcendent-memory API (`put`, `get`, `flush_page`, `flush_object`,
//! `flush_pool`) that Linux's frontswap and cleancache used. It is RAMster's idea (pool RAM
//! across machines, pages compressed) done from userspace over one-sided RDMA: remote space
//! comes from rdmem's allocator, pages move with one-sided WRITEs (batched, one doorbell) and
//! come back with one-sided READs; the memory node's CPU does nothing.
//!
//! - [`PageStore`]: the store (shared by a process's threads), its pools ([`PoolKind`]:
//!   persistent or ephemeral), options and statistics.
//! - [`StoreHandle`]: one thread's way in (`put`, `get`, the flushes, `remotify`).
//! - [`page`]: how a page is encoded (same-filled pages take no space; the others LZ4).
//! - [`nbd`]: an NBD server whose export is a pool's object, so Linux can swap to remote
//!   memory (the `rdmem-swap` binary, with the `rdma` feature).
//! - [`linux_swap`]: the plumbing of the swap test and benchmark (nbd-client, swapon, zram, a
//!   cgroup's `memory.max`, the `swap_workload` example).
//!
//! See [`store`] for where pages live and how the races between remotify, get and flush are
//! resolved.
//!
//! The name comes from Linux's transcendent memory (tmem), whose API this keeps. It is a crate
//! of its own beside the allocator because it builds on it (and on the core's endpoints) and
//! nothing below it needs it.

pub mod error;
pub mod linux_swap;
pub mod nbd;
pub mod page;
pub mod store;

pub use error::{Result, TmemError, Where};
pub use page::{PAGE_SIZE, Page};
pub use store::{
    Key, MAX_BATCH, MAX_POOLS, PageStore, PoolId, PoolKind, Remotifier, StoreHandle, StoreOptions, StoreStats,
};
