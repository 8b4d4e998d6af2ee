//! Locks and barrier on the loopback transport: exact counters under contention, no torn
//! records, leases after a crash, late releases, barrier rounds, bad inputs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdmem_coherence::{CohortLock, LockError, LockTable, RemoteBarrier, RemoteLock};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};

const LEASE: Duration = Duration::from_secs(2);

fn at(offset: u64) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset).unwrap()
}

/// The critical section: a non-atomic READ then WRITE of the counter.
fn increment<E: Endpoint>(ep: &mut E, counter: GlobalAddr) {
    let n = ep.read_u64(counter).unwrap();
    ep.write_u64(counter, n + 1).unwrap();
}

#[test]
fn plain_lock_counter_is_exact() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let (word, counter) = (at(4096), at(8192));
    let (processes, threads, rounds) = (2u32, 4u32, 300u64);
    std::thread::scope(|s| {
        for p in 0..processes {
            for t in 0..threads {
                let transport = &transport;
                s.spawn(move || {
                    let lock = RemoteLock::new(word, p * 100 + t + 1, LEASE).unwrap();
                    let mut ep = transport.endpoint().unwrap();
                    for _ in 0..rounds {
                        let mut g = lock.lock(&mut ep).unwrap();
                        increment(g.endpoint(), counter);
                        g.unlock().unwrap();
                    }
                });
            }
        }
    });
    let total = processes as u64 * threads as u64 * rounds;
    assert_eq!(transport.endpoint().unwrap().read_u64(counter).unwrap(), total);
}

#[test]
fn cohort_lock_counter_is_exact() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let (word, counter) = (at(4096), at(8192));
    let cohorts: Vec<_> = (1..=2).map(|p| CohortLock::new(RemoteLock::new(word, p, LEASE).unwrap(), 8)).collect();
    let (threads, rounds) = (4, 300u64);
    std::thread::scope(|s| {
        for cohort in &cohorts {
            for _ in 0..threads {
                let transport = &transport;
                s.spawn(move || {
                    let mut ep = transport.endpoint().unwrap();
                    for _ in 0..rounds {
                        let mut g = cohort.lock(&mut ep).unwrap();
                        increment(g.endpoint(), counter);
                        g.unlock().unwrap();
                    }
                });
            }
        }
    });
    assert_eq!(transport.endpoint().unwrap().read_u64(counter).unwrap(), 2 * threads * rounds);
    assert_eq!(transport.endpoint().unwrap().read_u64(word).unwrap(), 0, "released at the end");
}

#[test]
fn cohort_hands_over_to_a_waiting_thread_and_bounds_the_run() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let word = at(4096);
    let cohort = CohortLock::new(RemoteLock::new(word, 5, LEASE).unwrap(), 1);
    let remote_word = || transport.endpoint().unwrap().read_u64(word).unwrap();
    let ep = || transport.endpoint().unwrap();
    let mut ep1 = ep();
    let first = cohort.lock(&mut ep1).unwrap();
    let held = remote_word();
    assert_eq!(held >> 32, 5, "the process holds the remote word");
    let handed = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut ep2 = ep();
            let second = cohort.lock(&mut ep2).unwrap();
            // Handed over locally: the remote word was never released in between.
            assert_eq!(remote_word(), held);
            let third = std::thread::scope(|s2| {
                let t3 = s2.spawn(|| cohort.lock(&mut ep()).unwrap().unlock().unwrap());
                while cohort.waiting() == 0 {
                    std::thread::yield_now();
                }
                // A waiter is there, but the bound (1 handover in a row) is reached: release.
                assert!(!second.unlock().unwrap(), "the second release must go remote");
                t3.join().unwrap()
            });
            assert!(!third, "nobody waits for the last one");
        });
        while cohort.waiting() == 0 {
            std::thread::yield_now();
        }
        let handed = first.unlock().unwrap();
        waiter.join().unwrap();
        handed
    });
    assert!(handed, "the first release must hand over to the waiting thread");
    assert_eq!(remote_word(), 0, "released at the end");
}

#[test]
fn readers_never_see_a_torn_record() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let (word, record) = (at(4096), at(8192));
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let transport = &transport;
            s.spawn(move || {
                let lock = RemoteLock::new(word, t + 1, LEASE).unwrap();
                let mut ep = transport.endpoint().unwrap();
                for i in 0..300u64 {
                    let mut g = lock.lock(&mut ep).unwrap();
                    if t == 0 {
                        // The writer: four words, one WRITE each, all the same value.
                        for w in 0..4 {
                            g.endpoint().write_u64(record.checked_add(8 * w).unwrap(), i).unwrap();
                        }
                    } else {
                        let mut words = [0u8; 32];
                        g.endpoint().read(record, &mut words).unwrap();
                        let first = &words[..8];
                        assert!(words.chunks(8).all(|w| w == first), "torn record: {words:?}");
                    }
                    g.unlock().unwrap();
                }
            });
        }
    });
}

