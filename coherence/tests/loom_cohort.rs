//! Model checking of the cohort lock's local handover with loom (every interleaving of its
//! local flag, waiter count, owner and handover decision), in both forms: each thread through
//! its own endpoint, and through the lock's own endpoint. The remote word is on the loopback
//! transport, outside loom's view; only one process takes part, so its CAS never contends.
//!
//! `cargo test -p rdmem-coherence --features loom --test loom_cohort --release`
#![cfg(feature = "loom")]

use std::time::Duration;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use rdmem_coherence::{CohortLock, RemoteLock};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, NodeId, Transport};

/// Two threads each take `lock` once through `section`, which must run `inside` exclusively.
/// Whatever the interleaving (and with a bound above the thread count, so a handover to nobody
/// would show), the last release leaves the remote word free.
fn two_threads<L: Send + Sync + 'static>(
    make: fn(RemoteLock, &LoopbackTransport) -> L,
    section: fn(&L, &LoopbackTransport, &dyn Fn()),
) {
    loom::model(move || {
        let transport = Arc::new(LoopbackTransport::new(&[4096]));
        let word = GlobalAddr::new(NodeId(0), 64).unwrap();
        let remote = RemoteLock::new(word, 1, Duration::from_secs(60)).unwrap();
        let lock = Arc::new(make(remote, &transport));
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (lock, inside, transport) = (Arc::clone(&lock), Arc::clone(&inside), Arc::clone(&transport));
                loom::thread::spawn(move || {
                    section(&lock, &transport, &|| {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two threads in the section");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(transport.endpoint().unwrap().read_u64(word).unwrap(), 0);
    });
}

#[test]
fn local_handover_keeps_mutual_exclusion_and_releases_at_the_end() {
    two_threads(
        |remote, _| CohortLock::new(remote, 2),
        |lock, transport, body| {
            // Each thread its own endpoint, as in real use.
            let mut ep = transport.endpoint().unwrap();
            let guard = lock.lock(&mut ep).unwrap();
            body();
            guard.unlock().unwrap();
        },
    );
}

#[test]
fn handover_with_the_locks_own_endpoint_keeps_mutual_exclusion() {
    two_threads(
        |remote, transport| CohortLock::with_endpoint(remote, 2, transport.endpoint().unwrap()),
        |lock, _, body| {
            let guard = lock.lock_own().unwrap();
            body();
            guard.unlock().unwrap();
        },
    );
}
