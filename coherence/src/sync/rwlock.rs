//! A fair reader-writer lock in one remote 8-byte word: FIFO tickets taken with fetch-and-add
//! (DSLR's design, Yoon et al., SIGMOD 2018), with generations for reset and lease expiry.
//!
//! ```text
//! bits 56..64  gen    generation: changes on every reset
//! bits 52..56  beat   changes on every renewal (waiters restart their lease clocks)
//! bits 39..52  max_x  writer tickets handed out      bits 13..26  n_x  writers released
//! bits 26..39  max_s  reader tickets handed out      bits  0..13  n_s  readers released
//! ```
//!
//! - **Acquire** is one FAA on `max_x` (writer) or `max_s` (reader). The word it returns is the
//!   ticket: the writers (`x = max_x`) and readers (`s = max_s`) that arrived before. A reader
//!   enters when `n_x == x` (every earlier writer released); a writer when also `n_s == s`
//!   (every earlier reader released). Uncontended, the FAA's answer already grants it.
//!   Waiters READ the word with backoff.
//! - **Release** is a CAS that adds 1 to `n_x` (writer) or `n_s` (reader) *only if the
//!   generation is still the ticket's* (and, for a writer, `n_x` is still its ticket). A release
//!   whose ticket was skipped by a lease reset therefore changes nothing and reports
//!   [`LockError::LeaseLost`]: a late FAA would have let a later ticket in while the current
//!   holder still holds the lock, so releases never use FAA. A holder whose lease ran out
//!   (measured on its own clock since it entered or renewed) does not even try: the generation
//!   is 8 bits, and after 256 resets an old one would look current again.
//! - **Wrap-around**: the 13-bit counters never wrap. A ticket taken when `max_x` or `max_s` had
//!   reached the reset threshold (4096) is never used: its taker withdraws it with a CAS that
//!   restores the word it saw (never FAA(-1), which would hand the same ticket to two
//!   later arrivals), or, if others arrived meanwhile and the CAS fails, waits for its turn and
//!   releases it unused. It then waits for the reset. Whoever sees the word idle (every ticket
//!   released) past the threshold CASes it to the next generation, counters at zero. Each
//!   participant adds at most one ticket past the threshold, so with fewer than 4096
//!   participants no counter overflows into its neighbour.
//! - **Lease**: a waiter that sees the whole word unchanged for a lease takes its holders (and
//!   waiters) for dead and resets the word to the next generation; every waiter of the old
//!   generation then takes a new ticket. Holders of long sections call
//!   [`RwGuard::renew`] within each lease. As with [`crate::RemoteLock`], a crashed holder
//!   blocks others for at most about two leases.
//!
//! FIFO: within a generation, conflicting acquisitions (at least one a writer) enter in the
//! order of their FAAs, and readers that arrive together share the lock. A reset (every 4096
//! tickets, or on lease expiry) happens only when the word is idle or its holders are dead,
//! so it keeps the order too, except for the waiters of a lease reset, who queue again.

use std::time::{Duration, Instant};

use rdmem_core::{Endpoint, GlobalAddr};

use super::error::{LockError, Result};
use super::lock::Clock;

const FIELD_BITS: u32 = 13;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const N_S: u32 = 0;
const N_X: u32 = 13;
const MAX_S: u32 = 26;
const MAX_X: u32 = 39;
const BEAT: u32 = 52;
const GEN: u32 = 56;

/// READs of the word a waiter makes back to back before it starts sleeping between them.
const EAGER_POLLS: u32 = 32;

/// Tickets per generation before the word is reset; also the most participants (threads or
/// processes taking the lock at once) the lock supports, minus one.
pub const RESET_THRESHOLD: u16 = 1 << 12;

/// The lock word, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwWord(pub u64);

impl RwWord {
    fn field(self, shift: u32) -> u16 {
        ((self.0 >> shift) & FIELD_MASK) as u16
    }

    fn with_field(self, shift: u32, value: u16) -> RwWord {
        RwWord((self.0 & !(FIELD_MASK << shift)) | ((value as u64 & FIELD_MASK) << shift))
    }

