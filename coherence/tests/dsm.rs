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
        assert!(matches!(dsm.alloc(0), Err(DsmError::BadAddress { .. })));
    });
    let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
    assert!(matches!(Dsm::join_with(transport, DsmOptions::new(2, 2)), Err(DsmError::Join(_))));
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
    let transport = ranks(2, |dsm| {
        dsm.alloc(1 << 20).unwrap();
    });
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
