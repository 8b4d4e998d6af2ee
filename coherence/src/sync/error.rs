//! Errors of the locks and the barrier.

use rdmem_core::GlobalAddr;

/// Why a lock or barrier operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Holder ids must be nonzero (0 marks a free lock).
    #[error("holder id 0 is reserved for 'free'; use a nonzero id")]
    BadHolder,
    /// Lock and barrier words are 8-byte atomics.
    #[error("{word} is not 8-byte aligned; lock and barrier words must be")]
    Misaligned {
        /// The word.
        word: GlobalAddr,
    },
    /// This holder id holds the lock already, or, for a cohort lock, this thread does (a
    /// second acquire would wait for itself).
    #[error("the lock at {word} is already held by holder {holder} (this same id, or this thread of it)")]
    AlreadyHeld {
        /// The lock word.
        word: GlobalAddr,
        /// The holder id.
        holder: u32,
    },
    /// A cohort lock made with its own endpoint ([`crate::CohortLock::with_endpoint`]) is taken
    /// with `lock_own` only: the per-thread-endpoint calls would skip the ordering it relies on.
    #[error("the cohort lock at {word} lends its own endpoint: take it with lock_own()")]
    OwnEndpoint {
        /// The lock word.
        word: GlobalAddr,
    },
    /// A cohort lock taken with a guard ([`crate::CohortLock::lock`]) is released by the guard.
    #[error("the cohort lock at {word} is held through a guard: release it with the guard's unlock()")]
    HeldByGuard {
        /// The lock word.
        word: GlobalAddr,
    },
    /// A release by a thread that does not hold this cohort lock.
    #[error("the cohort lock at {word} is not held by this thread")]
    NotHolder {
        /// The lock word.
        word: GlobalAddr,
    },
    /// The lease ran out and another holder took the lock over; or the unlocker was never
    /// the holder. The critical section may have overlapped another one.
    #[error("lease lost on the lock at {word}: it now holds {now:#x}, not this holder's value")]
    LeaseLost {
        /// The lock word.
        word: GlobalAddr,
        /// What the word holds now.
        now: u64,
    },
    /// A lock id beyond the table.
    #[error("lock id {id} is out of range: the table has {count} locks")]
    IdOutOfRange {
        /// The id asked for.
        id: u64,
        /// The number of locks.
        count: u64,
    },
    /// A barrier of zero participants.
    #[error("a barrier needs at least one participant")]
    NoParticipants,
    /// More participants arrived than the barrier was made for.
    #[error("barrier overrun: {got} arrivals where the round ends at {expected} (more participants than configured?)")]
    BarrierOverrun {
        /// Arrivals at which the round completes.
        expected: u64,
        /// Arrivals counted.
        got: u64,
    },
    /// A barrier taken up after a restore ([`crate::sync::RemoteBarrier::resume`]) was saved in
    /// the middle of a round.
    #[error(
        "cannot take up the barrier: {counter} arrivals do not fit {epoch} rounds of {participants} done (its state was not saved between rounds)"
    )]
    BarrierMidRound {
        /// Arrivals counted.
        counter: u64,
        /// Rounds completed.
        epoch: u64,
        /// Participants.
        participants: u64,
    },
    /// The other participants did not all arrive in time: they disagree on the participant
    /// count, one called `wait` once too often or too few times, or one died.
    #[error(
        "barrier at {counter}: round {round} still has {arrived} of {participants} participants after {waited:?}; do all participants agree on the count and call wait once per round?"
    )]
    BarrierTimeout {
        /// The barrier's counter word.
        counter: GlobalAddr,
        /// The round waited for (counted from 0).
        round: u64,
        /// Participants counted in that round.
        arrived: u64,
        /// Participants the round needs (this handle's count).
        participants: u64,
        /// How long this participant waited.
        waited: std::time::Duration,
    },
    /// The network operation underneath failed.
    #[error(transparent)]
    Transport(#[from] rdmem_core::Error),
}

/// `Result` with [`LockError`].
pub type Result<T, E = LockError> = std::result::Result<T, E>;
