//! Litmus tests of the DSM's scope consistency on the loopback transport: each rank is a thread
//! with its own `Dsm` (its own cache), as separate processes would have.

use std::sync::Arc;

use rdmem_coherence::dsm::{Dsm, DsmError, DsmOptions, SharedAddr};
use rdmem_core::LoopbackTransport;

type Rank = Dsm<LoopbackTransport>;

/// Runs `body(dsm)` on `size` ranks over two memory nodes; each rank leaves at the end.
fn ranks(size: u32, body: impl Fn(&Rank) + Sync) -> Arc<LoopbackTransport> {
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
    std::thread::scope(|s| {
        for rank in 0..size {
            let (transport, body) = (transport.clone(), &body);
            s.spawn(move || {
                let dsm = Dsm::join_with(transport, DsmOptions::new(rank, size)).unwrap();
                body(&dsm);
                dsm.leave().unwrap();
            });
        }
    });
    transport
}

#[test]
fn a_write_under_a_lock_is_seen_by_the_next_holder() {
    ranks(2, |dsm| {
        let x = dsm.alloc(4096 * 3).unwrap();
        let flag = x.byte_add(4096 * 2);
        // Both cache the page first, so rank 1 would read a stale copy without the notices.
        assert_eq!(dsm.get::<u64>(x).unwrap(), 0);
        dsm.barrier().unwrap();
        if dsm.rank() == 0 {
            dsm.lock(1).unwrap();
            dsm.set(x, &42u64).unwrap();
            dsm.set(flag, &1u64).unwrap();
            dsm.unlock(1).unwrap();
        } else {
            // Take the lock until rank 0's section has happened, then the write must show. (A
            // DSM that never invalidates would loop forever here: give up after many tries.)
            for _ in 0..1_000_000 {
                dsm.lock(1).unwrap();
                let (f, v) = (dsm.get::<u64>(flag).unwrap(), dsm.get::<u64>(x).unwrap());
                dsm.unlock(1).unwrap();
                if f == 1 {
                    assert_eq!(v, 42, "the flag is set but the value is stale");
                    return dsm.barrier().unwrap();
                }
                std::thread::yield_now();
            }
            panic!("rank 0's write under lock 1 never became visible");
        }
        dsm.barrier().unwrap();
    });
}

#[test]
fn disjoint_bytes_of_one_page_written_under_different_locks_both_survive_a_barrier() {
    ranks(2, |dsm| {
        let page = dsm.alloc(4096).unwrap();
        let mine = page.byte_add(8 * dsm.rank() as u64);
        let other = page.byte_add(8 * (1 - dsm.rank() as u64));
        dsm.lock(dsm.rank() as u64).unwrap();
        dsm.set(mine, &(100 + dsm.rank() as u64)).unwrap();
        dsm.unlock(dsm.rank() as u64).unwrap();
        dsm.barrier().unwrap();
        assert_eq!(dsm.get::<u64>(mine).unwrap(), 100 + dsm.rank() as u64);
        assert_eq!(dsm.get::<u64>(other).unwrap(), 101 - dsm.rank() as u64, "the other rank's bytes were lost");
    });
}

#[test]
fn after_a_barrier_every_rank_sees_every_write_made_before_it() {
    let size = 3u32;
    ranks(size, |dsm| {
        let n = 4096 * 8 / 8; // 8 pages of u64, striped over both nodes
        let a = dsm.alloc(8 * n).unwrap();
        for round in 1..=3u64 {
            // Each rank writes its share of the array, without locks.
            for i in (dsm.rank() as u64..n).step_by(size as usize) {
                dsm.set(a.byte_add(8 * i), &(round * 1000 + i)).unwrap();
            }
            dsm.barrier().unwrap();
            let mut all = vec![0u64; n as usize];
            dsm.read_slice(a, &mut all).unwrap();
            for (i, &v) in all.iter().enumerate() {
                assert_eq!(v, round * 1000 + i as u64, "rank {} round {round}: element {i}", dsm.rank());
            }
            dsm.barrier().unwrap();
        }
    });
}

