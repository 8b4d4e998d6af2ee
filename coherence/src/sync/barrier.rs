//! A reusable barrier for `n` participants from two remote words: a counter and an epoch.
//!
//! Round `r` (counted from 0 by each participant) is complete when the counter reaches
//! `(r + 1) * n`. Arriving is one fetch-and-add; the participant whose add completes the round
//! writes `r + 1` to the epoch word; the others read the epoch until it reaches `r + 1`. The
//! counter only grows, so nothing is ever reset and a fast participant's next round cannot be
//! confused with the current one: invariant `counter == rounds_done * n + arrived_this_round`.
//!
//! A barrier that cannot complete (participants that disagree on `n`, or one that calls `wait`
//! once too often, or one that died) fails after a timeout ([`DEFAULT_BARRIER_TIMEOUT`],
//! [`RemoteBarrier::set_timeout`]) with [`LockError::BarrierTimeout`], naming the barrier and how
//! many arrived, instead of waiting forever. The arrival stays counted: calling `wait` again
//! keeps waiting for the same round.

use std::time::{Duration, Instant};

use rdmem_core::{Endpoint, GlobalAddr};

use super::error::{LockError, Result};

/// How long [`RemoteBarrier::wait`] waits for the others by default: generous (a slow rank's
/// compute phase), but finite, so a broken program fails instead of hanging.
pub const DEFAULT_BARRIER_TIMEOUT: Duration = Duration::from_secs(600);

/// One participant's handle on a barrier. Each participant keeps its own (it counts rounds).
#[derive(Debug, Clone)]
pub struct RemoteBarrier {
    counter: GlobalAddr,
    epoch: GlobalAddr,
    participants: u64,
    round: u64,
    /// Arrived in `round` (counted remotely) but not through it: a wait that timed out.
    arrived: bool,
    timeout: Option<Duration>,
}

impl RemoteBarrier {
    /// A barrier of `participants` over two 8-aligned words (initially 0: allocate them with
    /// `rdmem_allocator::ThreadAlloc::alloc_zeroed`) at `counter` and `epoch`. Every
    /// participant must name the same words and count.
    pub fn new(counter: GlobalAddr, epoch: GlobalAddr, participants: u64) -> Result<Self> {
        for word in [counter, epoch] {
            if !word.is_aligned(8) {
                return Err(LockError::Misaligned { word });
            }
        }
        if participants == 0 {
            return Err(LockError::NoParticipants);
        }
        Ok(RemoteBarrier {
            counter,
            epoch,
            participants,
            round: 0,
            arrived: false,
            timeout: Some(DEFAULT_BARRIER_TIMEOUT),
        })
    }

    /// How long `wait` waits for the others before [`LockError::BarrierTimeout`]; `None`
    /// waits forever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Rounds this participant has completed.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Takes up a barrier whose earlier rounds other processes completed (a job restored from
    /// a checkpoint): this participant's round becomes the epoch's. Every participant must take
    /// it up before it completes a round; some may have arrived in the next round already, so
    /// the counter must be within it (`epoch * n <= counter < (epoch + 1) * n`), otherwise
    /// [`LockError::BarrierMidRound`]. It was saved between rounds: that is the caller's to
    /// ensure (the DSM saves it right after a barrier, before anyone arrives at the next).
    pub fn resume<E: Endpoint>(&mut self, ep: &mut E) -> Result<()> {
        let (mut counter, mut epoch) = ([0u8; 8], [0u8; 8]);
        let mut batch = ep.batch();
        batch.read(self.counter, &mut counter).read(self.epoch, &mut epoch);
        batch.submit()?;
        let (counter, epoch) = (u64::from_le_bytes(counter), u64::from_le_bytes(epoch));
        let done = epoch.checked_mul(self.participants);
        if done.is_none_or(|done| counter < done || counter - done >= self.participants) {
            return Err(LockError::BarrierMidRound { counter, epoch, participants: self.participants });
        }
        self.round = epoch;
        self.arrived = false;
        Ok(())
    }

    /// Waits until all participants arrived in this round.
    pub fn wait<E: Endpoint>(&mut self, ep: &mut E) -> Result<()> {
        self.wait_with(ep, |_| Ok(()))
    }

    /// Like [`RemoteBarrier::wait`]; the participant that arrives last runs `last` before it
    /// lets the others through, when everything the others did before arriving is in place
    /// (the DSM records where the round's write notices end this way).
    pub fn wait_with<E: Endpoint>(&mut self, ep: &mut E, last: impl FnOnce(&mut E) -> Result<()>) -> Result<()> {
        let target = (self.round + 1) * self.participants;
        if !self.arrived {
            let arrived = ep.faa(self.counter, 1)? + 1;
            if arrived > target {
                return Err(LockError::BarrierOverrun { expected: target, got: arrived });
            }
            self.arrived = true;
            if arrived == target {
                last(ep)?;
                ep.write_u64(self.epoch, self.round + 1)?;
                self.arrived = false;
                self.round += 1;
                return Ok(());
            }
        }
        let start = Instant::now();
        let mut backoff = Duration::from_micros(1);
        while ep.read_u64(self.epoch)? < self.round + 1 {
            if let Some(limit) = self.timeout {
                let waited = start.elapsed();
                if waited >= limit {
                    let counted = ep.read_u64(self.counter)?;
                    return Err(LockError::BarrierTimeout {
                        counter: self.counter,
                        round: self.round,
                        arrived: counted.saturating_sub(self.round * self.participants).min(self.participants),
                        participants: self.participants,
                        waited,
                    });
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_micros(500));
        }
        self.arrived = false;
        self.round += 1;
        Ok(())
    }
}
