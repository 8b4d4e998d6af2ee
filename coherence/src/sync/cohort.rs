//! A cohort lock: the remote lock of a process, handed between its threads locally.
//!
//! Threads queue on a local flag. The first takes the remote lock; on release, if another
//! local thread is waiting and fewer than `max_handovers` handovers happened in a row, the
//! remote lock stays held and the local flag passes to the waiter: no network round trip.
//! Otherwise the remote lock is released, so other processes get their turn (the bound keeps
//! them from starving). Invariants: the remote word holds this process's value only while
//! `held` is set (a failed release or renewal keeps `held`, since the word may still hold it);
//! only the thread that set the local flag (`busy`) touches `held`, `handovers` and the lock's
//! state `S`, and `owner` names it between acquire and release.
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
//! [`LockError::NotHolder`]. A lock taken with a guard is released by the guard
//! ([`LockError::HeldByGuard`] otherwise).
//!
//! # Endpoints
//! Two forms. [`CohortLock::new`]: each holder uses its own thread's endpoint and the lock owns
//! none, so a process needs no queue pair per lock (the DSM's 64 locks are of this form).
//! [`CohortLock::with_endpoint`]: the lock owns an endpoint and lends it to each holder
//! ([`CohortLock::lock_own`]), so a section's posted WRITE is not waited for by a local
//! handover (and the release waits only for posted writes to other nodes than the lock's); a
//! queue pair per memory node per lock buys that, for a few hot locks. A lock is used in one
//! form: `acquire`, `release` and `lock(&mut ep)` on a lock made `with_endpoint` return
//! [`LockError::OwnEndpoint`]. Release through the endpoint that acquired (its posted writes
//! are the ones a handover waits for).
//!
//! In the first form a section's operations go on the holder's queue pairs, in order. A
//! section can end with [`Endpoint::post_write`] and not wait for it: a local handover first
//! waits for the releasing thread's posted writes ([`Endpoint::flush`]), so the next local
//! holder, on its own queue pairs, sees them. In both forms the remote release waits for
//! posted writes to other nodes than the lock's ([`Endpoint::flush_for`]); those to the lock's
//! node are ordered before its release on the same queue pair.

use std::time::Instant;

use rdmem_core::Endpoint;

use super::error::{LockError, Result};
use super::lock::RemoteLock;
use super::primitive::{
    AtomicBool, AtomicUsize, Mutex, MutexGuard, Ordering, ThreadId, TryLockError, current_thread, yield_now,
};

/// The remote hold as this process sees it.
struct Hold {
    /// The remote hold value this process may have in the word: set when the remote lock is
    /// taken, cleared when it is released or known lost. A release or renewal that fails
    /// for another reason (a broken connection) keeps it, since the word may still hold it:
    /// the next acquire renews it (or learns it was lost) instead of waiting on itself.
    held: Option<u64>,
    /// The `taken` hook has run for this hold.
    primed: bool,
    /// Local handovers since the remote lock was taken.
    handovers: u32,
    /// When the remote hold was taken or last renewed.
    since: Instant,
    /// The holder took it with [`CohortLock::lock`]: only the guard releases it.
    guarded: bool,
}

struct Cohort<S> {
    hold: Hold,
    /// The user's state, carried from holder to holder.
    state: S,
}

/// A process's cohort lock over one [`RemoteLock`], with a state `S` that goes with the lock
/// from holder to holder. Share it between threads (`&` or `Arc`).
pub struct CohortLock<S = ()> {
    remote: RemoteLock,
    /// The local lock: set while a thread of this process holds the cohort lock (or is taking
    /// or releasing it).
    busy: AtomicBool,
    waiting: AtomicUsize,
    max_handovers: u32,
    /// The thread holding the lock locally; locked only briefly, never across remote work.
    owner: Mutex<Option<ThreadId>>,
    /// Locked only by the thread that set `busy`, so never contended.
    cohort: Mutex<Cohort<S>>,
    /// Made with [`CohortLock::with_endpoint`]: taken with `lock_own` only.
    own_endpoint: bool,
}

/// The hook of the calls without one.
fn no_hook<E, T>(_: &mut E, _: &mut T) -> Result<()> {
    Ok(())
}

/// Clears `busy` (and the owner, once set) when dropped: also when a hook panics, so that the
/// other threads are not left spinning on a lock nobody holds.
struct Unbusy<'a, S> {
    lock: &'a CohortLock<S>,
    /// The lock stays held: dropping changes nothing.
    keep: bool,
}

