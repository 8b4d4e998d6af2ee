//! The one switch point between std's and loom's synchronization primitives (crossbeam's
//! `mod primitive`): with the `loom` feature, the cohort lock's local handover runs on loom's
//! types, so `tests/loom_cohort.rs` can explore its interleavings.

#[cfg(feature = "loom")]
pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "loom")]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(feature = "loom")]
pub(crate) use loom::thread::yield_now;

#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(feature = "loom"))]
pub(crate) use std::thread::yield_now;
