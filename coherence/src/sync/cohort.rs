//! A cohort lock: the remote lock of a process, handed between its threads locally.
//!
//! Threads queue on a local flag. The first takes the remote lock; on release, if another
//! local thread is waiting and fewer than `max_handovers` handovers happened in a row, the
//! remote lock stays held and the local flag passes to the waiter: no network round trip.
//! Otherwise the remote lock is released, so other processes get their turn (the bound keeps
//! them from starving). Invariants: `held.is_some()` exactly while this process holds the
//! remote word; only the thread that owns the local flag (`owner`) changes `held`, `handovers`
//! and the lock's state `S`.
//!
//! # Two ways to use it
//! - [`CohortLock::lock`] returns a `#[must_use]` guard, released with a fallible
//!   [`CohortGuard::unlock`].
//! - [`CohortLock::acquire`] and [`CohortLock::release`] are the same pair usable across calls
//!   (a library's `lock(id)` and `unlock(id)`, as the DSM has). The `_with` forms run a hook
//!   right after the remote lock is taken and right before it is released, with the lock's
//!   state `S` (the DSM keeps its write notices there): the hooks run once per remote hold,
//!   not per local handover.
//!
//! A lock is held by a thread: a second acquire by the holding thread is
//! [`LockError::AlreadyHeld`] (it would wait for itself), and a release by any other thread is
//! [`LockError::NotHolder`].
//!
//! # Endpoints
//! Each holder uses its own thread's endpoint; the lock owns none, so a process needs no queue
//! pair per lock. Operations of one section therefore go on the holder's queue pairs, in order.
//! A section can end with [`Endpoint::post_write`] and not wait for it: a local handover first
//! waits for the releasing thread's posted writes ([`Endpoint::flush`]), so the next local
//! holder, on its own queue pairs, sees them; the remote release waits for posted writes to
//! other nodes than the lock's ([`Endpoint::flush_for`]), and those to the lock's node are
//! ordered before its release on the same queue pair.

use std::time::Instant;

use rdmem_core::Endpoint;

use super::error::{LockError, Result};
use super::lock::RemoteLock;
use super::primitive::{AtomicBool, AtomicUsize, Mutex, MutexGuard, Ordering, ThreadId, current_thread, yield_now};

struct Cohort<S> {
    /// The remote hold value while this process holds the lock.
    held: Option<u64>,
    /// Local handovers since the remote lock was taken.
    handovers: u32,
    /// When the remote hold was taken or last renewed.
    since: Instant,
    /// The thread holding the lock locally.
    owner: Option<ThreadId>,
    /// The user's state, carried from holder to holder.
    state: S,
}

/// A process's cohort lock over one [`RemoteLock`], with a state `S` that goes with the lock
/// from holder to holder. Share it between threads (`&` or `Arc`).
pub struct CohortLock<S = ()> {
    remote: RemoteLock,
    /// The local lock: set while a thread of this process holds the cohort lock.
    busy: AtomicBool,
    waiting: AtomicUsize,
    max_handovers: u32,
    /// Touched only by the thread that set `busy` (and, briefly, by the ownership checks), so
    /// it is never contended for long.
    cohort: Mutex<Cohort<S>>,
}

impl CohortLock<()> {
    /// A cohort lock over `remote` (its holder id names this process), handing over locally
    /// at most `max_handovers` times in a row.
    pub fn new(remote: RemoteLock, max_handovers: u32) -> Self {
        CohortLock::with_state(remote, max_handovers, ())
    }
}

impl<S> CohortLock<S> {
    /// A cohort lock whose holders share `state` (see [`CohortLock::acquire_with`]).
    pub fn with_state(remote: RemoteLock, max_handovers: u32, state: S) -> Self {
        CohortLock {
            remote,
            busy: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            max_handovers,
            cohort: Mutex::new(Cohort { held: None, handovers: 0, since: Instant::now(), owner: None, state }),
        }
    }

    /// The remote lock underneath.
    pub fn remote(&self) -> &RemoteLock {
        &self.remote
    }

    /// Threads of this process waiting for the lock right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// True when the calling thread holds the lock.
    pub fn held_by_me(&self) -> bool {
        self.cohort().owner == Some(current_thread())
    }

    fn cohort(&self) -> MutexGuard<'_, Cohort<S>> {
        self.cohort.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acquires the lock for this thread, to be released by [`CohortLock::release`] from the
    /// same thread. `Ok(true)` when this call took the remote lock, `Ok(false)` when it was
    /// handed over by another thread of this process.
    pub fn acquire<E: Endpoint>(&self, ep: &mut E) -> Result<bool> {
        self.acquire_with(ep, |_, _| Ok::<(), LockError>(()))
    }