    /// Readers released.
    pub fn n_s(self) -> u16 {
        self.field(N_S)
    }
    /// Writers released.
    pub fn n_x(self) -> u16 {
        self.field(N_X)
    }
    /// Reader tickets handed out.
    pub fn max_s(self) -> u16 {
        self.field(MAX_S)
    }
    /// Writer tickets handed out.
    pub fn max_x(self) -> u16 {
        self.field(MAX_X)
    }
    /// The renewal counter (4 bits).
    pub fn beat(self) -> u8 {
        ((self.0 >> BEAT) & 0xf) as u8
    }
    /// The generation.
    pub fn generation(self) -> u8 {
        (self.0 >> GEN) as u8
    }
    /// Every ticket handed out was released: nobody holds or waits.
    pub fn is_idle(self) -> bool {
        self.n_x() == self.max_x() && self.n_s() == self.max_s()
    }
    fn over(self, threshold: u16) -> bool {
        self.max_x() >= threshold || self.max_s() >= threshold
    }
    /// The next generation's empty word.
    fn reset(self) -> RwWord {
        RwWord((self.generation().wrapping_add(1) as u64) << GEN)
    }
    fn renewed(self) -> RwWord {
        RwWord((self.0 & !(0xf << BEAT)) | (((self.beat() + 1) as u64 & 0xf) << BEAT))
    }
}

/// Shared (read) or exclusive (write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Shared with other readers.
    Read,
    /// Exclusive.
    Write,
}

impl Mode {
    fn increment(self) -> u64 {
        match self {
            Mode::Read => 1 << MAX_S,
            Mode::Write => 1 << MAX_X,
        }
    }
}

/// One acquisition's place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// Read or write.
    pub mode: Mode,
    /// The generation it was taken in.
    pub generation: u8,
    /// Writer tickets taken before it in its generation.
    pub writers_before: u16,
    /// Reader tickets taken before it in its generation.
    pub readers_before: u16,
}

impl Ticket {
    /// Its position in its generation's arrival order (0 = first).
    pub fn position(&self) -> u32 {
        self.writers_before as u32 + self.readers_before as u32
    }

    fn granted(&self, w: RwWord) -> bool {
        w.generation() == self.generation
            && w.n_x() == self.writers_before
            && (self.mode == Mode::Read || w.n_s() == self.readers_before)
    }
}

/// Where a reader-writer lock lives. Cheap to copy; the state is all in remote memory.
#[derive(Debug, Clone, Copy)]
pub struct RwLock {
    word: GlobalAddr,
    lease: Duration,
    threshold: u16,
    clock: Clock,
}

/// How a wait for the word ended.
enum Waited {
    /// The condition held; the word as seen then.
    Ready(RwWord),
    /// The generation changed, or this waiter reset it after a lease: take a new ticket.
    Reset,
}

impl RwLock {
    /// A reader-writer lock in the 8-byte word at `word` (8-aligned, initially 0), with `lease`.
    /// Anyone may take it; the word does not name its holders.
    pub fn new(word: GlobalAddr, lease: Duration) -> Result<Self> {
        if !word.is_aligned(8) {
            return Err(LockError::Misaligned { word });
        }
        Ok(RwLock { word, lease, threshold: RESET_THRESHOLD, clock: Instant::now })
    }

