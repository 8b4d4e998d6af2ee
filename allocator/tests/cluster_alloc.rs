//! Cluster tier: the allocator with its memory nodes on two machines (nodes 0 and 1) and its
//! clients on another (node 2): two stress processes of two threads each at once, then this
//! process's own stress, usage back where it started; round-robin placement across the
//! machines, and stealing from the other machine's node when one is full. Ignored by plain
//! `cargo test`; runs on every machine at once with `soft-roce-setup/vm-cluster --device-tests`.
#![cfg(feature = "rdma")]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rdmem_allocator::conformance;
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_transport_rdma::spawn::{ClusterNode, MemnodeChild, find_binary};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

const TOKEN: &str = "cluster-alloc-test";
const PORT: u16 = 7680;
const MEET: Duration = Duration::from_secs(600);

fn connect(addrs: &[String]) -> Arc<RdmaTransport> {
    Arc::new(
        RdmaTransport::connect(RdmaOptions::for_memnodes(addrs, TOKEN).unwrap()).expect("connect to both machines"),
    )
}

#[test]
#[ignore = "needs a VM cluster: run with soft-roce-setup/vm-cluster --device-tests"]
fn cluster_allocator_with_memory_nodes_on_two_machines() {
    let me = ClusterNode::from_env().unwrap();
    assert!(me.nodes() >= 3, "memory nodes on nodes 0 and 1, clients on node 2");
    // A large pool each for the stress, a small one each for filling a node.
    let (big, small) = ([me.addr(0, PORT), me.addr(1, PORT)], [me.addr(0, PORT + 1), me.addr(1, PORT + 1)]);
    let _served = (me.index < 2).then(|| {
        let id = me.index.to_string();
        let start = |addr: &str, size: &str| {
            MemnodeChild::start_on("memnode", addr, TOKEN, &["--pool-size", size, "--node-id", &id])
                .expect("memory node")
        };
        (start(&big[me.index], "32M"), start(&small[me.index], "2M"))
    });
    me.meet_all(PORT + 2, MEET).expect("memory nodes up");
    if me.index == 2 {
        let transport = connect(&big);
        let options = AllocatorOptions { chunk_size: conformance::CHUNK, ..Default::default() };
        let allocator = Allocator::new(Arc::clone(&transport), options).unwrap();
        let before = allocator.thread().unwrap().usage().unwrap();
        let clients: Vec<_> = (1..=2)
            .map(|seed| {
                Command::new(find_binary("rdmem-pools"))
                    .args(["--memnode", &big[0], "--memnode", &big[1], "--chunk-size", "65536"])
                    .args(["stress", "--threads", "2", "--steps", "1000", "--seed", &seed.to_string()])
                    .env("RDMEM_TOKEN", TOKEN)
                    .spawn()
                    .expect("start rdmem-pools stress")
            })
            .collect();
        rdmem_allocator::stress::stress(&allocator, 2, 600, 3).unwrap();
        for mut client in clients {
            let status = client.wait().unwrap();
            assert!(status.success(), "a stress client failed: {status}");
        }
        assert_eq!(allocator.thread().unwrap().usage().unwrap(), before, "everything freed, every chunk back");
        conformance::round_robin_spreads_over_both_nodes(&transport);
        conformance::stealing_keeps_allocating_when_a_node_is_full_and_strict_does_not(&connect(&small));
    }
    me.meet_all(PORT + 3, MEET).expect("clients done");
}
