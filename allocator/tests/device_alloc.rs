//! Device tier: the allocator over rxe, against two `rdmem-memnode` processes.
//!
//! Ignored by plain `cargo test`; runs in the Soft-RoCE VM with
//! `soft-roce-setup/vm-run --device-tests`. Without a device no memory node starts and every
//! test fails.
#![cfg(feature = "rdma")]

use std::process::Command;
use std::sync::Arc;

use rdmem_allocator::conformance;
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_core::{NodeId, Transport};
use rdmem_transport_rdma::spawn::MemnodeChild;
use rdmem_transport_rdma::spawn::find_binary;
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

const TOKEN: &str = "allocator-device-test";

fn two_memnodes(pool: &str) -> [MemnodeChild; 2] {
    let start = |id: &str| {
        MemnodeChild::start(&format!("memnode {id}"), TOKEN, &["--pool-size", pool, "--node-id", id])
            .unwrap_or_else(|e| panic!("rdmem-memnode {id} did not start: {e}"))
    };
    [start("0"), start("1")]
}

fn connect(nodes: &[MemnodeChild; 2]) -> Arc<RdmaTransport> {
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr()).collect();
    Arc::new(
        RdmaTransport::connect(RdmaOptions::for_memnodes(&addrs, TOKEN).unwrap())
            .expect("connect to both memory nodes"),
    )
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn two_client_processes_of_two_threads_keep_the_invariants() {
    let nodes = two_memnodes("32M");
    let transport = connect(&nodes);
    let options = AllocatorOptions { chunk_size: conformance::CHUNK, ..Default::default() };
    let allocator = Allocator::new(Arc::clone(&transport), options).unwrap();
    let before = allocator.thread().unwrap().usage().unwrap();
    assert_eq!(before.iter().map(|u| u.node).collect::<Vec<_>>(), vec![NodeId(0), NodeId(1)]);

    // Two processes at once: each checks every block's bytes before freeing it, so blocks
    // handed out twice across processes would show up as damage.
    let pools = find_binary("rdmem-pools");
    let clients: Vec<_> = (1..=2)
        .map(|seed| {
            Command::new(&pools)
                .args(["--memnode", nodes[0].addr(), "--memnode", nodes[1].addr(), "--chunk-size", "65536"])
                .args(["stress", "--threads", "2", "--steps", "1500", "--seed", &seed.to_string()])
                .env("RDMEM_TOKEN", TOKEN)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", pools.display()))
        })
        .collect();
    for mut client in clients {
        let status = client.wait().unwrap();
        assert!(status.success(), "a stress client failed: {status}");
    }
    // Both clients freed everything and gave their chunks back.
    assert_eq!(allocator.thread().unwrap().usage().unwrap(), before);
    // And in this process too, over RDMA, with 2 threads.
    rdmem_allocator::stress::stress(&allocator, 2, 1000, 3).unwrap();
    assert_eq!(allocator.thread().unwrap().usage().unwrap(), before);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn bad_inputs_are_errors_over_rdma() {
    conformance::bad_inputs(&connect(&two_memnodes("8M")));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn remote_double_frees_are_caught_over_rdma() {
    conformance::remote_double_frees(&connect(&two_memnodes("8M")));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn round_robin_spreads_blocks_over_both_nodes() {
    conformance::round_robin_spreads_over_both_nodes(&connect(&two_memnodes("4M")));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn stealing_and_strict_modes_when_a_node_is_full() {
    let nodes = two_memnodes("2M");
    let transport = connect(&nodes);
    assert!(transport.nodes().iter().all(|n| n.pool_size == 2 << 20));
    conformance::stealing_keeps_allocating_when_a_node_is_full_and_strict_does_not(&transport);
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn chunks_of_dead_clients_are_reclaimed_over_rdma() {
    conformance::dead_clients(&connect(&two_memnodes("16M")));
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_killed_client_process_chunks_are_reclaimed() {
    let nodes = two_memnodes("32M");
    let transport = connect(&nodes);
    let options = AllocatorOptions { chunk_size: conformance::CHUNK, ..Default::default() };
    let allocator = Allocator::new(Arc::clone(&transport), options).unwrap();
    let before = allocator.thread().unwrap().usage().unwrap();
    // A client process in the middle of a long workload, killed once it holds chunks.
    let mut client = Command::new(find_binary("rdmem-pools"))
        .args(["--memnode", nodes[0].addr(), "--memnode", nodes[1].addr(), "--chunk-size", "65536"])
        .args(["stress", "--threads", "2", "--steps", "100000000"])
        .env("RDMEM_TOKEN", TOKEN)
        .spawn()
        .expect("start rdmem-pools stress");
    let started = std::time::Instant::now();
    while allocator.thread().unwrap().usage().unwrap().iter().zip(&before).all(|(u, b)| u.chunks_used <= b.chunks_used)
    {
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "the client never claimed a chunk");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let done = allocator.reclaim_dead_clients_now().unwrap();
    assert_eq!(done.clients.len(), 1, "the killed client: {done:?}");
    assert_eq!(allocator.thread().unwrap().usage().unwrap(), before, "its chunks are back: {done:?}");
}

#[test]
#[ignore = "needs an RDMA device: run with soft-roce-setup/vm-run --device-tests"]
fn a_restored_pool_gives_back_the_chunks_of_its_gone_clients() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let start = |more: &[&str]| {
        let args = [&["--pool-size", "32M", "--checkpoint-dir", dir_arg][..], more].concat();
        MemnodeChild::start("memnode", TOKEN, &args).unwrap_or_else(|e| panic!("rdmem-memnode: {e}"))
    };
    let connect_one = |node: &MemnodeChild| {
        Arc::new(RdmaTransport::connect(RdmaOptions::for_memnodes(&[node.addr()], TOKEN).unwrap()).expect("connect"))
    };
    let options = AllocatorOptions { chunk_size: conformance::CHUNK, ..Default::default() };
    let mut node = start(&[]);
    let (before, kept) = {
        let allocator = Allocator::new(connect_one(&node), options).unwrap();
        let thread = allocator.thread().unwrap();
        let before = thread.usage().unwrap();
        let layout = |size| std::alloc::Layout::from_size_align(size, 8).unwrap();
        let kept = thread.alloc(layout(300_000)).unwrap();
        thread.with_endpoint(|ep| rdmem_core::Endpoint::write_u64(ep, kept, 0xc0ffee)).unwrap();
        for _ in 0..20 {
            thread.alloc(layout(100)).unwrap();
        }
        // Checkpointed from the shell, while this client holds its chunks.
        let out = Command::new(find_binary("rdmem-pools"))
            .args(["--memnode", node.addr(), "checkpoint"])
            .env("RDMEM_TOKEN", TOKEN)
            .output()
            .expect("start rdmem-pools");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("full"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        std::mem::forget(thread);
        std::mem::forget(allocator);
        (before, kept)
    };
    node.kill();
    let node = start(&["--restore", dir_arg]);
    let allocator = Allocator::new(connect_one(&node), options).unwrap();
    let thread = allocator.thread().unwrap();
    assert_eq!(thread.with_endpoint(|ep| rdmem_core::Endpoint::read_u64(ep, kept)).unwrap(), 0xc0ffee);
    let restored = thread.usage().unwrap();
    assert!(restored[0].chunks_used > before[0].chunks_used, "the restored pool holds the chunks: {restored:?}");
    let done = allocator.reclaim_dead_clients_now().unwrap();
    assert_eq!(done.clients.len(), 1, "the client gone with the old process: {done:?}");
    assert_eq!(thread.usage().unwrap(), before, "its chunks are back: {done:?}");
}