#[test]
fn a_crashed_holder_delays_others_by_about_a_lease() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let lease = Duration::from_millis(200);
    let word = at(4096);
    let mut ep = transport.endpoint().unwrap();
    let crashed = RemoteLock::new(word, 1, lease).unwrap();
    std::mem::forget(crashed.lock(&mut ep).unwrap()); // holds it, never releases: a crash
    let mut other_ep = transport.endpoint().unwrap();
    let started = Instant::now();
    let g = RemoteLock::new(word, 2, lease).unwrap().lock(&mut other_ep).unwrap();
    let waited = started.elapsed();
    assert!(waited >= lease, "took over after {waited:?}, before the lease ran out");
    // A bound no slow machine reaches: without the takeover the wait would never end.
    assert!(waited < Duration::from_secs(300), "took {waited:?}: the lease did not end the wait");
    g.unlock().unwrap();
}

#[test]
fn a_late_release_after_the_lease_is_harmless_and_reported() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let lease = Duration::from_millis(100);
    let word = at(4096);
    let mut slow_ep = transport.endpoint().unwrap();
    let slow = RemoteLock::new(word, 1, lease).unwrap();
    let g = slow.lock(&mut slow_ep).unwrap();
    // Another holder takes it over once the lease ran out.
    let mut fast_ep = transport.endpoint().unwrap();
    let fast = RemoteLock::new(word, 2, lease).unwrap().lock(&mut fast_ep).unwrap();
    // The slow holder's release fails and changes nothing.
    let err = g.unlock().unwrap_err();
    assert!(matches!(err, LockError::LeaseLost { .. }), "{err}");
    assert_eq!(transport.endpoint().unwrap().read_u64(word).unwrap() >> 32, 2, "still held by holder 2");
    fast.unlock().unwrap();
}

/// Lease time from a clock the test moves (`with_clock`), so what the lease does depends on
/// the order of events only, never on how fast the machine runs.
static FAKE_MS: AtomicU64 = AtomicU64::new(0);
static FAKE_BASE: OnceLock<Instant> = OnceLock::new();

fn fake_now() -> Instant {
    *FAKE_BASE.get_or_init(Instant::now) + Duration::from_millis(FAKE_MS.load(Ordering::SeqCst))
}

/// Waits until the transport ran `n` more operations (the waiter polled), or `done` holds.
fn until_polled(transport: &LoopbackTransport, n: u64, done: impl Fn() -> bool) {
    let before = transport.operations();
    while transport.operations() < before + n && !done() {
        std::thread::yield_now();
    }
}

#[test]
fn renewal_keeps_the_lease() {
    // The holder renews every half lease of the fake clock, for four leases: the word never
    // stays unchanged for a lease, so the waiter can never take over, however the threads run.
    let transport = LoopbackTransport::new(&[1 << 20]);
    let lease = Duration::from_secs(1);
    let word = at(4096);
    let lock = |holder| RemoteLock::new(word, holder, lease).unwrap().with_clock(fake_now);
    let mut ep = transport.endpoint().unwrap();
    let mut g = lock(1).lock(&mut ep).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut ep = transport.endpoint().unwrap();
            lock(2).lock(&mut ep).unwrap().unlock().unwrap();
        });
        until_polled(&transport, 10, || h.is_finished());
        for _ in 0..8 {
            FAKE_MS.fetch_add(lease.as_millis() as u64 / 2, Ordering::SeqCst);
            until_polled(&transport, 3, || h.is_finished()); // the waiter sees the new time
            g.renew().expect("the waiter took over a renewed lock");
        }
        g.unlock().unwrap();
        h.join().unwrap();
    });
}

#[test]
fn barrier_lets_nobody_through_early() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let (counter, epoch, slots) = (at(64), at(72), at(4096));
    let (n, rounds) = (4u64, 50u64);
    std::thread::scope(|s| {
        for t in 0..n {
            let transport = &transport;
            s.spawn(move || {
                let mut ep = transport.endpoint().unwrap();
                let mut barrier = RemoteBarrier::new(counter, epoch, n).unwrap();
                for r in 1..=rounds {
                    ep.write_u64(slots.checked_add(8 * t).unwrap(), r).unwrap();
                    barrier.wait(&mut ep).unwrap();
                    for other in 0..n {
                        let seen = ep.read_u64(slots.checked_add(8 * other).unwrap()).unwrap();
                        assert!(seen >= r, "participant {t} passed round {r} before {other} arrived ({seen})");
                    }
                    // A second barrier so nobody overwrites its slot before all have checked.
                    barrier.wait(&mut ep).unwrap();
                }
                assert_eq!(barrier.round(), 2 * rounds);
            });
        }
    });
}

