//! The remote lock from async code ([`RemoteLock::lock_async`]) on the loopback transport:
//! mutual exclusion among many tasks of several threads (a non-atomic read-modify-write in the
//! section loses nothing), other tasks run while one waits, a dropped guard releases, and the
//! sync and async faces exclude each other.

use std::time::Duration;

use rdmem_coherence::{LockError, RemoteLock};
use rdmem_core::aio::{AsyncEndpoint, LocalFuture, block_on, join_all};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};

fn addr(offset: u64) -> GlobalAddr {
    GlobalAddr::new(NodeId(0), offset).unwrap()
}

#[test]
fn tasks_of_several_threads_exclude_each_other_under_several_locks() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    // Two locks, each guarding its own counter; 3 threads x 8 tasks, each task 25 sections.
    for round in 0..5u64 {
        std::thread::scope(|s| {
            for t in 0..3u32 {
                let transport = &transport;
                s.spawn(move || {
                    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
                    let ep = &ep;
                    let tasks: Vec<LocalFuture<'_, ()>> = (0..8u32)
                        .map(|k| {
                            Box::pin(async move {
                                let which = (k % 2) as u64;
                                // A holder id per task: unique among everyone using the lock.
                                let holder = 1 + t * 100 + k;
                                let lock = RemoteLock::new(addr(8 * which), holder, Duration::from_secs(30)).unwrap();
                                let counter = addr(64 + 8 * which);
                                for _ in 0..25 {
                                    let guard = lock.lock_async(ep).await.unwrap();
                                    let v = ep.read_u64(counter).await.unwrap();
                                    rdmem_core::aio::yield_now().await; // let the others try
                                    ep.write_u64(counter, v + 1).await.unwrap();
                                    guard.unlock().await.unwrap();
                                }
                            }) as _
                        })
                        .collect();
                    block_on(join_all(tasks));
                });
            }
        });
        let mut ep = transport.endpoint().unwrap();
        for which in 0..2 {
            assert_eq!(ep.read_u64(addr(64 + 8 * which)).unwrap(), (round + 1) * 3 * 4 * 25, "lock {which}");
            assert_eq!(ep.read_u64(addr(8 * which)).unwrap(), 0, "lock {which} left held");
        }
    }
}

#[test]
fn a_waiting_task_lets_others_run_and_a_dropped_guard_releases() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    let a = RemoteLock::new(addr(0), 1, Duration::from_secs(30)).unwrap();
    let b = RemoteLock::new(addr(0), 2, Duration::from_secs(30)).unwrap();
    block_on(async {
        let held = a.lock_async(&ep).await.unwrap();
        // B waits; meanwhile this task keeps running on the same thread, then lets A go by
        // dropping its guard (which releases with a blocking CAS and a warning).
        let waiter = async { b.lock_async(&ep).await.unwrap().unlock().await.unwrap() };
        let other = async {
            for _ in 0..10 {
                rdmem_core::aio::sleep(Duration::from_millis(1)).await;
            }
            drop(held);
        };
        let _ = join_all::<()>(vec![Box::pin(waiter), Box::pin(other)]).await;
        assert_eq!(ep.read_u64(addr(0)).await.unwrap(), 0, "released");
        // Holding it twice as the same holder is refused, not a deadlock.
        let again = a.lock_async(&ep).await.unwrap();
        assert!(matches!(a.lock_async(&ep).await, Err(LockError::AlreadyHeld { .. })));
        again.unlock().await.unwrap();
    });
}

#[test]
fn the_sync_and_async_faces_exclude_each_other() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let counter = addr(64);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut ep = transport.endpoint().unwrap();
            let lock = RemoteLock::new(addr(0), 1, Duration::from_secs(30)).unwrap();
            for _ in 0..300 {
                let mut g = lock.lock(&mut ep).unwrap();
                let v = g.endpoint().read_u64(counter).unwrap();
                g.endpoint().write_u64(counter, v + 1).unwrap();
                g.unlock().unwrap();
            }
        });
        s.spawn(|| {
            let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
            let lock = RemoteLock::new(addr(0), 2, Duration::from_secs(30)).unwrap();
            block_on(async {
                for _ in 0..300 {
                    let g = lock.lock_async(&ep).await.unwrap();
                    let v = ep.read_u64(counter).await.unwrap();
                    ep.write_u64(counter, v + 1).await.unwrap();
                    g.unlock().await.unwrap();
                }
            });
        });
    });
    assert_eq!(transport.endpoint().unwrap().read_u64(counter).unwrap(), 600);
}

#[test]
fn a_guard_dropped_while_another_operation_is_in_flight_releases_without_blocking() {
    // Completions that take a while, so the other operation is really in flight.
    let options = rdmem_core::LoopbackOptions { async_reaps: 200, ..Default::default() };
    let transport = LoopbackTransport::with_options(&[1 << 20], options);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    let lock = RemoteLock::new(addr(0), 1, Duration::from_secs(30)).unwrap();
    block_on(async {
        let guard = lock.lock_async(&ep).await.unwrap();
        let mut other = Box::pin(ep.faa(addr(64), 1));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(other.as_mut().poll(&mut cx).is_pending(), "queued");
        drop(guard); // posts the release and returns at once
        assert_eq!(other.await.unwrap(), 0);
        // The release lands: the same holder can take the lock again.
        let again = lock.lock_async(&ep).await.unwrap();
        again.unlock().await.unwrap();
    });
    assert_eq!(transport.endpoint().unwrap().read_u64(addr(0)).unwrap(), 0);
}
