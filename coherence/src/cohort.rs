//! A cohort lock: the remote lock of a process, handed between its threads locally.
//!
//! Threads queue on a local mutex. The first takes the remote lock; on release, if another
//! local thread is waiting and fewer than `max_handovers` handovers happened in a row, the
//! remote lock stays held and the local mutex passes to the waiter: no network round trip.
//! Otherwise the remote lock is released, so other processes get their turn (the bound keeps
//! them from starving). Invariant: `held.is_some()` exactly while this process holds the
//! remote word, and only the holder of the local mutex changes `held`.

use std::sync::TryLockError;
use std::time::Instant;

use rdmem_core::Endpoint;

use crate::error::Result;
use crate::lock::RemoteLock;
use crate::primitive::{AtomicUsize, Mutex, MutexGuard, Ordering, yield_now};

struct Cohort {
    /// The remote hold value while this process holds the lock.
    held: Option<u64>,
    /// Local handovers since the remote lock was taken.
    handovers: u32,
    /// When the remote hold was taken or last renewed.
    since: Instant,
}

/// A process's cohort lock over one [`RemoteLock`]. Share it between threads (`&` or `Arc`).
pub struct CohortLock {
    remote: RemoteLock,
    local: Mutex<Cohort>,
    waiting: AtomicUsize,
    max_handovers: u32,
}

impl CohortLock {
    /// A cohort lock over `remote` (its holder id names this process), handing over locally
    /// at most `max_handovers` times in a row.
    pub fn new(remote: RemoteLock, max_handovers: u32) -> Self {
        CohortLock {
            remote,
            local: Mutex::new(Cohort { held: None, handovers: 0, since: Instant::now() }),
            waiting: AtomicUsize::new(0),
            max_handovers,
        }
    }

    /// Threads of this process waiting for the lock right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Acquires the lock for this thread, using its endpoint `ep` if the process has to take
    /// the remote lock.
    pub fn lock<'a, 'e, E: Endpoint>(&'a self, ep: &'e mut E) -> Result<CohortGuard<'a, 'e, E>> {
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
        match local.held {
            None => {
                local.held = Some(self.remote.acquire(ep)?);
                local.handovers = 0;
                local.since = Instant::now();
            }
            // Held across handovers for a while: restart the lease before it runs out.
            Some(value) if local.since.elapsed() > self.remote.lease() / 2 => {
                local.held = Some(self.remote.renew(ep, value)?);
                local.since = Instant::now();
            }
            Some(_) => {}
        }
        Ok(CohortGuard { lock: self, local: Some(local), ep })
    }

    /// Hands over to a local waiter, or releases remotely. `Ok(true)` when handed over.
    fn release<E: Endpoint>(&self, local: &mut Cohort, ep: &mut E) -> Result<bool> {
        if self.waiting.load(Ordering::SeqCst) > 0 && local.handovers < self.max_handovers {
            local.handovers += 1;
            return Ok(true);
        }
        let value = local.held.take().expect("the cohort holds the remote lock while locked");
        self.remote.release(ep, value)?;
        Ok(false)
    }
}

/// A held cohort lock; release with [`CohortGuard::unlock`] (dropping releases and logs).
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct CohortGuard<'a, 'e, E: Endpoint> {
    lock: &'a CohortLock,
    local: Option<MutexGuard<'a, Cohort>>,
    ep: &'e mut E,
}

impl<E: Endpoint> CohortGuard<'_, '_, E> {
    /// The endpoint, for the critical section's reads and writes.
    pub fn endpoint(&mut self) -> &mut E {
        self.ep
    }

    /// Releases: hands the lock to a waiting thread of this process (returns `true`), or
    /// releases it remotely (`false`; `LeaseLost` if the lease expired meanwhile).
    pub fn unlock(mut self) -> Result<bool> {
        let mut local = self.local.take().expect("locked");
        self.lock.release(&mut local, self.ep)
    }
}

impl<E: Endpoint> Drop for CohortGuard<'_, '_, E> {
    fn drop(&mut self) {
        if let Some(mut local) = self.local.take() {
            tracing::warn!("cohort lock at {} dropped without unlock(); releasing it", self.lock.remote.word());
            if let Err(e) = self.lock.release(&mut local, self.ep) {
                tracing::error!("releasing the dropped cohort lock failed: {e}");
            }
        }
    }
}
