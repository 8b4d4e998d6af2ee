//! Cluster tier, machine deaths (a VM killed outright: no FIN, no RST, its memory gone).
//! 1. A lock holder's machine dies inside its critical section: the other machine proceeds
//!    after about a lease, and the counter equals the completed sections.
//!    It also held allocator chunks (on another memory node of node 0): a reclaimer takes them
//!    back once its heartbeat has stood still for two leases.
//! 2. A memory node's machine dies while a client works on it: the client's operation fails
//!    with a typed error (retry exceeded, node gone or timeout), never hangs.
//!
//! Needs 3 machines (node 0 orchestrates; node 2 dies in part 1, node 1 in part 2). Ignored by
//! plain `cargo test`; runs with `soft-roce-setup/vm-cluster --device-tests --test-prefix
//! machine_death_` (a cluster of its own, since machines do not come back).
#![cfg(feature = "rdma")]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_coherence::RemoteLock;
use rdmem_core::{Endpoint, Error, GlobalAddr, NodeId, Transport, WcStatus};
use rdmem_transport_rdma::spawn::{ClusterNode, MemnodeChild};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

const TOKEN: &str = "cluster-death-test";
const PORT: u16 = 7620;
const MEET: Duration = Duration::from_secs(300);
const LEASE: Duration = Duration::from_secs(1);

fn connect(addr: &str) -> RdmaTransport {
    RdmaTransport::connect(RdmaOptions::for_memnodes(&[addr], TOKEN).unwrap()).expect("connect to the memory node")
}

/// One critical section: READ the counter, WRITE it plus one. Returns how long the acquire
/// waited.
fn section(lock: &RemoteLock, ep: &mut impl Endpoint, counter: GlobalAddr) -> Duration {
    let started = Instant::now();
    let mut guard = lock.lock(ep).expect("acquire");
    let waited = started.elapsed();
    let n = guard.endpoint().read_u64(counter).expect("read");
    guard.endpoint().write_u64(counter, n + 1).expect("write");
    guard.unlock().expect("release");
    waited
}

