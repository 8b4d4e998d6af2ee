//! A model of the remote lock protocol (`RemoteLock`), checked exhaustively with stateright:
//! processes acquire with CAS, a waiter takes over a holder whose lease expired, releases are
//! CAS back to 0. The model includes a holder that crashes and a holder that stalls past its
//! lease ("zombie") and then releases late.
//!
//! Checked: (1) at most one live holder (not a zombie) is in its critical section; (2) while a
//! live holder is in its section, the word holds exactly its value (no late release cleared
//! it); (3) progress: every process that does not crash finishes; (4) both failure cases are
//! actually reached (so the model is not vacuous).
//!
//! The lease is abstracted: "unchanged for a lease period" becomes "its holder crashed or
//! stalled past its lease". That is the protocol's assumption made explicit: an alive holder
//! renews within its lease.

use stateright::{Checker, Model, Property};

const PROCESSES: usize = 3;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Proc {
    Waiting,
    /// In its critical section, with the value it wrote; `zombie` once its lease expired.
    InSection {
        zombie: bool,
    },
    Done {
        lease_lost: bool,
    },
    Crashed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    /// The lock word: 0, or the value of the process that holds it (`i + 1`).
    word: u64,
    procs: [Proc; PROCESSES],
    crashes: u8,
    stalls: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// CAS 0 -> mine.
    Acquire(usize),
    /// CAS held-by-a-dead-or-expired-holder -> mine (the lease ran out).
    TakeOver(usize),
    /// CAS mine -> 0.
    Release(usize),
    /// The process dies wherever it is.
    Crash(usize),
    /// The holder stops renewing: its lease expires while it is still in its section.
    Stall(usize),
}

struct LockModel;

fn value(i: usize) -> u64 {
    i as u64 + 1
}

impl Model for LockModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State { word: 0, procs: [Proc::Waiting; PROCESSES], crashes: 0, stalls: 0 }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (i, p) in s.procs.iter().enumerate() {
            match p {
                Proc::Waiting => {
                    if s.word == 0 {
                        actions.push(Action::Acquire(i));
                    } else {
                        let holder = (s.word - 1) as usize;
                        let expired = matches!(s.procs[holder], Proc::Crashed | Proc::InSection { zombie: true });
                        if expired {
                            actions.push(Action::TakeOver(i));
                        }
                    }
                }
                Proc::InSection { zombie } => {
                    actions.push(Action::Release(i));
                    if !zombie && s.stalls == 0 {
                        actions.push(Action::Stall(i));
                    }
                }
                Proc::Done { .. } | Proc::Crashed => {}
            }
            if s.crashes == 0 && !matches!(p, Proc::Done { .. } | Proc::Crashed) {
                actions.push(Action::Crash(i));
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut n = s.clone();
        match action {
            Action::Acquire(i) | Action::TakeOver(i) => {
                n.word = value(i);
                n.procs[i] = Proc::InSection { zombie: false };
            }
            Action::Release(i) => {
                // CAS(mine, 0): fails, changing nothing, if the lock was taken over.
                let lease_lost = n.word != value(i);
                if !lease_lost {
                    n.word = 0;
                }
                n.procs[i] = Proc::Done { lease_lost };
            }
            Action::Crash(i) => {
                n.procs[i] = Proc::Crashed;
                n.crashes += 1;
            }
            Action::Stall(i) => {
                n.procs[i] = Proc::InSection { zombie: true };
                n.stalls += 1;
            }
        }
        Some(n)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("at most one live holder in its section", |_, s: &State| {
                s.procs.iter().filter(|p| matches!(p, Proc::InSection { zombie: false })).count() <= 1
            }),
            Property::always("a live holder's value stays in the word", |_, s: &State| {
                s.procs
                    .iter()
                    .enumerate()
                    .all(|(i, p)| !matches!(p, Proc::InSection { zombie: false }) || s.word == value(i))
            }),
            Property::eventually("every process that does not crash finishes", |_, s: &State| {
                s.procs.iter().all(|p| matches!(p, Proc::Done { .. } | Proc::Crashed))
            }),
            Property::sometimes("a crashed holder is taken over", |_, s: &State| {
                s.crashes == 1 && s.procs.iter().filter(|p| matches!(p, Proc::Done { lease_lost: false })).count() == 2
            }),
            Property::sometimes("a late release reports a lost lease", |_, s: &State| {
                s.procs.iter().any(|p| matches!(p, Proc::Done { lease_lost: true }))
            }),
        ]
    }
}

#[test]
fn the_lock_protocol_is_safe_and_live_with_crashes_and_expired_leases() {
    let checker = LockModel.checker().spawn_bfs().join();
    checker.assert_properties();
    assert!(checker.unique_state_count() > 50, "the model explored {} states", checker.unique_state_count());
}
