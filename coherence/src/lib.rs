//! rdmem's shared-memory layer: synchronization built from one-sided RDMA atomics, and a
//! scope-consistent distributed shared memory on top of it.
//!
//! # Where things are
//! | module     | what                                                                         |
//! |------------|------------------------------------------------------------------------------|
//! | [`sync`]   | [`RemoteLock`], [`CohortLock`] (local handover), [`RwLock`], [`RemoteBarrier`], [`LockTable`] |
//! | [`dsm`]    | [`Dsm`](dsm::Dsm): shared allocations, cached pages, locks and barriers with scope consistency |
//! | [`dsm::launch`] | rank and size from `rdmem-run`, mpirun or srun ([`dsm::launch::Rank`])  |
//! | `src/bin/rdmem-run.rs` | the launcher: starts N ranks (and a memory node if none is configured) |
//! | `src/bin/rdmem-locks.rs` | lock and barrier workloads across processes, for the device tests |
//!
//! The page cache the DSM reads through is its own crate, `rdmem-cache` (it depends only on
//! `rdmem-core`); the application kernels (SOR, matrix product, histogram, litmus tests) live
//! in the `rdmem-apps` package.
//!
//! # Quick start
//! ```
//! use std::time::Duration;
//! use rdmem_coherence::{CohortLock, RemoteLock};
//! use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};
//!
//! let transport = LoopbackTransport::new(&[1 << 20]);
//! let mut ep = transport.endpoint()?;
//! let word = GlobalAddr::new(NodeId(0), 4096).unwrap();
//! let counter = GlobalAddr::new(NodeId(0), 8192).unwrap();
//!
//! let lock = CohortLock::new(RemoteLock::new(word, /* holder id */ 1, Duration::from_secs(2))?, 8);
//! let mut guard = lock.lock(&mut ep)?; // threads of this process hand it over locally
//! let n = guard.endpoint().read_u64(counter)?;
//! guard.endpoint().post_write_u64(counter, n + 1)?;
//! guard.unlock()?;
//! # Ok::<(), rdmem_coherence::LockError>(())
//! ```
//!
//! # Features
//! - `rdma` (default): [`Dsm::join`](dsm::Dsm::join) over RDMA and the two binaries. Without it
//!   the crate builds no verbs crate, and everything runs over any [`rdmem_core::Transport`]
//!   (the loopback transport in tests): `cargo test -p rdmem-coherence --no-default-features`.
//! - `loom`: the cohort lock's local handover on loom's primitives, for `tests/loom_cohort.rs`.
#![forbid(unsafe_code)]

pub mod dsm;
pub mod sync;

pub use sync::{
    AsyncLockGuard, Clock, CohortGuard, CohortLock, DEFAULT_LEASE, LockError, LockGuard, LockTable, OwnEndpoint,
    OwnGuard, RemoteBarrier, RemoteLock, Result, RwGuard, RwLock,
};

// The README's examples are compiled as doc tests here (the top crate; the allocator is a
// dev-dependency for them), so they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(all(doctest, feature = "rdma"))]
pub struct ReadmeDoctests;