fn kill_node(k: usize) {
    let status = Command::new("rdmem-vm-kill").arg(k.to_string()).status().expect("run rdmem-vm-kill");
    assert!(status.success(), "rdmem-vm-kill {k} failed");
}

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests --test-prefix machine_death_"]
fn machine_death_of_a_lock_holder_and_of_a_memory_node() {
    let me = ClusterNode::from_env().unwrap();
    assert_eq!(me.nodes(), 3, "node 0 orchestrates, node 2 dies in part 1, node 1 in part 2");

    // Part 1: node 2 dies holding the lock.
    let server = me.addr(0, PORT);
    let pool = me.addr(0, PORT + 5);
    let _memnodes = (me.index == 0).then(|| {
        let start =
            |addr: &str| MemnodeChild::start_on("memnode", addr, TOKEN, &["--pool-size", "16M"]).expect("memnode");
        (start(&server), start(&pool))
    });
    let (word, counter) = (GlobalAddr::new(NodeId(0), 4096).unwrap(), GlobalAddr::new(NodeId(0), 8192).unwrap());
    let (before, after) = (20u64, 40u64);
    me.meet_all(PORT + 1, MEET).expect("memory node up");
    match me.index {
        0 => {
            me.meet_all(PORT + 6, MEET).expect("the sections before are done");
            me.meet_all(PORT + 2, MEET).expect("node 2 holds the lock");
            kill_node(2);
            // Node 2's allocator client is dead: its chunks come back.
            let transport = Arc::new(connect(&pool));
            let options = AllocatorOptions { lease: LEASE, ..AllocatorOptions::default() };
            let allocator = Allocator::new(transport, options).unwrap();
            let reclaimed = allocator.reclaim_dead_clients_now().unwrap();
            println!("node 0: reclaimed the dead machine's allocator client: {reclaimed:?}");
            assert_eq!(reclaimed.clients.len(), 1, "node 2's client: {reclaimed:?}");
            assert!(!reclaimed.chunks.is_empty(), "it held chunks: {reclaimed:?}");
            me.meet(&[0, 1], PORT + 3, MEET).expect("node 1 done");
        }
        1 => {
            let transport = connect(&server);
            let mut ep = transport.endpoint().unwrap();
            let lock = RemoteLock::new(word, 1, LEASE).unwrap();
            for _ in 0..before {
                section(&lock, &mut ep, counter);
            }
            // Node 2 takes the lock only once this node is done with it: were it still working
            // here, it would rightly take over a hold node 2 kept past its lease while waiting.
            me.meet_all(PORT + 6, MEET).expect("the sections before are done");
            me.meet_all(PORT + 2, MEET).expect("node 2 holds the lock");
            // This node's lease clock starts when it first sees node 2's hold, after the meeting,
            // so however long the meeting took, it waits a whole lease.
            let longest = (0..after).map(|_| section(&lock, &mut ep, counter)).max().unwrap();
            println!("node 1: the dead holder delayed it by {longest:?} (lease {LEASE:?})");
            assert!(longest >= LEASE, "the lock was held by the dead machine until its lease ran out");
            let n = ep.read_u64(counter).unwrap();
            assert_eq!(
                n,
                2 * before + after,
                "every completed section counted; the dead one's half section wrote nothing"
            );
            me.meet(&[0, 1], PORT + 3, MEET).expect("node 1 done");
        }
        _ => {
            let transport = connect(&server);
            let mut ep = transport.endpoint().unwrap();
            let lock = RemoteLock::new(word, 2, LEASE).unwrap();
            for _ in 0..before {
                section(&lock, &mut ep, counter);
            }
            // Allocator chunks on the other pool, never freed: this machine dies with them.
            let options = AllocatorOptions { lease: LEASE, ..AllocatorOptions::default() };
            let allocator = Allocator::new(Arc::new(connect(&pool)), options).unwrap();
            let alloc = allocator.thread().unwrap();
            let blocks: Vec<_> =
                (0..10).map(|_| alloc.alloc(std::alloc::Layout::from_size_align(4096, 8).unwrap()).unwrap()).collect();
            assert_eq!(blocks.len(), 10);
            me.meet_all(PORT + 6, MEET).expect("the sections before are done");
            let mut guard = lock.lock(&mut ep).expect("acquire");
            let _ = guard.endpoint().read_u64(counter).expect("read");
            me.meet_all(PORT + 2, MEET).expect("holding");
            // Inside the critical section until this machine is killed.
            std::thread::sleep(Duration::from_secs(600));
            panic!("node 2 was not killed");
        }
    }

    // Part 2: node 1 serves a memory node and dies while node 0 works on it.
    if me.index == 1 {
        let server = me.addr(1, PORT + 10);
        let _memnode = MemnodeChild::start_on("memnode", &server, TOKEN, &["--pool-size", "16M"]).expect("memnode");
        me.meet(&[0, 1], PORT + 4, MEET).expect("serving");
        std::thread::sleep(Duration::from_secs(600));
        panic!("node 1 was not killed");
    }
    me.meet(&[0, 1], PORT + 4, MEET).expect("node 1 serves");
    let transport = connect(&me.addr(1, PORT + 10));
    let word = GlobalAddr::new(NodeId(0), 64).unwrap();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<Instant>();
    let worker = std::thread::spawn(move || {
        let mut ep = transport.endpoint().unwrap();
        let mut done = 0u64;
        loop {
            match ep.faa(word, 1) {
                Ok(_) => done += 1,
                Err(e) => return (e, done, Instant::now()),
            }
            if done == 50 {
                let _ = killed_tx.send(Instant::now()); // working: time to kill the machine
            }
        }
    });
    let _ = killed_rx.recv_timeout(MEET);
    kill_node(1);
    let killed = Instant::now();
    let (error, done, failed) = worker.join().expect("the worker returns an error, it does not hang");
    let took = failed.saturating_duration_since(killed);
    println!("node 0: {done} FAAs, then the dead memory node's machine was reported after {took:?}: {error}");
    assert!(
        matches!(
            error,
            Error::Completion { status: WcStatus::RetryExceeded, .. } | Error::NodeGone { .. } | Error::Timeout { .. }
        ),
        "a typed error naming the failure: {error:?}"
    );
    assert!(done >= 50, "it worked before the machine died");
}
