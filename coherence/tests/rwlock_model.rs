//! A model of the fair reader-writer lock protocol (`RwLock`, `src/rwlock.rs`), checked
//! exhaustively with stateright: 3 processes each complete 2 acquisitions, each in a mode chosen
//! nondeterministically, on one word with a reset threshold of 2, so that give-backs and resets
//! happen within a few tickets. At most one process crashes (wherever it is: a ticket it holds
//! stays outstanding) and at most one holder stalls past its lease ("zombie") and releases late.
//!
//! Steps: every remote operation of the code is one atomic step: the acquiring FAA, the
//! withdrawing CAS, a waiter's READ (a step that sees the generation change or its turn come),
//! and the resetting CASes. A release is a CAS loop that re-reads the word through each failed
//! CAS's result and decides again, so it is one atomic conditional update on the current word:
//! the failed rounds change nothing. For the same reason a waiter that READs and then CASes acts
//! on the current word (a CAS on a stale word fails and only refreshes what the waiter saw).
//!
//! The word: the generation wraps modulo 4 (`GENERATIONS`); the counters are `u8`, wide enough
//! to detect overflow, checked as "no counter exceeds `THRESHOLD + PROCESSES`" (each participant
//! adds at most one ticket past the threshold). The beat is left out: a renewal only changes the
//! beat so that waiters restart their lease clocks, and the model has no clocks.
//!
//! Time and leases: "the word stayed unchanged for a lease" becomes "the current generation has a
//! dead ticket (a crashed process's outstanding ticket, or a zombie's hold) and no live holder".
//! A live holder releases or renews within its lease, so the word does not stay unchanged while
//! it holds; a holder that does neither is what the model calls a zombie. (Without "no live
//! holder", a lease reset under a live reader lets a writer in beside it: that is the protocol's
//! assumption that holders renew, made explicit.) Then any live waiter of the generation may CAS
//! the word to the next generation with zeroed counters. A ghost `epoch` counts resets (the
//! generation the code sees is `epoch % GENERATIONS`), so that the abstraction and the
//! properties never confuse two generations that share a number.
//!
//! Checked: (1) mutual exclusion among live (not crashed, not zombie) holders: a writer is alone;
//! (2) a live holder's ticket is of the current generation and the word grants it (a writer:
//! `n_x == writers_before` and `n_s == readers_before`; a reader: `n_x == writers_before`);
//! (3) `n_x <= max_x` and `n_s <= max_s`; (4) no counter exceeds `THRESHOLD + PROCESSES`;
//! (5) the word counts exactly the tickets of its generation taken (and not withdrawn) and
//! released, as a ghost record of arrivals says: no late release is counted; (6) FIFO: a holder
//! entered only after every conflicting ticket (at least one of the two a writer) of its
//! generation with an earlier arrival position was released; (7) only a zombie's release reports
//! `LeaseLost`; (8) no deadlock: while a live process has acquisitions left, some live process
//! can take a step other than failing; (9) progress: every process that does not crash completes
//! its acquisitions (the state graph is acyclic: the ghost epoch only grows, and without a reset
//! every step moves a process forward); (10) the word is never idle past the threshold: a release
//! that would leave it so resets it, and a withdraw restores an earlier word, so the reset a
//! waiter does in `RwLock::wait` when it sees such a word is a fallback that never runs here;
//! (11) each interesting path is reached (two readers share, a withdraw, a pass-through
//! release, a release's reset, lease resets after a crash and after a stall, a zombie's release
//! reporting `LeaseLost`), so the model is not vacuous.
//!
//! Not covered: more than `GENERATIONS - 1` resets between a zombie's stall and its late release
//! (or while an old generation's waiter sleeps). Its generation then comes round again and its
//! release is counted in a generation it never held a ticket of, which breaks mutual exclusion.
//! With 3 acquisitions per process the model reaches that (4 resets, modulo 4); with 16
//! generations it passes (about 20 million states, 40 s). The code closes that hole by time: a
//! holder whose lease ran out on its own clock reports `LeaseLost` without touching the word,
//! and 256 resets (the code's 8-bit generation) cannot happen within one lease. The model keeps
//! the stronger adversary (a zombie that does CAS) to show the generation check alone suffices
//! up to the wrap. The waiter's "reset an idle word past the threshold" step (`WaitReset`) is
//! modelled though the code has none: property (10) shows it is never enabled.

use stateright::{Checker, Model, Property};