#[test]
fn bad_inputs_are_errors() {
    let transport = LoopbackTransport::new(&[1 << 20, 1 << 20]);
    assert!(matches!(RemoteLock::new(at(4096), 0, LEASE), Err(LockError::BadHolder)));
    assert!(matches!(RemoteLock::new(at(4097), 1, LEASE), Err(LockError::Misaligned { .. })));
    assert!(matches!(RemoteBarrier::new(at(64), at(72), 0), Err(LockError::NoParticipants)));
    let table = LockTable::new(vec![at(4096), GlobalAddr::new(NodeId(1), 4096).unwrap()], 10).unwrap();
    assert!(matches!(table.lock(10, 1, LEASE), Err(LockError::IdOutOfRange { id: 10, count: 10 })));
    assert_eq!(table.word(3).unwrap(), GlobalAddr::new(NodeId(1), 4096 + 8).unwrap(), "odd ids on node 1");
    // The same holder taking a lock twice would deadlock: refused.
    let mut ep = transport.endpoint().unwrap();
    let mut ep2 = transport.endpoint().unwrap();
    let lock = table.lock(4, 7, LEASE).unwrap();
    let g = lock.lock(&mut ep).unwrap();
    assert!(matches!(lock.lock(&mut ep2), Err(LockError::AlreadyHeld { holder: 7, .. })));
    g.unlock().unwrap();
    // Too many participants at a barrier of one.
    let mut one = RemoteBarrier::new(at(64), at(72), 1).unwrap();
    one.wait(&mut ep).unwrap();
    let mut stray = RemoteBarrier::new(at(64), at(72), 1).unwrap();
    assert!(matches!(stray.wait(&mut ep), Err(LockError::BarrierOverrun { .. })));
}

/// A barrier that cannot complete fails after its timeout (it can never complete in these
/// cases, so the test does not depend on how fast the machine is).
#[test]
fn a_barrier_that_cannot_complete_times_out_naming_who_arrived() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let mut ep = transport.endpoint().unwrap();
    let short = Some(Duration::from_millis(50));
    // One participant of two: times out with 1 of 2; waiting again does not count it twice.
    let (mut a, mut b) =
        (RemoteBarrier::new(at(64), at(72), 2).unwrap(), RemoteBarrier::new(at(64), at(72), 2).unwrap());
    a.set_timeout(short);
    for _ in 0..2 {
        match a.wait(&mut ep) {
            Err(LockError::BarrierTimeout { arrived: 1, participants: 2, round: 0, .. }) => {}
            other => panic!("a barrier of 2 with one participant: {other:?}"),
        }
    }
    b.wait(&mut ep).unwrap(); // the second arrives: the round completes...
    a.wait(&mut ep).unwrap(); // ...and the first one's wait goes through
    assert_eq!((a.round(), b.round()), (1, 1));
    // One call too many: round 1 has only this participant.
    let e = a.wait(&mut ep).unwrap_err();
    assert!(e.to_string().contains("round 1 still has 1 of 2"), "{e}");
}

#[test]
fn cohort_acquire_and_release_across_calls_with_hooks_and_misuse_errors() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let (word, counter) = (at(4096), at(8192));
    // The state counts remote holds: `taken` runs once per remote acquire, `releasing` once
    // per remote release, never on a local handover.
    let cohort = CohortLock::with_state(RemoteLock::new(word, 3, LEASE).unwrap(), 8, (0u32, 0u32));
    let mut ep = transport.endpoint().unwrap();
    let fresh = cohort.acquire_with(&mut ep, |_, s| -> Result<(), LockError> {
        s.0 += 1;
        Ok(())
    });
    assert!(fresh.unwrap(), "the first acquire takes the remote lock");
    assert!(cohort.held_by_me());
    assert!(matches!(cohort.acquire(&mut ep), Err(LockError::AlreadyHeld { .. })), "no self-deadlock");
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut other = transport.endpoint().unwrap();
            assert!(matches!(cohort.release(&mut other), Err(LockError::NotHolder { .. })));
            assert!(matches!(cohort.with_state_mut(|_| ()), Err(LockError::NotHolder { .. })));
        });
    });
    ep.post_write_u64(counter, 1).unwrap();
    let handed = cohort.release_with(&mut ep, |_, s| -> Result<(), LockError> {
        s.1 += 1;
        Ok(())
    });
    assert!(!handed.unwrap(), "nobody waits: released remotely");
    assert_eq!(ep.read_u64(word).unwrap(), 0);
    assert!(matches!(cohort.release(&mut ep), Err(LockError::NotHolder { .. })), "released twice");
    // Taken with a guard: only the guard releases it (a release through another endpoint
    // would skip the guard endpoint's posted writes).
    let mut other = transport.endpoint().unwrap();
    let guard = cohort.lock(&mut other).unwrap();
    assert!(matches!(cohort.release(&mut ep), Err(LockError::HeldByGuard { .. })));
    assert!(!guard.unlock().unwrap());
    cohort.acquire(&mut ep).unwrap();
    assert_eq!(cohort.with_state_mut(|s| *s).unwrap(), (1, 1));
    // A failing release hook keeps the remote lock for the process; the next acquire finds it
    // held (no second `taken`), and a later release runs the hook again.
    let failed = cohort.release_with(&mut ep, |_, _| -> Result<(), LockError> { Err(LockError::NoParticipants) });
    assert!(matches!(failed, Err(LockError::NoParticipants)));
    assert_ne!(ep.read_u64(word).unwrap(), 0, "still held remotely");
    assert!(!cohort.acquire(&mut ep).unwrap(), "found held: not a fresh remote acquire");
    cohort.release(&mut ep).unwrap();
    assert_eq!(ep.read_u64(word).unwrap(), 0);
    // A failing acquire hook releases the remote lock again.
    let failed = cohort.acquire_with(&mut ep, |_, _| -> Result<(), LockError> { Err(LockError::NoParticipants) });
    assert!(matches!(failed, Err(LockError::NoParticipants)));
    assert_eq!(ep.read_u64(word).unwrap(), 0, "released after the failed hook");
    assert!(!cohort.held_by_me());
    assert_eq!(ep.read_u64(counter).unwrap(), 1);
}

