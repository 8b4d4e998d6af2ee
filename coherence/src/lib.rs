//! rdmem's shared-memory layer: distributed locks and a barrier built from one-sided RDMA
//! atomics, a page cache ([`cache`]) and scope-consistent shared memory ([`dsm`]).
//!
//! # Quick start
//! ```
//! use std::time::Duration;
//! use rdmem_coherence::{CohortLock, RemoteBarrier, RemoteLock};
//! use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};
//!
//! let transport = LoopbackTransport::new(&[1 << 20]);
//! let mut ep = transport.endpoint()?;
//! let word = GlobalAddr::new(NodeId(0), 4096).unwrap();
//! let counter = GlobalAddr::new(NodeId(0), 8192).unwrap();
//!
//! let lock = RemoteLock::new(word, /* holder id */ 1, Duration::from_secs(2))?;
//! let mut guard = lock.lock(&mut ep)?;
//! let n = guard.endpoint().read_u64(counter)?; // a non-atomic read-modify-write...
//! guard.endpoint().post_write_u64(counter, n + 1)?; // ...made safe by the lock; the release
//! guard.unlock()?; // comes after the posted WRITE on the same queue pair; it can fail
//!
//! // Threads of one process share a cohort lock (and its endpoint): handovers stay local.
//! let cohort = CohortLock::new(RemoteLock::new(word, 2, Duration::from_secs(2))?, 8, transport.endpoint()?);
//! let mut guard = cohort.lock()?;
//! let n = guard.endpoint().read_u64(counter)?;
//! guard.endpoint().post_write_u64(counter, n + 1)?;
//! guard.unlock()?;
//!
//! let mut barrier = RemoteBarrier::new(GlobalAddr::new(NodeId(0), 64).unwrap(), GlobalAddr::new(NodeId(0), 72).unwrap(), 1)?;
//! barrier.wait(&mut ep)?;
//! # Ok::<(), rdmem_coherence::LockError>(())
//! ```
//!
//! # Model
//! - [`RemoteLock`]: one 8-byte word, `holder << 32 | epoch`; CAS to acquire and release;
//!   leases let waiters take over from a holder that stopped changing the word (crashed).
//! - [`CohortLock`]: a process's threads hand a held remote lock to each other locally, a
//!   bounded number of times in a row, so contention inside a process costs no round trips.
//!   Its endpoint goes with it, so a section's last write can be posted without waiting.
//! - [`RwLock`]: a fair (FIFO) reader-writer lock in one word, tickets taken with
//!   fetch-and-add, released with CAS; generations for counter reset and lease expiry.
//! - [`RemoteBarrier`]: fetch-and-add on a counter that only grows, plus an epoch word.
//! - [`LockTable`]: locks by id, spread over the memory nodes.
//!
//! # Failure
//! A holder that crashes delays others by about one lease (two at most); its late release
//! fails harmlessly with [`LockError::LeaseLost`]. Guards are `#[must_use]` and released with a
//! fallible `unlock()`; a guard dropped without it releases and logs.
#![forbid(unsafe_code)]

pub mod barrier;
pub mod cache;
pub mod cohort;
pub mod dsm;
pub mod error;
pub mod launch;
pub mod lock;
mod primitive;
pub mod programs;
pub mod rwlock;
pub mod table;

pub use barrier::RemoteBarrier;
pub use cohort::{CohortGuard, CohortLock};
pub use error::{LockError, Result};
pub use lock::{Clock, DEFAULT_LEASE, LockGuard, RemoteLock};
pub use rwlock::{RwGuard, RwLock};
pub use table::LockTable;

// The README's examples are compiled as doc tests here (the top crate; the allocator is a
// dev-dependency for them), so they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