const PROCESSES: usize = 3;
/// Acquisitions each process completes; a retried one (new ticket after a reset) is not counted.
const ACQUISITIONS: u8 = 2;
/// `RwLock::with_reset_threshold(2)`: the smallest the code allows.
const THRESHOLD: u8 = 2;
/// The generation field wraps modulo this (8 bits in the code).
const GENERATIONS: u8 = 4;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Mode {
    Read,
    Write,
}

/// The lock word (`RwWord`) without its beat.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Word {
    generation: u8,
    max_x: u8,
    max_s: u8,
    n_x: u8,
    n_s: u8,
}

impl Word {
    fn is_idle(self) -> bool {
        self.n_x == self.max_x && self.n_s == self.max_s
    }

    fn over(self) -> bool {
        self.max_x >= THRESHOLD || self.max_s >= THRESHOLD
    }

    /// The next generation's empty word.
    fn reset(self) -> Word {
        Word { generation: (self.generation + 1) % GENERATIONS, max_x: 0, max_s: 0, n_x: 0, n_s: 0 }
    }

    /// The word after an FAA of `mode.increment()`.
    fn add_ticket(self, mode: Mode) -> Word {
        match mode {
            Mode::Read => Word { max_s: self.max_s + 1, ..self },
            Mode::Write => Word { max_x: self.max_x + 1, ..self },
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Ticket {
    mode: Mode,
    generation: u8,
    writers_before: u8,
    readers_before: u8,
    /// Ghost: the reset count when it was taken (the code only has `generation`).
    epoch: u8,
}

impl Ticket {
    fn position(self) -> usize {
        usize::from(self.writers_before + self.readers_before)
    }

    /// `Ticket::granted`.
    fn granted(self, w: Word) -> bool {
        w.generation == self.generation
            && w.n_x == self.writers_before
            && (self.mode == Mode::Read || w.n_s == self.readers_before)
    }

    /// `RwLock::release`'s `still_mine`: the condition of its CAS.
    fn still_mine(self, w: Word) -> bool {
        w.generation == self.generation && (self.mode == Mode::Read || w.n_x == self.writers_before)
    }

    /// The word `RwLock::release` CASes in: one more released, or the next generation when that
    /// leaves the word idle past the threshold.
    fn released(self, w: Word) -> Word {
        let next = match self.mode {
            Mode::Read => Word { n_s: w.n_s + 1, ..w },
            Mode::Write => Word { n_x: w.n_x + 1, ..w },
        };
        if next.is_idle() && next.over() { w.reset() } else { next }
    }
}

/// Where a process is in `RwLock::lock` (and the caller's loop of acquisitions).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Pc {
    /// Between acquisitions: the next FAA chooses the mode.
    Idle,
    /// The acquisition starts over with a new ticket (`continue` in `lock`).
    Retry(Mode),
    /// Took `ticket` past the threshold: next, the CAS that withdraws it (`after` -> `before`).
    GiveBack { ticket: Ticket, before: Word },
    /// The withdraw failed: waits for the ticket's turn to release it unused.
    Passing(Ticket),
    /// The ticket is gone (withdrawn or released): waits for the generation to change.
    WaitReset { mode: Mode, generation: u8 },
    /// Waits for the ticket's turn.
    Waiting(Ticket),
    /// In its critical section; `zombie` once its lease expired while it still runs.
    InSection { ticket: Ticket, zombie: bool },
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Proc {
    pc: Pc,
    /// Acquisitions completed (a release that reported `LeaseLost` completes one too).
    done: u8,
}

impl Proc {
    /// The ticket it took and has neither withdrawn nor released.
    fn outstanding(self) -> Option<Ticket> {
        match self.pc {
            Pc::GiveBack { ticket, .. } | Pc::Passing(ticket) | Pc::Waiting(ticket) | Pc::InSection { ticket, .. } => {
                Some(ticket)
            }
            Pc::Idle | Pc::Retry(_) | Pc::WaitReset { .. } => None,
        }
    }

    /// The mode of its current acquisition, once chosen.
    fn mode(self) -> Option<Mode> {
        match self.pc {
            Pc::Idle => None,
            Pc::Retry(mode) | Pc::WaitReset { mode, .. } => Some(mode),
            Pc::GiveBack { ticket, .. } | Pc::Passing(ticket) | Pc::Waiting(ticket) | Pc::InSection { ticket, .. } => {
                Some(ticket.mode)
            }
        }
    }
}

/// Ghost: one ticket of the current generation, at its arrival position.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Arrival {
    mode: Mode,
    released: bool,
}

/// Ghost: what the last step did, for the `sometimes` properties.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Event {
    Withdrew,
    PassedThrough,
    ReleaseReset,
    WaiterIdleReset,
    LeaseResetAfterCrash,
    LeaseResetAfterStall,
    ZombieLeaseLost,
    /// Must never happen: a holder within its lease loses it.
    LiveLeaseLost,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    word: Word,
    procs: [Proc; PROCESSES],
    crashed: Option<usize>,
    stalled: bool,
    /// Ghost: resets so far; `word.generation == epoch % GENERATIONS`.
    epoch: u8,
    /// Ghost: the current generation's tickets by arrival position (`writers_before +
    /// readers_before`); a withdrawn ticket is removed (the next arrival reuses its position).
    arrivals: Vec<Arrival>,
    /// Ghost.
    last: Option<Event>,
}

impl State {
    fn live(&self, i: usize) -> bool {
        self.crashed != Some(i)
    }