#[test]
fn no_stale_read_after_acquiring_a_lock_whose_previous_holder_wrote_the_page() {
    let (size, rounds) = (3u32, 30u64);
    ranks(size, |dsm| {
        let counter = dsm.alloc(4096).unwrap();
        for _ in 0..rounds {
            dsm.lock(7).unwrap();
            let n: u64 = dsm.get(counter).unwrap();
            dsm.set(counter, &(n + 1)).unwrap();
            dsm.unlock(7).unwrap();
        }
        dsm.barrier().unwrap();
        assert_eq!(dsm.get::<u64>(counter).unwrap(), size as u64 * rounds, "lost increments: a stale read");
    });
}

#[test]
fn threads_of_one_process_share_the_cache_and_its_locks() {
    ranks(2, |dsm| {
        let counter = dsm.alloc(64).unwrap();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..20 {
                        dsm.lock(2).unwrap();
                        let n: u64 = dsm.get(counter).unwrap();
                        dsm.set(counter, &(n + 1)).unwrap();
                        dsm.unlock(2).unwrap();
                    }
                });
            }
        });
        dsm.barrier().unwrap();
        assert_eq!(dsm.get::<u64>(counter).unwrap(), 2 * 3 * 20);
    });
}

#[test]
fn bad_inputs_are_errors() {
    ranks(1, |dsm| {
        let a = dsm.alloc(100).unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(dsm.read(a.byte_add(96), &mut buf), Err(DsmError::BadAddress { .. })));
        assert!(matches!(dsm.read(SharedAddr(5 << 36), &mut buf), Err(DsmError::BadAddress { .. })));
        assert!(matches!(dsm.lock(10_000), Err(DsmError::LockId { .. })));
        assert!(matches!(dsm.unlock(3), Err(DsmError::NotHolder { id: 3 })));
        match dsm.alloc(0) {
            Err(e @ DsmError::BadSize { bytes: 0, .. }) => {
                assert!(e.to_string().contains("cannot allocate 0 bytes"), "{e}")
            }
            other => panic!("alloc(0): {other:?}"),
        }
    });
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
    assert!(matches!(Dsm::join_with(transport, DsmOptions::new(2, 2)), Err(DsmError::BadOptions(_))));
}

#[test]
fn ranks_that_disagree_on_an_allocation_size_get_an_error() {
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
    std::thread::scope(|s| {
        let results: Vec<_> = (0..2u32)
            .map(|rank| {
                let transport = transport.clone();
                s.spawn(move || {
                    let dsm = Dsm::join_with(transport, DsmOptions::new(rank, 2)).unwrap();
                    let r = dsm.alloc(4096 * (rank as u64 + 1));
                    dsm.barrier().unwrap();
                    r.map(drop)
                })
            })
            .collect();
        let errors = results.into_iter().map(|h| h.join().unwrap()).filter(|r| r.is_err()).count();
        assert_eq!(errors, 1, "the second rank to arrive is told the sizes differ");
    });
}

#[test]
fn the_last_rank_to_leave_frees_everything_for_the_next_job() {
    let idle = usage(&Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20])));
    let transport = ranks(2, |dsm| {
        dsm.alloc(1 << 20).unwrap();
        dsm.alloc(100).unwrap();
    });
    // Every chunk is back: each rank freed its own blocks, the creator the control block.
    assert_eq!(usage(&transport), idle, "a clean leave leaks no chunk");
    // A second job on the same memory nodes joins cleanly.
    std::thread::scope(|s| {
        for rank in 0..2 {
            let transport = transport.clone();
            s.spawn(move || {
                let dsm = Dsm::join_with(transport, DsmOptions::new(rank, 2)).unwrap();
                let a = dsm.alloc(64).unwrap();
                assert_eq!(dsm.get::<u64>(a).unwrap(), 0, "fresh allocations are zeroed");
                dsm.leave().unwrap();
            });
        }
    });
}