    /// The same lock, with lease time read from `clock` instead of [`Instant::now`] (for tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> Instant {
        (self.clock)()
    }

    /// Resets the word after `threshold` tickets instead of [`RESET_THRESHOLD`] (2 at least,
    /// at most `RESET_THRESHOLD`): for tests, which then cross many generations quickly. Every
    /// user of one lock must use the same threshold.
    pub fn with_reset_threshold(mut self, threshold: u16) -> Self {
        self.threshold = threshold.clamp(2, RESET_THRESHOLD);
        self
    }

    /// The word's address.
    pub fn word(&self) -> GlobalAddr {
        self.word
    }

    /// Acquires shared access.
    pub fn read<'e, E: Endpoint>(&self, ep: &'e mut E) -> Result<RwGuard<'e, E>> {
        self.lock(ep, Mode::Read)
    }

    /// Acquires exclusive access.
    pub fn write<'e, E: Endpoint>(&self, ep: &'e mut E) -> Result<RwGuard<'e, E>> {
        self.lock(ep, Mode::Write)
    }

    /// Acquires in `mode`: takes a ticket and waits for its turn.
    pub fn lock<'e, E: Endpoint>(&self, ep: &'e mut E, mode: Mode) -> Result<RwGuard<'e, E>> {
        loop {
            let before = RwWord(ep.faa(self.word, mode.increment())?);
            let ticket = Ticket {
                mode,
                generation: before.generation(),
                writers_before: before.max_x(),
                readers_before: before.max_s(),
            };
            let after = RwWord(before.0.wrapping_add(mode.increment()));
            if before.over(self.threshold) {
                self.give_back(ep, ticket, before, after)?;
                continue;
            }
            // `wait` checks the word it is given first: uncontended, the FAA's answer grants.
            match self.wait(ep, after, ticket.generation, |w| ticket.granted(w))? {
                Waited::Ready(seen) => {
                    return Ok(RwGuard { ep, lock: *self, ticket, seen, since: self.now(), released: false });
                }
                Waited::Reset => continue,
            }
        }
    }

    /// A ticket taken past the threshold: withdraw it (CAS back to the word before it) or, when
    /// others arrived since, release it unused at its turn; then wait for the next generation.
    fn give_back<E: Endpoint>(&self, ep: &mut E, ticket: Ticket, before: RwWord, after: RwWord) -> Result<()> {
        let now = RwWord(ep.cas(self.word, after.0, before.0)?);
        let seen = if now == after {
            before // withdrawn
        } else {
            match self.wait(ep, now, ticket.generation, |w| ticket.granted(w))? {
                Waited::Ready(w) => match self.release(ep, ticket, w) {
                    Ok(w) => w,
                    Err(LockError::LeaseLost { now, .. }) => RwWord(now),
                    Err(e) => return Err(e),
                },
                Waited::Reset => return Ok(()),
            }
        };
        // Never ready: returns once the generation changed.
        self.wait(ep, seen, ticket.generation, |_| false).map(drop)
    }

    /// READs the word (with backoff, starting from `seen`) until `ready` holds. Returns
    /// `Reset` when the generation moves past `generation`, and resets the word itself once it
    /// stayed unchanged for a lease (its holders are dead). A word idle past the threshold is
    /// never seen here: the release that would leave it so resets it instead (checked by the
    /// model in `tests/rwlock_model.rs`).
    fn wait<E: Endpoint>(
        &self,
        ep: &mut E,
        mut seen: RwWord,
        generation: u8,
        ready: impl Fn(RwWord) -> bool,
    ) -> Result<Waited> {
        let mut since = self.now();
        let mut backoff = Duration::from_micros(1);
        let mut polls = 0;
        loop {
            if seen.generation() != generation {
                return Ok(Waited::Reset);
            }
            if ready(seen) {
                return Ok(Waited::Ready(seen));
            }
            if self.now().saturating_duration_since(since) > self.lease && !seen.is_idle() {
                tracing::warn!(
                    "reader-writer lock at {}: word {:#x} unchanged for more than the lease ({:?}); resetting it",
                    self.word,
                    seen.0,
                    self.lease
                );
                // Either way the generation moves on (by this CAS or by someone else's).
                let now = RwWord(ep.cas(self.word, seen.0, seen.reset().0)?);
                if now == seen || now.generation() != generation {
                    return Ok(Waited::Reset);
                }
                seen = now;
                since = self.now();
                continue;
            }
            // The turn usually comes within a few sections: poll back to back first (each READ
            // is a round trip, itself a backoff), then sleep with a growing pause.
            if polls < EAGER_POLLS {
                polls += 1;
                std::thread::yield_now();
            } else {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_micros(200));
            }
            let now = RwWord(ep.read_u64(self.word)?);
            if now != seen {
                seen = now;
                since = self.now();
            }
        }
    }

    /// Releases `ticket` (CAS, retried while only other fields change); resets the word
    /// instead when this release leaves it idle past the threshold. `seen` is the latest known
    /// word. `LeaseLost` when the ticket's generation is over: nothing was changed.
    fn release<E: Endpoint>(&self, ep: &mut E, ticket: Ticket, mut seen: RwWord) -> Result<RwWord> {
        // The section's posted writes to other nodes first (see `RemoteLock::release`).
        ep.flush_for(self.word.node())?;
        loop {
            let still_mine = seen.generation() == ticket.generation
                && (ticket.mode == Mode::Read || seen.n_x() == ticket.writers_before);
            if !still_mine {
                return Err(LockError::LeaseLost { word: self.word, now: seen.0 });
            }
            let mut next = match ticket.mode {
                Mode::Read => seen.with_field(N_S, seen.n_s() + 1),
                Mode::Write => seen.with_field(N_X, seen.n_x() + 1),
            };
            if next.is_idle() && next.over(self.threshold) {
                next = seen.reset();
            }
            let now = RwWord(ep.cas(self.word, seen.0, next.0)?);
            if now == seen {
                return Ok(next);
            }
            seen = now;
        }
    }

    /// Renews the lease of `ticket`'s hold: a new beat, so waiters restart their clocks.
    fn renew<E: Endpoint>(&self, ep: &mut E, ticket: Ticket, mut seen: RwWord) -> Result<RwWord> {
        loop {
            if seen.generation() != ticket.generation {
                return Err(LockError::LeaseLost { word: self.word, now: seen.0 });
            }
            let next = seen.renewed();
            let now = RwWord(ep.cas(self.word, seen.0, next.0)?);
            if now == seen {
                return Ok(next);
            }
            seen = now;
        }
    }
}