    /// The abstraction of "the word stayed unchanged for a lease": the current generation has a
    /// dead ticket and no live holder (which would release or renew within its lease).
    fn lease_expired(&self) -> bool {
        let current = |t: Ticket| t.epoch == self.epoch;
        let dead = self.procs.iter().enumerate().any(|(i, p)| match p.pc {
            Pc::InSection { ticket, zombie: true } => current(ticket),
            _ => !self.live(i) && p.outstanding().is_some_and(current),
        });
        let live_holder =
            self.procs.iter().enumerate().any(|(i, p)| {
                self.live(i) && matches!(p.pc, Pc::InSection { ticket, zombie: false } if current(ticket))
            });
        dead && !live_holder
    }

    fn crashed_ticket_is_current(&self) -> bool {
        self.crashed.and_then(|i| self.procs[i].outstanding()).is_some_and(|t| t.epoch == self.epoch)
    }

    /// Ghost: `ticket` was released (a ticket of an older generation, or one missing from the
    /// record, is left for the properties to flag).
    fn mark_released(&mut self, ticket: Ticket) {
        if ticket.epoch == self.epoch {
            if let Some(a) = self.arrivals.get_mut(ticket.position()) {
                a.released = true;
            }
        }
    }

    /// Sets the word, moving the ghost epoch and arrivals along when it is a reset.
    fn set_word(&mut self, w: Word) {
        if w.generation != self.word.generation {
            self.epoch += 1;
            self.arrivals.clear();
        }
        self.word = w;
    }