impl<S> Drop for Unbusy<'_, S> {
    fn drop(&mut self) {
        if !self.keep {
            *self.lock.owner() = None;
            self.lock.busy.store(false, Ordering::Release);
        }
    }
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
            owner: Mutex::new(None),
            cohort: Mutex::new(Cohort {
                hold: Hold { held: None, primed: false, handovers: 0, since: Instant::now(), guarded: false },
                state,
            }),
            own_endpoint: false,
        }
    }

    /// The per-thread-endpoint calls on a lock that lends its own endpoint are refused.
    fn check_form(&self) -> Result<()> {
        if self.own_endpoint { Err(LockError::OwnEndpoint { word: self.remote.word() }) } else { Ok(()) }
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
        *self.owner() == Some(current_thread())
    }

    fn owner(&self) -> MutexGuard<'_, Option<ThreadId>> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cohort(&self) -> MutexGuard<'_, Cohort<S>> {
        self.cohort.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The holder's access to the state: only the thread that set `busy` locks it, so it is
    /// busy only while that same thread has an [`OwnGuard`] out (using the lock's endpoint):
    /// that misuse is an error rather than a deadlock.
    fn cohort_of_holder(&self) -> Result<MutexGuard<'_, Cohort<S>>> {
        match self.cohort.try_lock() {
            Ok(cohort) => Ok(cohort),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => {
                Err(LockError::AlreadyHeld { word: self.remote.word(), holder: self.remote.holder() })
            }
        }
    }

    /// Acquires the lock for this thread, to be released by [`CohortLock::release`] from the
    /// same thread. `Ok(true)` when this call took the remote lock, `Ok(false)` when it was
    /// handed over by another thread of this process.
    pub fn acquire<E: Endpoint>(&self, ep: &mut E) -> Result<bool> {
        self.acquire_with(ep, no_hook)
    }

    /// [`CohortLock::acquire`], running `taken(ep, state)` once the remote lock is taken (not
    /// after a local handover); `Ok(true)` when it ran. If `taken` fails, the remote lock is
    /// released again and its error returned: the lock is then not held (should that release
    /// fail too, the process keeps the remote lock and the next acquire runs `taken` again).
    pub fn acquire_with<E, Er>(
        &self,
        ep: &mut E,
        taken: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError>,
    {
        self.check_form()?;
        let (fresh, _cohort) = self.enter(|c| self.take_remote(ep, &mut c.hold, &mut c.state, taken))?;
        Ok(fresh)
    }

    /// Takes this thread's turn (the local flag), then `take(cohort)` (the remote hold); the
    /// thread holds the lock when both succeed, and nothing is held when either fails. Returns
    /// what `take` returned and the state, still locked.
    fn enter<R, Er: From<LockError>>(
        &self,
        take: impl FnOnce(&mut Cohort<S>) -> Result<R, Er>,
    ) -> Result<(R, MutexGuard<'_, Cohort<S>>), Er> {
        let me = current_thread();
        self.wait_turn(me)?;
        let mut unbusy = Unbusy { lock: self, keep: false };
        let mut cohort = self.cohort();
        let taken = take(&mut cohort)?;
        *self.owner() = Some(me);
        unbusy.keep = true;
        Ok((taken, cohort))
    }

    /// Waits for the local flag (the lock among this process's threads); fails at once for a
    /// thread that holds the lock already.
    fn wait_turn(&self, me: ThreadId) -> Result<()> {
        if *self.owner() == Some(me) {
            return Err(LockError::AlreadyHeld { word: self.remote.word(), holder: self.remote.holder() });
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Spin (yielding) rather than sleep: waking a sleeping thread costs about as much as a
        // network round trip, which is what the handover is there to save.
        while self.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            yield_now();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    /// Takes (or renews) the remote hold for the thread that just set `busy`, and runs `taken`
    /// if it has not run for this hold yet. True when it ran.
    fn take_remote<E, T, Er>(
        &self,
        ep: &mut E,
        cohort: &mut Hold,
        state: &mut T,
        taken: impl FnOnce(&mut E, &mut T) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError>,
    {
        match cohort.held {
            None => {
                cohort.held = Some(self.remote.acquire(ep)?);
                cohort.primed = false;
                cohort.handovers = 0;
                cohort.since = self.remote.now();
            }
            // Held across handovers for a while: restart the lease before it runs out.
            Some(value) if self.remote.now().saturating_duration_since(cohort.since) > self.remote.lease() / 2 => {
                match self.remote.renew(ep, value) {
                    Ok(renewed) => {
                        cohort.held = Some(renewed);
                        cohort.since = self.remote.now();
                    }
                    Err(e) => {
                        if matches!(e, LockError::LeaseLost { .. }) {
                            cohort.held = None; // taken over: no longer this process's
                        }
                        return Err(e.into());
                    }
                }
            }
            Some(_) => {}
        }
        if cohort.primed {
            return Ok(false);
        }
        if let Err(e) = taken(ep, state) {
            let value = cohort.held.expect("held above");
            match self.remote.release(ep, value) {
                Ok(()) | Err(LockError::LeaseLost { .. }) => cohort.held = None,
                Err(release) => tracing::error!(
                    "releasing {} after a failed acquire hook failed ({release}); this process keeps it",
                    self.remote.word()
                ),
            }
            return Err(e);
        }
        cohort.primed = true;
        Ok(true)
    }

    /// Releases the lock held by this thread: hands it to a waiting thread of this process
    /// (`Ok(true)`), or releases it remotely (`Ok(false)`; [`LockError::LeaseLost`] if the
    /// lease expired meanwhile).
    ///
    /// A handover first waits for this thread's posted writes, since the next holder uses its
    /// own queue pairs. If that wait fails (the endpoint's connection broke), the error is
    /// returned and the lock still passes on: those writes may or may not have landed, as with
    /// any failed write.
    pub fn release<E: Endpoint>(&self, ep: &mut E) -> Result<bool> {
        self.release_with(ep, no_hook)
    }

    /// [`CohortLock::release`], running `releasing(ep, state)` right before the remote release
    /// (not before a local handover). If `releasing` fails, the process keeps the remote lock
    /// (the next local holder's release runs the hook again, or, with no one waiting, the next
    /// acquire of this process finds it held), this thread no longer holds it, and the error is
    /// returned. So does a remote release that fails for another reason than a lost lease.
    pub fn release_with<E, Er>(
        &self,
        ep: &mut E,
        releasing: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError> + From<rdmem_core::Error>,
    {
        self.release_inner(ep, releasing, false)
    }

    /// [`CohortLock::release_with`]; `by_guard` when a [`CohortGuard`] releases what it took
    /// (a lock taken with a guard is released by the guard only).
    fn release_inner<E, Er>(
        &self,
        ep: &mut E,
        releasing: impl FnOnce(&mut E, &mut S) -> Result<(), Er>,
        by_guard: bool,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError> + From<rdmem_core::Error>,
    {
        self.check_form()?;
        if *self.owner() != Some(current_thread()) {
            return Err(LockError::NotHolder { word: self.remote.word() }.into());
        }
        let mut cohort = self.cohort_of_holder()?;
        if cohort.hold.guarded && !by_guard {
            return Err(LockError::HeldByGuard { word: self.remote.word() }.into());
        }
        cohort.hold.guarded = false;
        let _unbusy = Unbusy { lock: self, keep: false };
        let cohort = &mut *cohort;
        // The next holder uses its own queue pairs: this section's posted writes must land first.
        self.hand_on(ep, &mut cohort.hold, &mut cohort.state, releasing, true)
    }

    /// The release decision: local handover or remote release.
    fn hand_on<E, T, Er>(
        &self,
        ep: &mut E,
        cohort: &mut Hold,
        state: &mut T,
        releasing: impl FnOnce(&mut E, &mut T) -> Result<(), Er>,
        flush_first: bool,
    ) -> Result<bool, Er>
    where
        E: Endpoint,
        Er: From<LockError> + From<rdmem_core::Error>,
    {
        if self.waiting.load(Ordering::SeqCst) > 0 && cohort.handovers < self.max_handovers {
            cohort.handovers += 1;
            if flush_first {
                ep.flush()?;
            }
            return Ok(true);
        }
        releasing(ep, state)?;
        let value = cohort.held.expect("the cohort holds the remote lock while locked");
        // After the section's operations, posted writes included (see RemoteLock::release).
        match self.remote.release(ep, value) {
            Ok(()) => {
                cohort.held = None;
                Ok(false)
            }
            Err(e) => {
                if matches!(e, LockError::LeaseLost { .. }) {
                    cohort.held = None;
                }
                Err(e.into())
            }
        }
    }

    /// Runs `f` on the lock's state; only the holding thread may ([`LockError::NotHolder`]).
    pub fn with_state_mut<R>(&self, f: impl FnOnce(&mut S) -> R) -> Result<R> {
        if !self.held_by_me() {
            return Err(LockError::NotHolder { word: self.remote.word() });
        }
        Ok(f(&mut self.cohort_of_holder()?.state))
    }

    /// Acquires the lock for this thread, through this thread's endpoint `ep`.
    pub fn lock<'a, E: Endpoint>(&'a self, ep: &'a mut E) -> Result<CohortGuard<'a, E, S>> {
        self.acquire(ep)?;
        self.cohort().hold.guarded = true;
        Ok(CohortGuard { lock: self, ep, released: false, _not_send: std::marker::PhantomData })
    }

    /// The guard's release.
    fn release_guarded<E: Endpoint>(&self, ep: &mut E) -> Result<bool> {
        self.release_inner(ep, no_hook, true)
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
        self.lock.release_guarded(self.ep)
    }
}

impl<E: Endpoint, S> Drop for CohortGuard<'_, E, S> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("cohort lock at {} dropped without unlock(); releasing it", self.lock.remote.word());
            if let Err(e) = self.lock.release_guarded(self.ep) {
                tracing::error!("releasing the dropped cohort lock failed: {e}");
            }
        }
    }
}

/// The endpoint of a cohort lock made with [`CohortLock::with_endpoint`].
pub struct OwnEndpoint<E>(E);

impl<E: Endpoint> CohortLock<OwnEndpoint<E>> {
    /// A cohort lock with an endpoint of its own, lent to each holder with the lock
    /// ([`CohortLock::lock_own`]). A section can then end with a posted WRITE that neither a
    /// local handover nor the release waits for: the next holder's operations go on the same
    /// queue pairs, after it. The price is a queue pair per memory node per lock: use it for a
    /// few hot locks, and the per-thread-endpoint form ([`CohortLock::new`]) for many.
    pub fn with_endpoint(remote: RemoteLock, max_handovers: u32, ep: E) -> Self {
        CohortLock { own_endpoint: true, ..CohortLock::with_state(remote, max_handovers, OwnEndpoint(ep)) }
    }

    /// Acquires the lock for this thread; the section's operations go through the lock's own
    /// endpoint ([`OwnGuard::endpoint`]).
    pub fn lock_own(&self) -> Result<OwnGuard<'_, E>> {
        let ((), cohort) = self.enter(|c| {
            let Cohort { hold, state } = c;
            self.take_remote(&mut state.0, hold, &mut (), no_hook).map(|_| ())
        })?;
        Ok(OwnGuard { lock: self, cohort: Some(cohort) })
    }
}

/// A cohort lock held through its own endpoint ([`CohortLock::lock_own`]); release with
/// [`OwnGuard::unlock`] (dropping releases and logs). It stays on the thread that took it.
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct OwnGuard<'a, E: Endpoint> {
    lock: &'a CohortLock<OwnEndpoint<E>>,
    cohort: Option<MutexGuard<'a, Cohort<OwnEndpoint<E>>>>,
}