    /// [`CohortLock::acquire`], running `taken(ep, state)` right after the remote lock is taken
    /// (not after a local handover). If `taken` fails, the remote lock is released again and
    /// its error returned: the lock is then not held.
    pub fn acquire_with<E, Er>(
        &self,
        ep: &mut E,
        taken: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError>,
    {
        let me = current_thread();
        if self.cohort().owner == Some(me) {
            return Err(LockError::AlreadyHeld { word: self.remote.word(), holder: self.remote.holder() }.into());
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Spin (yielding) rather than sleep: waking a sleeping thread costs about as much as a
        // network round trip, which is what the handover is there to save.
        while self.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            yield_now();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let mut cohort = self.cohort();
        let result = self.take_remote(ep, &mut cohort, taken);
        match result {
            Ok(fresh) => {
                cohort.owner = Some(me);
                Ok(fresh)
            }
            Err(e) => {
                drop(cohort);
                self.busy.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Takes (or renews) the remote hold for the thread that just set `busy`.
    fn take_remote<E, Er>(
        &self,
        ep: &mut E,
        cohort: &mut Cohort<S>,
        taken: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError>,
    {
        match cohort.held {
            None => {
                let value = self.remote.acquire(ep)?;
                if let Err(e) = taken(ep, &mut cohort.state) {
                    if let Err(release) = self.remote.release(ep, value) {
                        tracing::error!(
                            "releasing {} after a failed acquire hook failed: {release}",
                            self.remote.word()
                        );
                    }
                    return Err(e);
                }
                cohort.held = Some(value);
                cohort.handovers = 0;
                cohort.since = self.remote.now();
                Ok(true)
            }
            // Held across handovers for a while: restart the lease before it runs out.
            Some(value) if self.remote.now().saturating_duration_since(cohort.since) > self.remote.lease() / 2 => {
                match self.remote.renew(ep, value) {
                    Ok(renewed) => {
                        cohort.held = Some(renewed);
                        cohort.since = self.remote.now();
                        Ok(false)
                    }
                    Err(e) => {
                        // Taken over meanwhile: this process no longer holds it.
                        cohort.held = None;
                        Err(e.into())
                    }
                }
            }
            Some(_) => Ok(false),
        }
    }

    /// Releases the lock held by this thread: hands it to a waiting thread of this process
    /// (`Ok(true)`; this thread's posted writes are waited for first), or releases it remotely
    /// (`Ok(false)`; [`LockError::LeaseLost`] if the lease expired meanwhile).
    pub fn release<E: Endpoint>(&self, ep: &mut E) -> Result<bool> {
        self.release_with(ep, |_, _| Ok::<(), LockError>(()))
    }

    /// [`CohortLock::release`], running `releasing(ep, state)` right before the remote release
    /// (not before a local handover). If `releasing` fails, the process keeps the remote lock
    /// (the next local holder's release runs the hook again, or, with no one waiting, the next
    /// acquire of this process finds it held), this thread no longer holds it, and the error is
    /// returned.
    pub fn release_with<E, Er>(
        &self,
        ep: &mut E,
        releasing: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError> + From<rdmem_core::Error>,
    {
        let mut cohort = self.cohort();
        if cohort.owner != Some(current_thread()) {
            return Err(LockError::NotHolder { word: self.remote.word() }.into());
        }
        let result = self.hand_on(ep, &mut cohort, releasing);
        cohort.owner = None;
        drop(cohort);
        self.busy.store(false, Ordering::Release);
        result
    }

    /// The release decision: local handover or remote release.
    fn hand_on<E, Er>(
        &self,
        ep: &mut E,
        cohort: &mut Cohort<S>,
        releasing: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError> + From<rdmem_core::Error>,
    {
        if self.waiting.load(Ordering::SeqCst) > 0 && cohort.handovers < self.max_handovers {
            // The next holder uses its own queue pairs: this section's posted writes must have
            // landed before it starts.
            ep.flush()?;
            cohort.handovers += 1;
            return Ok(true);
        }
        releasing(ep, &mut cohort.state)?;
        let value = cohort.held.take().expect("the cohort holds the remote lock while locked");
        // After the section's operations, posted writes included (see RemoteLock::release).
        self.remote.release(ep, value)?;
        Ok(false)
    }

    /// Runs `f` on the lock's state; only the holding thread may ([`LockError::NotHolder`]).
    pub fn with_state_mut<R>(&self, f: impl FnOnce(&mut S) -> R) -> Result<R> {
        let mut cohort = self.cohort();
        if cohort.owner != Some(current_thread()) {
            return Err(LockError::NotHolder { word: self.remote.word() });
        }
        Ok(f(&mut cohort.state))
    }

    /// Acquires the lock for this thread, through this thread's endpoint `ep`.
    pub fn lock<'a, E: Endpoint>(&'a self, ep: &'a mut E) -> Result<CohortGuard<'a, E, S>> {
        self.acquire(ep)?;
        Ok(CohortGuard { lock: self, ep, released: false, _not_send: std::marker::PhantomData })
    }
}

/// A held cohort lock; release with [`CohortGuard::unlock`] (dropping releases and logs). It
/// stays on the thread that took the lock (it is not `Send`).
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct CohortGuard<'a, E: Endpoint, S = ()> {
    lock: &'a CohortLock<S>,
    ep: &'a mut E,
    released: bool,
    /// The lock belongs to the thread that took it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl<E: Endpoint, S> CohortGuard<'_, E, S> {
    /// The endpoint, for the critical section's operations. A write that ends the section can
    /// be posted ([`Endpoint::post_write`]) rather than waited for: whoever comes next, here or
    /// in another process, sees it.
    pub fn endpoint(&mut self) -> &mut E {
        self.ep
    }

    /// Releases: hands the lock to a waiting thread of this process (returns `true`), or
    /// releases it remotely (`false`; `LeaseLost` if the lease expired meanwhile).
    pub fn unlock(mut self) -> Result<bool> {
        self.released = true;
        self.lock.release(self.ep)
    }
}

impl<E: Endpoint, S> Drop for CohortGuard<'_, E, S> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("cohort lock at {} dropped without unlock(); releasing it", self.lock.remote.word());
            if let Err(e) = self.lock.release(self.ep) {
                tracing::error!("releasing the dropped cohort lock failed: {e}");
            }
        }
    }
}