    /// The holders that are alive and within their lease.
    fn live_holders(&self) -> impl Iterator<Item = Ticket> + '_ {
        self.procs.iter().enumerate().filter_map(|(i, p)| match p.pc {
            Pc::InSection { ticket, zombie: false } if self.live(i) => Some(ticket),
            _ => None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// FAA a ticket (the mode is chosen on an acquisition's first FAA and kept on retries).
    Faa(usize, Mode),
    /// GiveBack's CAS(after -> before): withdraws, or fails and passes.
    Withdraw(usize),
    /// A READ sees the ticket's turn.
    Enter(usize),
    /// A READ sees the generation changed: take a new ticket.
    Requeue(usize),
    /// Passing: the ticket's turn came; release it unused (the release CAS loop).
    ReleaseUnused(usize),
    /// WaitReset sees the word idle past the threshold: CAS it to the next generation.
    IdleReset(usize),
    /// A waiter of the generation finds the word unchanged for a lease: CAS it to the next.
    LeaseReset(usize),
    /// `RwGuard::unlock` (the release CAS loop).
    Release(usize),
    /// The process stops wherever it is.
    Crash(usize),
    /// The holder stops renewing: its lease expires while it still runs.
    Stall(usize),
}

struct RwLockModel;

impl Model for RwLockModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            word: Word { generation: 0, max_x: 0, max_s: 0, n_x: 0, n_s: 0 },
            procs: [Proc { pc: Pc::Idle, done: 0 }; PROCESSES],
            crashed: None,
            stalled: false,
            epoch: 0,
            arrivals: Vec::new(),
            last: None,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let w = s.word;
        for (i, p) in s.procs.iter().enumerate() {
            if !s.live(i) {
                continue;
            }
            match p.pc {
                Pc::Idle if p.done < ACQUISITIONS => {
                    actions.push(Action::Faa(i, Mode::Read));
                    actions.push(Action::Faa(i, Mode::Write));
                }
                Pc::Idle => {}
                Pc::Retry(mode) => actions.push(Action::Faa(i, mode)),
                Pc::GiveBack { .. } => actions.push(Action::Withdraw(i)),
                Pc::Waiting(t) | Pc::Passing(t) => {
                    // `wait` checks the generation, then its turn, then the lease.
                    if w.generation != t.generation {
                        actions.push(Action::Requeue(i));
                    } else if t.granted(w) {
                        actions.push(if matches!(p.pc, Pc::Waiting(_)) {
                            Action::Enter(i)
                        } else {
                            Action::ReleaseUnused(i)
                        });
                    } else if s.lease_expired() {
                        actions.push(Action::LeaseReset(i));
                    }
                }
                Pc::WaitReset { generation, .. } => {
                    if w.generation != generation {
                        actions.push(Action::Requeue(i));
                    } else if w.is_idle() && w.over() {
                        actions.push(Action::IdleReset(i));
                    } else if s.lease_expired() {
                        actions.push(Action::LeaseReset(i));
                    }
                }
                Pc::InSection { zombie, .. } => {
                    actions.push(Action::Release(i));
                    if !zombie && !s.stalled {
                        actions.push(Action::Stall(i));
                    }
                }
            }
            if s.crashed.is_none() && !(p.pc == Pc::Idle && p.done == ACQUISITIONS) {
                actions.push(Action::Crash(i));
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut n = s.clone();
        n.last = None;
        let w = s.word;
        match action {
            Action::Faa(i, mode) => {
                let ticket = Ticket {
                    mode,
                    generation: w.generation,
                    writers_before: w.max_x,
                    readers_before: w.max_s,
                    epoch: s.epoch,
                };
                let after = w.add_ticket(mode);
                n.word = after;
                n.arrivals.push(Arrival { mode, released: false });
                n.procs[i].pc = if w.over() {
                    Pc::GiveBack { ticket, before: w }
                } else if ticket.granted(after) {
                    // Uncontended: the FAA's answer already grants it.
                    Pc::InSection { ticket, zombie: false }
                } else {
                    Pc::Waiting(ticket)
                };
            }
            Action::Withdraw(i) => {
                let Pc::GiveBack { ticket, before } = s.procs[i].pc else { unreachable!() };
                if w == before.add_ticket(ticket.mode) {
                    n.word = before;
                    n.arrivals.pop();
                    n.procs[i].pc = Pc::WaitReset { mode: ticket.mode, generation: ticket.generation };
                    n.last = Some(Event::Withdrew);
                } else {
                    n.procs[i].pc = Pc::Passing(ticket);
                }
            }
            Action::Enter(i) => {
                let Pc::Waiting(ticket) = s.procs[i].pc else { unreachable!() };
                n.procs[i].pc = Pc::InSection { ticket, zombie: false };
            }
            Action::Requeue(i) => {
                n.procs[i].pc = Pc::Retry(s.procs[i].mode().unwrap());
            }
            Action::ReleaseUnused(i) => {
                // Granted implies `still_mine`, so this release succeeds.
                let Pc::Passing(ticket) = s.procs[i].pc else { unreachable!() };
                n.mark_released(ticket);
                n.set_word(ticket.released(w));
                n.procs[i].pc = Pc::WaitReset { mode: ticket.mode, generation: ticket.generation };
                n.last = Some(Event::PassedThrough);
            }
            Action::IdleReset(i) => {
                n.set_word(w.reset());
                n.procs[i].pc = Pc::Retry(s.procs[i].mode().unwrap());
                n.last = Some(Event::WaiterIdleReset);
            }
            Action::LeaseReset(i) => {
                n.set_word(w.reset());
                n.procs[i].pc = Pc::Retry(s.procs[i].mode().unwrap());
                n.last = Some(if s.crashed_ticket_is_current() {
                    Event::LeaseResetAfterCrash
                } else {
                    Event::LeaseResetAfterStall
                });
            }
            Action::Release(i) => {
                let Pc::InSection { ticket, zombie } = s.procs[i].pc else { unreachable!() };
                if ticket.still_mine(w) {
                    n.mark_released(ticket);
                    let next = ticket.released(w);
                    n.set_word(next);
                    if next.generation != w.generation {
                        n.last = Some(Event::ReleaseReset);
                    }
                } else {
                    // LeaseLost: the CAS changed nothing.
                    n.last = Some(if zombie { Event::ZombieLeaseLost } else { Event::LiveLeaseLost });
                }
                n.procs[i] = Proc { pc: Pc::Idle, done: s.procs[i].done + 1 };
            }
            Action::Crash(i) => n.crashed = Some(i),
            Action::Stall(i) => {
                let Pc::InSection { ticket, .. } = s.procs[i].pc else { unreachable!() };
                n.procs[i].pc = Pc::InSection { ticket, zombie: true };
                n.stalled = true;
            }
        }
        Some(n)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("a live writer holds alone", |_, s: &State| {
                let holders: Vec<Ticket> = s.live_holders().collect();
                holders.len() <= 1 || holders.iter().all(|t| t.mode == Mode::Read)
            }),
            Property::always("the word grants every live holder", |_, s: &State| {
                s.live_holders().all(|t| t.epoch == s.epoch && t.granted(s.word))
            }),
            Property::always("no more released than handed out", |_, s: &State| {
                s.word.n_x <= s.word.max_x && s.word.n_s <= s.word.max_s
            }),
            Property::always("no counter exceeds the threshold plus the participants", |_, s: &State| {
                let w = s.word;
                [w.max_x, w.max_s, w.n_x, w.n_s].iter().all(|&c| usize::from(c) <= usize::from(THRESHOLD) + PROCESSES)
            }),
            Property::always("the word counts exactly its generation's tickets", |_, s: &State| {
                let count = |mode: Mode, released: bool| {
                    s.arrivals.iter().filter(|a| a.mode == mode && (a.released || !released)).count()
                };
                let w = s.word;
                w.generation == s.epoch % GENERATIONS
                    && count(Mode::Write, false) == usize::from(w.max_x)
                    && count(Mode::Read, false) == usize::from(w.max_s)
                    && count(Mode::Write, true) == usize::from(w.n_x)
                    && count(Mode::Read, true) == usize::from(w.n_s)
            }),
            Property::always("conflicting tickets enter in arrival order", |_, s: &State| {
                s.procs.iter().all(|p| match p.pc {
                    Pc::InSection { ticket, .. } if ticket.epoch == s.epoch => s
                        .arrivals
                        .iter()
                        .take(ticket.position())
                        .all(|a| a.released || (a.mode == Mode::Read && ticket.mode == Mode::Read)),
                    _ => true,
                })
            }),
            Property::always("only a zombie loses its lease", |_, s: &State| s.last != Some(Event::LiveLeaseLost)),
            Property::always("no deadlock", |m: &RwLockModel, s: &State| {
                let mut actions = Vec::new();
                m.actions(s, &mut actions);
                let finished = (0..PROCESSES).all(|i| !s.live(i) || s.procs[i].done == ACQUISITIONS);
                finished || actions.iter().any(|a| !matches!(a, Action::Crash(_) | Action::Stall(_)))
            }),
            Property::eventually("every process that does not crash completes its acquisitions", |_, s: &State| {
                (0..PROCESSES).all(|i| !s.live(i) || s.procs[i].done == ACQUISITIONS)
            }),
            Property::sometimes("two readers share the lock", |_, s: &State| {
                s.live_holders().filter(|t| t.mode == Mode::Read).count() >= 2
            }),
            Property::sometimes("a ticket past the threshold is withdrawn", |_, s: &State| {
                s.last == Some(Event::Withdrew)
            }),
            Property::sometimes("a ticket past the threshold is released unused", |_, s: &State| {
                s.last == Some(Event::PassedThrough)
            }),
            Property::sometimes("a release resets the word it leaves idle past the threshold", |_, s: &State| {
                s.last == Some(Event::ReleaseReset)
            }),
            Property::always("the word is never idle past the threshold", |_, s: &State| {
                !(s.word.is_idle() && s.word.over())
            }),
            Property::sometimes("a crashed process's ticket is reset after a lease", |_, s: &State| {
                s.last == Some(Event::LeaseResetAfterCrash)
            }),
            Property::sometimes("a zombie's hold is reset after a lease", |_, s: &State| {
                s.last == Some(Event::LeaseResetAfterStall)
            }),
            Property::sometimes("a zombie's late release reports a lost lease", |_, s: &State| {
                s.last == Some(Event::ZombieLeaseLost)
            }),
        ]
    }
}

#[test]
fn the_rwlock_protocol_is_safe_fair_and_live_with_crashes_and_expired_leases() {
    // About 1.5 million states, a few seconds in release mode.
    let checker = RwLockModel.checker().threads(2).spawn_bfs().join();
    checker.assert_properties();
    let states = checker.unique_state_count();
    assert!(states > 1_000_000, "the model explored only {states} states");
}