impl<E: Endpoint> OwnGuard<'_, E> {
    /// The lock's endpoint, for the critical section. A write that ends the section can be
    /// posted ([`Endpoint::post_write`]): whoever comes next, here or in another process,
    /// sees it.
    pub fn endpoint(&mut self) -> &mut E {
        &mut self.cohort.as_mut().expect("held until unlock").state.0
    }

    /// Releases: hands the lock to a waiting thread of this process (`true`, nothing waited
    /// for), or releases it remotely (`false`; `LeaseLost` if the lease expired meanwhile).
    pub fn unlock(mut self) -> Result<bool> {
        self.release()
    }

    fn release(&mut self) -> Result<bool> {
        let mut cohort = self.cohort.take().expect("held until unlock");
        let unbusy = Unbusy { lock: self.lock, keep: false };
        let Cohort { hold, state } = &mut *cohort;
        let result = self.lock.hand_on(&mut state.0, hold, &mut (), no_hook, false);
        drop(cohort);
        drop(unbusy);
        result
    }
}

impl<E: Endpoint> Drop for OwnGuard<'_, E> {
    fn drop(&mut self) {
        if self.cohort.is_some() {
            tracing::warn!("cohort lock at {} dropped without unlock(); releasing it", self.lock.remote.word());
            if let Err(e) = self.release() {
                tracing::error!("releasing the dropped cohort lock failed: {e}");
            }
        }
    }
}
