//! Synchronization from one-sided RDMA atomics: locks, a reader-writer lock, a cohort lock for
//! the threads of a process, a barrier, and a table of locks by id.
//!
//! # Quick start
//! ```
//! use std::time::Duration;
//! use rdmem_coherence::sync::{CohortLock, RemoteBarrier, RemoteLock};
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
//! // Threads of one process share a cohort lock, each through its own endpoint: handovers
//! // between them stay local.
//! let cohort = CohortLock::new(RemoteLock::new(word, 2, Duration::from_secs(2))?, 8);
//! let mut guard = cohort.lock(&mut ep)?;
//! let n = guard.endpoint().read_u64(counter)?;
//! guard.endpoint().post_write_u64(counter, n + 1)?;
//! guard.unlock()?;
//!
//! let mut barrier = RemoteBarrier::new(GlobalAddr::new(NodeId(0), 64).unwrap(), GlobalAddr::new(NodeId(0), 72).unwrap(), 1)?;
//! barrier.wait(&mut ep)?;
//! # Ok::<(), rdmem_coherence::sync::LockError>(())
//! ```
//!
//! # Model
//! - [`RemoteLock`]: one 8-byte word, `holder << 32 | epoch`; CAS to acquire and release;
//!   leases let waiters take over from a holder that stopped changing the word (crashed).
//!   [`RemoteLock::lock_async`] takes it through an async endpoint ([`rdmem_core::aio`]):
//!   the same protocol, and a waiting task lets the executor run others.
//! - [`CohortLock`]: a process's threads hand a held remote lock to each other locally, a
//!   bounded number of times in a row, so contention inside a process costs no round trips.
//!   The one local handover implementation: the DSM's locks are cohort locks too.
//! - [`RwLock`]: a fair (FIFO) reader-writer lock in one word, tickets taken with
//!   fetch-and-add, released with CAS; generations for counter reset and lease expiry.
//! - [`RemoteBarrier`]: fetch-and-add on a counter that only grows, plus an epoch word.
//! - [`LockTable`]: locks by id, spread over the memory nodes.
//!
//! # Failure
//! A holder that crashes delays others by about one lease (two at most); its late release
//! fails harmlessly with [`LockError::LeaseLost`]. Guards are `#[must_use]` and released with a
//! fallible `unlock()`; a guard dropped without it releases and logs.

pub mod barrier;
pub mod cohort;
pub mod error;
pub mod lock;
mod primitive;
pub mod rwlock;
pub mod table;

pub use barrier::{DEFAULT_BARRIER_TIMEOUT, RemoteBarrier};
pub use cohort::{CohortGuard, CohortLock, OwnEndpoint, OwnGuard};
pub use error::{LockError, Result};
pub use lock::{AsyncLockGuard, Clock, DEFAULT_LEASE, LockGuard, RemoteLock};
pub use rwlock::{RwGuard, RwLock};
pub use table::LockTable;
