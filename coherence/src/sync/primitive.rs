//! The one switch point between std's and loom's synchronization primitives (crossbeam's
//! `mod primitive`): with the `loom` feature, the cohort lock's local handover runs on loom's
//! types, so `tests/loom_cohort.rs` can explore its interleavings.

#[cfg(feature = "loom")]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(feature = "loom")]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(feature = "loom")]
pub(crate) use loom::thread::{ThreadId, yield_now};
#[cfg(feature = "loom")]
pub(crate) use std::sync::TryLockError;

#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::{Mutex, MutexGuard, TryLockError};
#[cfg(not(feature = "loom"))]
pub(crate) use std::thread::{ThreadId, yield_now};

/// The calling thread's id (loom's own under loom, whose threads share one OS thread).
pub(crate) fn current_thread() -> ThreadId {
    #[cfg(feature = "loom")]
    return loom::thread::current().id();
    #[cfg(not(feature = "loom"))]
    return std::thread::current().id();
}