#[test]
fn a_release_that_fails_on_the_network_does_not_lock_the_process_out() {
    // One process, so nobody would ever take the lock over: after a release that failed on a
    // broken connection, the process must still be able to take its own lock again.
    let transport = LoopbackTransport::new(&[1 << 20]);
    let word = at(4096);
    let cohort = CohortLock::new(RemoteLock::new(word, 7, LEASE).unwrap(), 8);
    let mut ep = transport.endpoint().unwrap();
    cohort.acquire(&mut ep).unwrap();
    transport.set_node_down(NodeId(0), true);
    assert!(matches!(cohort.release(&mut ep), Err(LockError::Transport(_))), "the release could not reach the node");
    assert!(!cohort.held_by_me(), "the thread let go of it");
    transport.set_node_down(NodeId(0), false);
    let mut fresh = transport.endpoint().unwrap();
    assert_ne!(fresh.read_u64(word).unwrap(), 0, "the word still holds this process's value");
    cohort.acquire(&mut fresh).expect("the process still holds it: no AlreadyHeld against itself");
    cohort.release(&mut fresh).unwrap();
    assert_eq!(fresh.read_u64(word).unwrap(), 0, "released for real this time");
    cohort.acquire(&mut fresh).unwrap();
    cohort.release(&mut fresh).unwrap();
}

#[test]
fn cohort_with_its_own_endpoint_keeps_posted_writes_ordered_across_handovers() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let (word, counter) = (at(4096), at(8192));
    let cohorts: Vec<_> = (1..=2)
        .map(|p| CohortLock::with_endpoint(RemoteLock::new(word, p, LEASE).unwrap(), 8, transport.endpoint().unwrap()))
        .collect();
    let (threads, rounds) = (4, 300u64);
    std::thread::scope(|s| {
        for cohort in &cohorts {
            for _ in 0..threads {
                s.spawn(move || {
                    for _ in 0..rounds {
                        let mut g = cohort.lock_own().unwrap();
                        let n = g.endpoint().read_u64(counter).unwrap();
                        g.endpoint().post_write_u64(counter, n + 1).unwrap(); // not waited for
                        g.unlock().unwrap();
                    }
                });
            }
        }
    });
    let mut ep = transport.endpoint().unwrap();
    assert_eq!(ep.read_u64(counter).unwrap(), 2 * threads * rounds);
    assert_eq!(ep.read_u64(word).unwrap(), 0, "released at the end");
    // Misuse while a guard is out is an error, not a deadlock.
    let g = cohorts[0].lock_own().unwrap();
    assert!(matches!(cohorts[0].acquire(&mut ep), Err(LockError::OwnEndpoint { .. })), "one form per lock");
    assert!(matches!(cohorts[0].release(&mut ep), Err(LockError::OwnEndpoint { .. })));
    assert!(matches!(cohorts[0].lock(&mut ep), Err(LockError::OwnEndpoint { .. })));
    assert!(matches!(cohorts[0].with_state_mut(|_| ()), Err(LockError::AlreadyHeld { .. })));
    assert!(!g.unlock().unwrap());
    assert_eq!(ep.read_u64(word).unwrap(), 0);
}