/// Several threads per rank under several locks, as a user's program would use them: counters
/// on their own pages and on one page shared by two locks, and a task queue whose tasks must
/// each be taken once. Scope consistency must attribute each write to the lock its thread
/// holds; noticing it on another thread's lock loses updates.
fn threads_under_several_locks(dsm: &Rank, threads: u64, rounds: u64) {
    const LOCKS: u64 = 2;
    // Every third rank's threads use both locks (a misattributed write shows there); the
    // others' threads all use one lock, so they never read the other lock's notices (which
    // would hide the misattribution by invalidating the page anyway).
    let lock_of = |rank: u64, thread: u64| if rank % 3 == 0 { thread % LOCKS } else { rank % LOCKS };
    const TASKS: u64 = 96;
    // Page L: lock L's own counter. Page LOCKS: both locks' counters, 8 bytes apart. Then the
    // task queue (under lock LOCKS): the next task, and a count per task.
    let own = dsm.alloc(4096 * (LOCKS + 1)).unwrap();
    let shared = own.byte_add(4096 * LOCKS);
    let queue = dsm.alloc(8 * (1 + TASKS)).unwrap();
    // Every rank caches every page first, so a missing invalidation shows as a stale read.
    for l in 0..LOCKS {
        let _: u64 = dsm.get(own.byte_add(4096 * l)).unwrap();
    }
    let _: u64 = dsm.get(shared).unwrap();
    let _: u64 = dsm.get(queue).unwrap();
    dsm.barrier().unwrap();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let l = lock_of(dsm.rank() as u64, t);
                for _ in 0..rounds {
                    dsm.lock(l).unwrap();
                    let n: u64 = dsm.get(own.byte_add(4096 * l)).unwrap();
                    dsm.set(own.byte_add(4096 * l), &(n + 1)).unwrap();
                    // Give the other threads of the rank a chance to unlock their lock while
                    // this one holds its own, with its write made.
                    std::thread::yield_now();
                    let m: u64 = dsm.get(shared.byte_add(8 * l)).unwrap();
                    dsm.set(shared.byte_add(8 * l), &(m + 1)).unwrap();
                    dsm.unlock(l).unwrap();
                }
                loop {
                    dsm.lock(LOCKS).unwrap();
                    let next: u64 = dsm.get(queue).unwrap();
                    if next == TASKS {
                        dsm.unlock(LOCKS).unwrap();
                        break;
                    }
                    dsm.set(queue, &(next + 1)).unwrap();
                    let slot = queue.byte_add(8 * (1 + next));
                    let taken: u64 = dsm.get(slot).unwrap();
                    dsm.set(slot, &(taken + 1)).unwrap();
                    dsm.unlock(LOCKS).unwrap();
                }
            });
        }
    });
    dsm.barrier().unwrap();
    let size = dsm.size() as u64;
    let sections =
        |l: u64| (0..size).map(|r| (0..threads).filter(|&t| lock_of(r, t) == l).count() as u64).sum::<u64>() * rounds;
    for l in 0..LOCKS {
        let (n, m): (u64, u64) = (dsm.get(own.byte_add(4096 * l)).unwrap(), dsm.get(shared.byte_add(8 * l)).unwrap());
        assert_eq!(n, sections(l), "rank {}: lock {l}'s counter lost updates", dsm.rank());
        assert_eq!(m, sections(l), "rank {}: lock {l}'s counter on the shared page lost updates", dsm.rank());
    }
    let mut taken = vec![0u64; TASKS as usize];
    dsm.read_slice(queue.byte_add(8), &mut taken).unwrap();
    assert_eq!(dsm.get::<u64>(queue).unwrap(), TASKS);
    for (task, &n) in taken.iter().enumerate() {
        assert_eq!(n, 1, "rank {}: task {task} was taken {n} times", dsm.rank());
    }
}

#[test]
fn several_threads_per_rank_under_several_locks_lose_no_update() {
    // 200 jobs in a row, 3 ranks of 2 to 4 threads: the bug this catches showed about 1 run in 20.
    for repeat in 0..200 {
        let threads = 2 + repeat % 3;
        ranks(3, |dsm| threads_under_several_locks(dsm, threads, 25));
    }
}

