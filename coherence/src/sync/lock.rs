//! Exclusive locks in one remote 8-byte word, with leases.
//!
//! The word is `0` when free, else `holder << 32 | epoch`: `holder` (nonzero) names who holds it,
//! `epoch` changes with every acquisition and renewal, so each hold has its own value.
//!
//! - **Acquire**: CAS `0 -> mine`, with capped exponential backoff while it is held.
//! - **Lease**: a waiter that sees the *same* held value for longer than the lease period
//!   (measured on its own clock) takes the holder for dead and CASes that value to its own.
//!   A crashed holder therefore blocks others for about one lease after its last renewal (at
//!   most about two leases after it acquired, if it renewed right before dying). Holders of long
//!   critical sections call [`LockGuard::renew`] well within the lease.
//! - **Release**: CAS `mine -> 0`, after the section's posted writes to other nodes completed
//!   ([`Endpoint::flush_for`]; those to the lock's node are ordered before it). If the lease
//!   was taken over meanwhile, the CAS fails and nothing is changed: a late release is
//!   harmless, and reported as [`LockError::LeaseLost`] (the critical section may have
//!   overlapped another one, which the caller must know).
//!
//! Mutual exclusion holds as long as a holder does not run past its lease without renewing.

use std::time::{Duration, Instant};

use rdmem_core::aio::{AsyncEndpoint, Submit};
use rdmem_core::{Endpoint, GlobalAddr};

use super::error::{LockError, Result};

/// The default lease: generous for Soft-RoCE's latency tails (milliseconds at p999 in the VM).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// Where the locks read the time for their leases: [`Instant::now`] unless a test injects
/// its own (with `with_clock`), so that lease behaviour can be tested without depending on how
/// fast the machine runs.
pub type Clock = fn() -> Instant;

/// Where a lock lives and who takes it. Cheap to copy; the state is all in remote memory.
#[derive(Debug, Clone, Copy)]
pub struct RemoteLock {
    word: GlobalAddr,
    holder: u32,
    lease: Duration,
    clock: Clock,
}

impl RemoteLock {
    /// A lock in the 8-byte word at `word` (8-aligned, initially 0), taken on behalf of
    /// `holder`, which must be nonzero and unique among everyone using the lock (a process, or
    /// a thread when threads take it directly).
    pub fn new(word: GlobalAddr, holder: u32, lease: Duration) -> Result<Self> {
        if holder == 0 {
            return Err(LockError::BadHolder);
        }
        if !word.is_aligned(8) {
            return Err(LockError::Misaligned { word });
        }
        Ok(RemoteLock { word, holder, lease, clock: Instant::now })
    }

    /// The same lock, with lease time read from `clock` instead of [`Instant::now`] (for tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The time as this lock's clock tells it.
    pub(crate) fn now(&self) -> Instant {
        (self.clock)()
    }

    /// The lock word's address.
    pub fn word(&self) -> GlobalAddr {
        self.word
    }

    /// The lease period.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The holder id this handle takes the lock as.
    pub fn holder(&self) -> u32 {
        self.holder
    }

    /// Acquires the lock through `ep` (CAS with backoff; takes over an expired lease).
    pub fn lock<'e, E: Endpoint>(&self, ep: &'e mut E) -> Result<LockGuard<'e, E>> {
        let value = self.acquire(ep)?;
        Ok(LockGuard { ep, lock: *self, value, released: false })
    }

    /// The acquisition itself: returns the value written (this hold's identity).
    pub(crate) fn acquire<E: Endpoint>(&self, ep: &mut E) -> Result<u64> {
        let mut attempt = Acquiring::new();
        loop {
            let (expected, mine) = attempt.next_cas(self);
            let old = ep.cas(self.word, expected, mine)?;
            match attempt.after(self, old)? {
                Some(wait) if wait.is_zero() => {}
                Some(wait) => std::thread::sleep(wait),
                None => return Ok(mine),
            }
        }
    }

    /// Acquires the lock through an async endpoint: the same protocol as [`RemoteLock::lock`],
    /// but waiting for the holder lets the executor run other tasks (the back-off is an
    /// [`rdmem_core::aio::sleep`], not a blocked thread).
    ///
    /// Cancellation: dropping this future while its CAS is in flight may leave the lock taken
    /// with no guard to release it; the lease then frees it (others wait about one lease).
    pub async fn lock_async<'e, E: Submit>(&self, ep: &'e AsyncEndpoint<E>) -> Result<AsyncLockGuard<'e, E>> {
        let mut attempt = Acquiring::new();
        loop {
            let (expected, mine) = attempt.next_cas(self);
            let old = ep.cas(self.word, expected, mine).await?;
            match attempt.after(self, old)? {
                Some(wait) if wait.is_zero() => {}
                Some(wait) => rdmem_core::aio::sleep(wait).await,
                None => return Ok(AsyncLockGuard { ep, lock: *self, value: mine, released: false }),
            }
        }
    }

    /// Releases the hold `value` (CAS back to 0); `LeaseLost` if it was taken over. The
    /// section's posted writes come first: those to the lock's node are ahead of the CAS on its
    /// queue pair, the others are waited for. If one of them failed, the lock is not released
    /// (the error says which write; the lease frees the lock).
    pub(crate) fn release<E: Endpoint>(&self, ep: &mut E, value: u64) -> Result<()> {
        ep.flush_for(self.word.node())?;
        let old = ep.cas(self.word, value, 0)?;
        if old == value { Ok(()) } else { Err(LockError::LeaseLost { word: self.word, now: old }) }
    }

    /// Renews the hold `value`: a new epoch, so waiters start their lease clocks again.
    pub(crate) fn renew<E: Endpoint>(&self, ep: &mut E, value: u64) -> Result<u64> {
        let next = (value & !0xffff_ffff) | ((value as u32).wrapping_add(1).max(1) as u64);
        let old = ep.cas(self.word, value, next)?;
        if old == value { Ok(next) } else { Err(LockError::LeaseLost { word: self.word, now: old }) }
    }
}

