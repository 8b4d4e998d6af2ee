//! Model checking of the cohort lock's local handover with loom (every interleaving of its
//! local mutex, waiter count and handover decision). The remote word is on the loopback
//! transport, outside loom's view; only one process takes part, so its CAS never contends.
//!
//! `cargo test -p rdmem-coherence --features loom --test loom_cohort --release`
#![cfg(feature = "loom")]

use std::time::Duration;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use rdmem_coherence::{CohortLock, RemoteLock};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};

#[test]
fn local_handover_keeps_mutual_exclusion_and_releases_at_the_end() {
    loom::model(|| {
        let transport = LoopbackTransport::new(&[4096]);
        let word = GlobalAddr::new(NodeId(0), 64).unwrap();
        let remote = RemoteLock::new(word, 1, Duration::from_secs(60)).unwrap();
        let cohort = Arc::new(CohortLock::new(remote, 2));
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (cohort, inside) = (Arc::clone(&cohort), Arc::clone(&inside));
                // Each thread its own endpoint, as in real use.
                let mut ep = transport.endpoint().unwrap();
                loom::thread::spawn(move || {
                    let guard = cohort.lock(&mut ep).unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two threads in the section");
                    inside.fetch_sub(1, Ordering::SeqCst);
                    guard.unlock().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Whatever the interleaving (and with a bound above the thread count, so a handover to
        // nobody would show), the last unlock released the remote word.
        assert_eq!(transport.endpoint().unwrap().read_u64(word).unwrap(), 0);
    });
}

#[test]
fn handover_with_the_locks_own_endpoint_keeps_mutual_exclusion() {
    loom::model(|| {
        let transport = LoopbackTransport::new(&[4096]);
        let word = GlobalAddr::new(NodeId(0), 64).unwrap();
        let remote = RemoteLock::new(word, 1, Duration::from_secs(60)).unwrap();
        let cohort = Arc::new(CohortLock::with_endpoint(remote, 2, transport.endpoint().unwrap()));
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (cohort, inside) = (Arc::clone(&cohort), Arc::clone(&inside));
                loom::thread::spawn(move || {
                    let guard = cohort.lock_own().unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two threads in the section");
                    inside.fetch_sub(1, Ordering::SeqCst);
                    guard.unlock().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(transport.endpoint().unwrap().read_u64(word).unwrap(), 0);
    });
}