#[test]
fn a_thread_that_takes_a_lock_it_holds_gets_an_error_not_a_hang() {
    ranks(2, |dsm| {
        dsm.lock(4).unwrap();
        assert!(matches!(dsm.lock(4), Err(DsmError::AlreadyHeld { id: 4 })));
        // Another lock is fine, and so is the same lock from another thread once released.
        dsm.lock(5).unwrap();
        dsm.unlock(5).unwrap();
        dsm.unlock(4).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                dsm.lock(4).unwrap();
                dsm.unlock(4).unwrap();
            });
        });
        assert!(matches!(dsm.unlock(4), Err(DsmError::NotHolder { id: 4 })));
        dsm.barrier().unwrap();
    });
}

/// A write made outside any lock is published by the next barrier, not by an unlock of another
/// thread's lock: the scope rule in the module docs.
#[test]
fn a_write_outside_any_lock_is_noticed_at_the_barrier_not_by_another_threads_unlock() {
    ranks(2, |dsm| {
        let x = dsm.alloc(4096 * 2).unwrap();
        let y = x.byte_add(4096);
        let _: u64 = dsm.get(x).unwrap();
        let _: u64 = dsm.get(y).unwrap();
        dsm.barrier().unwrap();
        if dsm.rank() == 0 {
            dsm.set(x, &7u64).unwrap(); // no lock held
            std::thread::scope(|s| {
                s.spawn(|| {
                    dsm.lock(1).unwrap();
                    dsm.set(y, &8u64).unwrap();
                    dsm.unlock(1).unwrap();
                });
            });
        }
        dsm.barrier().unwrap();
        assert_eq!(dsm.get::<u64>(x).unwrap(), 7, "rank {}: the barrier publishes every write", dsm.rank());
        assert_eq!(dsm.get::<u64>(y).unwrap(), 8, "rank {}", dsm.rank());
    });
}

#[test]
fn a_rank_that_calls_one_barrier_too_many_gets_a_timeout_not_a_hang() {
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
    std::thread::scope(|s| {
        for rank in 0..2u32 {
            let transport = transport.clone();
            s.spawn(move || {
                let mut options = DsmOptions::new(rank, 2);
                options.barrier_timeout = std::time::Duration::from_millis(200);
                let dsm = Dsm::join_with(transport, options).unwrap();
                dsm.barrier().unwrap();
                if rank == 0 {
                    // Rank 1 never comes to this one: it can never complete.
                    let e = dsm.barrier().unwrap_err();
                    assert!(e.to_string().contains("1 of 2"), "{e}");
                }
            });
        }
    });
}

/// Usage of every node's pool, read by a client of its own.
fn usage(transport: &Arc<LoopbackTransport>) -> Vec<u64> {
    let allocator = rdmem_allocator::Allocator::new(transport.clone(), Default::default()).unwrap();
    allocator.thread().unwrap().usage().unwrap().iter().map(|u| u.chunks_used).collect()
}

/// A job whose ranks all died leaves its control block behind; the next job on the same memory
/// nodes tells it is dead (its heartbeat stays put), takes the nodes over and frees the dead
/// job's memory. Whatever the next job's size or name.
#[test]
fn a_job_whose_ranks_died_is_taken_over_by_the_next_one() {
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
    let idle = usage(&transport);
    for (next_size, next_job) in [(2u32, "default"), (3, "default"), (2, "other")] {
        // A job of 2 that dies: a short lease, so its death shows quickly.
        std::thread::scope(|s| {
            for rank in 0..2u32 {
                let transport = transport.clone();
                s.spawn(move || {
                    let mut options = DsmOptions::new(rank, 2);
                    options.lease = std::time::Duration::from_millis(40);
                    let dsm = Dsm::join_with(transport, options).unwrap();
                    let a = dsm.alloc(1 << 20).unwrap();
                    dsm.set(a, &7u64).unwrap();
                    dsm.barrier().unwrap();
                    dsm.abandon(); // killed: no leave, nothing freed
                });
            }
        });
        assert!(usage(&transport).iter().zip(&idle).any(|(u, i)| u > i), "the dead job holds memory");
        // The next job (default lease) joins, starts from fresh memory, and leaves cleanly.
        std::thread::scope(|s| {
            for rank in 0..next_size {
                let transport = transport.clone();
                s.spawn(move || {
                    let mut options = DsmOptions::new(rank, next_size);
                    options.job = next_job.into();
                    let dsm = Dsm::join_with(transport, options).expect("the next job joins over the dead one");
                    let a = dsm.alloc(1 << 20).unwrap();
                    assert_eq!(dsm.get::<u64>(a).unwrap(), 0, "fresh memory, not the dead job's");
                    dsm.leave().unwrap();
                });
            }
        });
        assert_eq!(usage(&transport), idle, "the dead job's memory was reclaimed ({next_size} ranks, {next_job:?})");
    }
}

