//! A cycle counter for timing single operations.
//!
//! In the Soft-RoCE VM the kernel marks the TSC unstable and the clock source is HPET: a
//! `clock_gettime` (and so `Instant::now()`, and `quanta`, which falls back to it) costs about
//! 0.75 us there, against about 13 ns for `rdtsc`. perftest reads the TSC directly, so to compare
//! like with like we do too. The rate is calibrated against `Instant` once, over 100 ms.
//! On other architectures this falls back to `Instant`.

use std::time::{Duration, Instant};

/// A calibrated cycle counter.
pub(crate) struct Tsc {
    ns_per_tick: f64,
    #[cfg(not(target_arch = "x86_64"))]
    origin: Instant,
}

impl Tsc {
    /// Calibrates the counter (takes about 100 ms).
    pub(crate) fn calibrate() -> Self {
        let mut tsc = Tsc {
            ns_per_tick: 1.0,
            #[cfg(not(target_arch = "x86_64"))]
            origin: Instant::now(),
        };
        let (t0, c0) = (Instant::now(), tsc.now());
        std::thread::sleep(Duration::from_millis(100));
        let (t1, c1) = (Instant::now(), tsc.now());
        tsc.ns_per_tick = (t1 - t0).as_nanos() as f64 / (c1.wrapping_sub(c0)).max(1) as f64;
        tsc
    }

    /// The current count.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: rdtsc has no preconditions on x86-64; it only reads the time-stamp counter.
            unsafe { core::arch::x86_64::_rdtsc() }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self.origin.elapsed().as_nanos() as u64
        }
    }

    /// Nanoseconds between two counts.
    pub(crate) fn nanos(&self, start: u64, end: u64) -> u64 {
        (end.wrapping_sub(start) as f64 * self.ns_per_tick) as u64
    }
}