/// Where an acquisition stands between two CAS attempts (shared by the sync and async
/// acquire, so both follow one protocol).
struct Acquiring {
    epoch: u32,
    expected: u64,
    backoff: Duration,
    /// The held value seen last, and since when (for lease expiry).
    seen: Option<(u64, Instant)>,
}

impl Acquiring {
    fn new() -> Self {
        Acquiring { epoch: 1, expected: 0, backoff: Duration::from_micros(1), seen: None }
    }

    /// The next CAS: (expected, the value to write).
    fn next_cas(&self, lock: &RemoteLock) -> (u64, u64) {
        (self.expected, (lock.holder as u64) << 32 | self.epoch as u64)
    }

    /// What a CAS that found `old` means: `None` when it took the lock, else how long to
    /// wait before the next attempt (zero: at once).
    fn after(&mut self, lock: &RemoteLock, old: u64) -> Result<Option<Duration>> {
        if old == self.expected {
            return Ok(None);
        }
        self.epoch = self.epoch.wrapping_add(1).max(1);
        self.expected = 0;
        if old == 0 {
            return Ok(Some(Duration::ZERO));
        }
        if old >> 32 == lock.holder as u64 {
            return Err(LockError::AlreadyHeld { word: lock.word, holder: lock.holder });
        }
        match self.seen {
            Some((value, since)) if value == old => {
                if lock.now().saturating_duration_since(since) > lock.lease {
                    tracing::warn!(
                        "lock at {}: holder {} kept it unchanged for more than the lease ({:?}); taking it over",
                        lock.word,
                        old >> 32,
                        lock.lease
                    );
                    self.expected = old;
                    return Ok(Some(Duration::ZERO));
                }
            }
            _ => self.seen = Some((old, lock.now())),
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(1));
        Ok(Some(wait))
    }
}

/// A lock held through an async endpoint ([`RemoteLock::lock_async`]). Release it with
/// [`AsyncLockGuard::unlock`]`.await`, after awaiting the critical section's writes (an async
/// write has completed when its future has, so nothing is left to flush). Dropping the guard
/// releases too: it posts the releasing CAS without waiting for it (a `Drop` cannot await) and
/// logs that; if that cannot be posted, the lease frees the lock.
#[must_use = "the lock is held until unlock().await (or drop, which cannot report errors)"]
pub struct AsyncLockGuard<'e, E: Submit> {
    ep: &'e AsyncEndpoint<E>,
    lock: RemoteLock,
    value: u64,
    released: bool,
}

impl<'e, E: Submit> AsyncLockGuard<'e, E> {
    /// The endpoint, for the critical section's reads and writes.
    pub fn endpoint(&self) -> &'e AsyncEndpoint<E> {
        self.ep
    }

    /// Restarts the lease (one CAS); `LeaseLost` if a waiter already took the lock over.
    pub async fn renew(&mut self) -> Result<()> {
        let next = (self.value & !0xffff_ffff) | ((self.value as u32).wrapping_add(1).max(1) as u64);
        let old = self.ep.cas(self.lock.word, self.value, next).await?;
        if old != self.value {
            return Err(LockError::LeaseLost { word: self.lock.word, now: old });
        }
        self.value = next;
        Ok(())
    }

    /// Releases the lock; `LeaseLost` if the lease expired and someone took it over.
    pub async fn unlock(mut self) -> Result<()> {
        self.released = true;
        let old = self.ep.cas(self.lock.word, self.value, 0).await?;
        if old == self.value { Ok(()) } else { Err(LockError::LeaseLost { word: self.lock.word, now: old }) }
    }
}

impl<E: Submit> Drop for AsyncLockGuard<'_, E> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("async lock at {} dropped without unlock().await; releasing it", self.lock.word);
            if let Err(e) = self.ep.post_detached_cas(self.lock.word, self.value, 0) {
                tracing::error!("cannot release the dropped lock at {} ({e}); its lease will free it", self.lock.word);
            }
        }
    }
}

/// A held lock. Release it with [`LockGuard::unlock`], which reports a lost lease; dropping it
/// releases too, and logs a failure (it cannot report it).
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct LockGuard<'e, E: Endpoint> {
    ep: &'e mut E,
    lock: RemoteLock,
    value: u64,
    released: bool,
}

impl<E: Endpoint> LockGuard<'_, E> {
    /// The endpoint, for the critical section's reads and writes. They are on the same queue
    /// pair as the release, which comes after them.
    pub fn endpoint(&mut self) -> &mut E {
        self.ep
    }

    /// Restarts the lease (one CAS). Call it within every lease period of a long critical
    /// section; `LeaseLost` if a waiter already took the lock over.
    pub fn renew(&mut self) -> Result<()> {
        self.value = self.lock.renew(self.ep, self.value)?;
        Ok(())
    }

    /// Releases the lock; `LeaseLost` if the lease expired and someone took it over.
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.lock.release(self.ep, self.value)
    }
}

impl<E: Endpoint> Drop for LockGuard<'_, E> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("lock at {} dropped without unlock(); releasing it", self.lock.word);
            if let Err(e) = self.lock.release(self.ep, self.value) {
                tracing::error!("releasing the dropped lock at {} failed: {e}", self.lock.word);
            }
        }
    }
}
