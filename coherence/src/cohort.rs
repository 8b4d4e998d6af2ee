//! A cohort lock: the remote lock of a process, handed between its threads locally.
//!
//! Threads queue on a local mutex. The first takes the remote lock; on release, if another
//! local thread is waiting and fewer than `max_handovers` handovers happened in a row, the
//! remote lock stays held and the local mutex passes to the waiter: no network round trip.
//! Otherwise the remote lock is released, so other processes get their turn (the bound keeps
//! them from starving). Invariant: `held.is_some()` exactly while this process holds the
//! remote word, and only the holder of the local mutex changes `held`.
//!
//! The lock owns an endpoint and lends it to each holder for the critical section, so the
//! section's operations and the remote release all go on the same queue pairs, in order. A
//! section can therefore end with [`Endpoint::post_write`] and not wait for it: the next
//! holder's operations to that node (local handover) come after it on the same queue pair, and
//! the remote release waits for posted writes to other nodes than the lock's
//! ([`Endpoint::flush_for`]). A section of one READ and one posted WRITE on one node then costs
//! one round trip.

use std::sync::TryLockError;
use std::time::Instant;

use rdmem_core::Endpoint;

use crate::error::Result;
use crate::lock::RemoteLock;
use crate::primitive::{AtomicUsize, Mutex, MutexGuard, Ordering, yield_now};

struct Cohort<E> {
    /// The endpoint every holder uses, handed over with the lock.
    ep: E,
    /// The remote hold value while this process holds the lock.
    held: Option<u64>,
    /// Local handovers since the remote lock was taken.
    handovers: u32,
    /// When the remote hold was taken or last renewed.
    since: Instant,
}

/// A process's cohort lock over one [`RemoteLock`], with its own endpoint. Share it between
/// threads (`&` or `Arc`).
pub struct CohortLock<E: Endpoint> {
    remote: RemoteLock,
    local: Mutex<Cohort<E>>,
    waiting: AtomicUsize,
    max_handovers: u32,
}

impl<E: Endpoint> CohortLock<E> {
    /// A cohort lock over `remote` (its holder id names this process), handing over locally
    /// at most `max_handovers` times in a row. Holders use `ep` (take a fresh one from the
    /// transport: it serves this lock only).
    pub fn new(remote: RemoteLock, max_handovers: u32, ep: E) -> Self {
        CohortLock {
            remote,
            local: Mutex::new(Cohort { ep, held: None, handovers: 0, since: Instant::now() }),
            waiting: AtomicUsize::new(0),
            max_handovers,
        }
    }

    /// Threads of this process waiting for the lock right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Acquires the lock for this thread.
    pub fn lock(&self) -> Result<CohortGuard<'_, E>> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Spin (yielding) rather than sleep: waking a sleeping thread costs about as much as a
        // network round trip, which is what the handover is there to save.
        let mut local = loop {
            match self.local.try_lock() {
                Ok(guard) => break guard,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) => yield_now(),
            }
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let cohort = &mut *local;
        match cohort.held {
            None => {
                cohort.held = Some(self.remote.acquire(&mut cohort.ep)?);
                cohort.handovers = 0;
                cohort.since = self.remote.now();
            }
            // Held across handovers for a while: restart the lease before it runs out.
            Some(value) if self.remote.now().saturating_duration_since(cohort.since) > self.remote.lease() / 2 => {
                cohort.held = Some(self.remote.renew(&mut cohort.ep, value)?);
                cohort.since = self.remote.now();
            }
            Some(_) => {}
        }
        Ok(CohortGuard { lock: self, local: Some(local) })
    }

    /// Hands over to a local waiter, or releases remotely. `Ok(true)` when handed over.
    fn release(&self, local: &mut Cohort<E>) -> Result<bool> {
        if self.waiting.load(Ordering::SeqCst) > 0 && local.handovers < self.max_handovers {
            local.handovers += 1;
            return Ok(true);
        }
        let value = local.held.take().expect("the cohort holds the remote lock while locked");
        // After the section's operations, posted writes included (see RemoteLock::release).
        self.remote.release(&mut local.ep, value)?;
        Ok(false)
    }
}

/// A held cohort lock; release with [`CohortGuard::unlock`] (dropping releases and logs).
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct CohortGuard<'a, E: Endpoint> {
    lock: &'a CohortLock<E>,
    local: Option<MutexGuard<'a, Cohort<E>>>,
}

impl<E: Endpoint> CohortGuard<'_, E> {
    /// The lock's endpoint, for the critical section's operations. A write that ends the
    /// section can be posted ([`Endpoint::post_write`]) rather than waited for: whoever comes
    /// next, here or in another process, sees it.
    pub fn endpoint(&mut self) -> &mut E {
        &mut self.local.as_mut().expect("locked").ep
    }

    /// Releases: hands the lock to a waiting thread of this process (returns `true`), or
    /// releases it remotely (`false`; `LeaseLost` if the lease expired meanwhile).
    pub fn unlock(mut self) -> Result<bool> {
        let mut local = self.local.take().expect("locked");
        self.lock.release(&mut local)
    }
}

impl<E: Endpoint> Drop for CohortGuard<'_, E> {
    fn drop(&mut self) {
        if let Some(mut local) = self.local.take() {
            tracing::warn!("cohort lock at {} dropped without unlock(); releasing it", self.lock.remote.word());
            if let Err(e) = self.lock.release(&mut local) {
                tracing::error!("releasing the dropped cohort lock failed: {e}");
            }
        }
    }
}