/// A job that is alive keeps the memory nodes: another job trying to join gets an error naming
/// it, and does not disturb it.
#[test]
fn a_live_job_is_not_taken_over() {
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
    let (joined_tx, joined_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let done_rx = std::sync::Mutex::new(done_rx);
    std::thread::scope(|s| {
        for rank in 0..2u32 {
            let (transport, joined_tx, done_rx) = (transport.clone(), joined_tx.clone(), &done_rx);
            s.spawn(move || {
                let dsm = Dsm::join_with(transport, DsmOptions::new(rank, 2)).unwrap();
                let a = dsm.alloc(4096).unwrap();
                dsm.set(a.byte_add(8 * rank as u64), &(rank as u64 + 1)).unwrap();
                dsm.barrier().unwrap();
                joined_tx.send(()).unwrap();
                let _ = done_rx.lock().unwrap().recv();
                dsm.barrier().unwrap();
                for r in 0..2u64 {
                    assert_eq!(dsm.get::<u64>(a.byte_add(8 * r)).unwrap(), r + 1, "its memory is intact");
                }
                dsm.leave().unwrap();
            });
        }
        joined_rx.recv().unwrap();
        joined_rx.recv().unwrap();
        for (size, job) in [(2u32, "default"), (3, "default"), (1, "other")] {
            let mut options = DsmOptions::new(0, size);
            options.job = job.into();
            match Dsm::join_with(transport.clone(), options) {
                Err(DsmError::JobConflict(e)) => assert!(e.contains("heartbeat is live"), "{e}"),
                Ok(_) => panic!("joined a live job's memory nodes ({size}, {job})"),
                Err(e) => panic!("{e}"),
            }
        }
        drop(done_tx);
    });
}

#[test]
fn typed_errors_for_bad_options_and_guards_that_unlock() {
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
    let mut short = DsmOptions::new(0, 1);
    short.lease = std::time::Duration::from_millis(1);
    assert!(matches!(Dsm::join_with(transport.clone(), short), Err(DsmError::BadOptions(e)) if e.contains("lease")));
    let dsm = Dsm::join_with(transport, DsmOptions::new(0, 1)).unwrap();
    let at = dsm.alloc(64).unwrap();
    let guard = dsm.guard(3).unwrap();
    assert_eq!(guard.id(), 3);
    assert!(matches!(dsm.lock(3), Err(DsmError::AlreadyHeld { id: 3 })));
    dsm.set(at, &5u64).unwrap();
    guard.unlock().unwrap();
    assert!(matches!(dsm.unlock(3), Err(DsmError::NotHolder { id: 3 })), "released once");
    {
        let _dropped = dsm.guard(3).unwrap(); // dropped without unlock: released, and logged
    }
    dsm.lock(3).expect("the dropped guard released lock 3");
    dsm.unlock(3).unwrap();
    // Another thread cannot release this thread's lock.
    dsm.lock(4).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| assert!(matches!(dsm.unlock(4), Err(DsmError::NotHolder { id: 4 }))));
    });
    dsm.unlock(4).unwrap();
    assert_eq!(dsm.get::<u64>(at).unwrap(), 5);
    dsm.leave().unwrap();
}