/// A held reader-writer lock. Release it with [`RwGuard::unlock`], which reports a lost lease;
/// dropping it releases too, and logs a failure.
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct RwGuard<'e, E: Endpoint> {
    ep: &'e mut E,
    lock: RwLock,
    ticket: Ticket,
    seen: RwWord,
    /// When the hold was granted or last renewed.
    since: Instant,
    released: bool,
}

impl<E: Endpoint> RwGuard<'_, E> {
    /// The endpoint, for the critical section's reads and writes.
    pub fn endpoint(&mut self) -> &mut E {
        self.ep
    }

    /// This hold's ticket: its mode, generation and place in the arrival order.
    pub fn ticket(&self) -> Ticket {
        self.ticket
    }

    /// Restarts the lease (a CAS). Call it within every lease period of a long section.
    pub fn renew(&mut self) -> Result<()> {
        self.check_lease()?;
        self.seen = self.lock.renew(self.ep, self.ticket, self.seen)?;
        self.since = self.lock.now();
        Ok(())
    }

    /// Releases the lock; `LeaseLost` if the lease expired and the word was reset meanwhile.
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.check_lease()?;
        self.lock.release(self.ep, self.ticket, self.seen).map(drop)
    }

    /// A hold older than its lease touches the word no more: it may have been reset since, and
    /// after 256 resets its generation number would be current again (found by the model).
    fn check_lease(&self) -> Result<()> {
        if self.lock.now().saturating_duration_since(self.since) > self.lock.lease {
            return Err(LockError::LeaseLost { word: self.lock.word, now: self.seen.0 });
        }
        Ok(())
    }
}

impl<E: Endpoint> Drop for RwGuard<'_, E> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("reader-writer lock at {} dropped without unlock(); releasing it", self.lock.word);
            if let Err(e) = self.check_lease().and_then(|()| self.lock.release(self.ep, self.ticket, self.seen)) {
                tracing::error!("releasing the dropped reader-writer lock at {} failed: {e}", self.lock.word);
            }
        }
    }
}

/// One critical section of a recorded history: its ticket and when it ran, as two readings
/// of a global event clock taken inside the section (a remote counter bumped with FAA on entry
/// and on exit). Tests and `rdmem-locks rw` record these to check the lock's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// Read or write.
    pub mode: Mode,
    /// The ticket's generation.
    pub generation: u8,
    /// The ticket's position in its generation.
    pub position: u32,
    /// The clock on entry.
    pub enter: u64,
    /// The clock on exit.
    pub exit: u64,
}

impl Section {
    /// The section as one line of text: `section <r|w> <generation> <position> <enter> <exit>`.
    pub fn to_line(&self) -> String {
        let mode = if self.mode == Mode::Read { 'r' } else { 'w' };
        format!("section {mode} {} {} {} {}", self.generation, self.position, self.enter, self.exit)
    }

    /// Parses [`Section::to_line`]'s format; `None` for other lines.
    pub fn from_line(line: &str) -> Option<Section> {
        let mut words = line.strip_prefix("section ")?.split(' ');
        let mode = match words.next()? {
            "r" => Mode::Read,
            "w" => Mode::Write,
            _ => return None,
        };
        let mut number = || words.next()?.parse::<u64>().ok();
        let (generation, position, enter, exit) = (number()?, number()?, number()?, number()?);
        Some(Section {
            mode,
            generation: generation.try_into().ok()?,
            position: position.try_into().ok()?,
            enter,
            exit,
        })
    }
}

/// Checks a history recorded without lease resets and with fewer than 256 generations (so no
/// generation number comes back): generations follow each other (all sections of one end
/// before any of the next begins); positions are unique within a generation; and conflicting
/// sections (at least one a writer) run one after the other, in the order of their tickets:
/// FIFO and mutual exclusion. Readers may overlap each other. The error names the first
/// violation.
pub fn check_history(history: &[Section]) -> std::result::Result<(), String> {
    let mut by_enter = history.to_vec();
    by_enter.sort_by_key(|e| e.enter);
    let mut generations: Vec<u8> = Vec::new();
    for e in &by_enter {
        if generations.last() != Some(&e.generation) {
            if generations.contains(&e.generation) {
                return Err(format!("generation {} came back after {generations:?}", e.generation));
            }
            generations.push(e.generation);
        }
    }
    for pair in generations.windows(2) {
        let in_gen = |g: u8| history.iter().filter(move |e| e.generation == g);
        let last_exit = in_gen(pair[0]).map(|e| e.exit).max().unwrap_or(0);
        let first_enter = in_gen(pair[1]).map(|e| e.enter).min().unwrap_or(u64::MAX);
        if last_exit > first_enter {
            return Err(format!("generation {} overlaps generation {}", pair[0], pair[1]));
        }
    }
    for g in generations {
        let mut entries: Vec<&Section> = history.iter().filter(|e| e.generation == g).collect();
        entries.sort_by_key(|e| e.position);
        for (i, a) in entries.iter().enumerate() {
            for b in &entries[i + 1..] {
                if a.position == b.position {
                    return Err(format!("generation {g}: two sections with ticket {}", a.position));
                }
                if (a.mode == Mode::Write || b.mode == Mode::Write) && a.exit > b.enter {
                    return Err(format!(
                        "generation {g}: ticket {} ({:?}, clock {}..{}) and the later ticket {} ({:?}, clock {}..{}) overlap or ran out of order",
                        a.position, a.mode, a.enter, a.exit, b.position, b.mode, b.enter, b.exit
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_check_catches_overlap_reorder_and_reuse() {
        let s = |mode, position, enter, exit| Section { mode, generation: 0, position, enter, exit };
        let ok = [s(Mode::Write, 0, 0, 1), s(Mode::Read, 1, 2, 5), s(Mode::Read, 2, 3, 4), s(Mode::Write, 3, 6, 7)];
        check_history(&ok).unwrap();
        let overlap = [s(Mode::Write, 0, 0, 3), s(Mode::Read, 1, 2, 5)];
        assert!(check_history(&overlap).unwrap_err().contains("overlap"));
        let reordered = [s(Mode::Write, 0, 4, 5), s(Mode::Write, 1, 0, 1)];
        assert!(check_history(&reordered).is_err());
        let reused = [s(Mode::Read, 0, 0, 1), s(Mode::Read, 0, 2, 3)];
        assert!(check_history(&reused).unwrap_err().contains("two sections"));
        let mut back = ok.to_vec();
        back.push(Section { mode: Mode::Read, generation: 1, position: 0, enter: 8, exit: 9 });
        back.push(Section { mode: Mode::Read, generation: 0, position: 4, enter: 10, exit: 11 });
        assert!(check_history(&back).is_err());
    }

    #[test]
    fn fields_decode_and_encode() {
        let w = RwWord(0).with_field(MAX_X, 5).with_field(MAX_S, 7).with_field(N_X, 4).with_field(N_S, 6);
        assert_eq!((w.max_x(), w.max_s(), w.n_x(), w.n_s()), (5, 7, 4, 6));
        let w = RwWord(w.0.wrapping_add(Mode::Write.increment()));
        assert_eq!(w.max_x(), 6);
        let r = w.reset();
        assert_eq!((r.generation(), r.max_x(), r.n_s(), r.beat()), (1, 0, 0, 0));
        assert_eq!(RwWord(0xff << GEN).reset().generation(), 0, "the generation wraps");
        let line = Section { mode: Mode::Write, generation: 3, position: 9, enter: 10, exit: 12 };
        assert_eq!(Section::from_line(&line.to_line()), Some(line));
        assert_eq!(Section::from_line("done 3"), None);
        let mut b = RwWord(0);
        for i in 1..=17u8 {
            b = b.renewed();
            assert_eq!(b.beat(), i % 16);
            assert_eq!(b.0 >> GEN, 0, "the beat never carries into the generation");
        }
    }
}
