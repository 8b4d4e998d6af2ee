//! The loopback transport's async face against the shared conformance checks, plus its fault
//! injection and several threads each with their own async endpoint.

use rdmem_core::aio::{AsyncEndpoint, block_on};
use rdmem_core::conformance::{self, SCRATCH_BYTES};
use rdmem_core::{Error, GlobalAddr, LoopbackOptions, LoopbackTransport, NodeId, Transport};

fn scratch(node: u16) -> GlobalAddr {
    GlobalAddr::new(NodeId(node), SCRATCH_BYTES).unwrap()
}

#[test]
fn async_face_has_the_sync_semantics() {
    conformance::async_semantics(&LoopbackTransport::new(&[1 << 20, 1 << 16]), scratch(0));
}

#[test]
fn thousands_of_futures_in_flight_from_one_thread() {
    conformance::async_many_in_flight(&LoopbackTransport::new(&[1 << 20]), scratch(0), 5000);
}

#[test]
fn dropped_futures_lose_no_slot_and_touch_no_memory() {
    conformance::async_cancellation(&LoopbackTransport::new(&[1 << 20]), scratch(0), 60);
}

#[test]
fn threads_with_their_own_async_endpoints_lose_no_fetch_and_add() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    let word = scratch(0);
    for round in 0..20 {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
                    let futs = (0..200).map(|_| Box::pin(ep.faa(word, 1)) as _).collect();
                    for old in block_on(conformance::join_all::<rdmem_core::Result<u64>>(futs)) {
                        old.unwrap();
                    }
                });
            }
        });
        let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
        assert_eq!(block_on(ep.read_u64(word)).unwrap(), (round + 1) * 800, "round {round}");
    }
}

#[test]
fn a_failed_operation_breaks_its_node_for_later_ones() {
    let transport =
        LoopbackTransport::with_options(&[1 << 20], LoopbackOptions { fail_every: Some(3), ..Default::default() });
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    let word = scratch(0);
    block_on(async {
        ep.faa(word, 1).await.unwrap();
        ep.faa(word, 1).await.unwrap();
        assert!(matches!(ep.faa(word, 1).await, Err(Error::Injected { .. })));
        assert!(matches!(ep.faa(word, 1).await, Err(Error::Broken { node: NodeId(0) })));
    });
}

#[test]
fn a_downed_node_fails_its_operations_and_leaves_the_others() {
    let transport = LoopbackTransport::new(&[1 << 20, 1 << 20]);
    let ep = AsyncEndpoint::new(transport.endpoint().unwrap()).unwrap();
    transport.set_node_down(NodeId(1), true);
    block_on(async {
        assert!(matches!(ep.faa(scratch(1), 1).await, Err(Error::NodeGone { .. })));
        assert_eq!(ep.faa(scratch(0), 1).await.unwrap(), 0, "node 0 still serves");
    });
}

#[test]
fn bad_options_are_refused() {
    let transport = LoopbackTransport::new(&[1 << 20]);
    for options in [
        rdmem_core::aio::AsyncOptions { slots: 0, ..Default::default() },
        rdmem_core::aio::AsyncOptions { slots: 129, ..Default::default() },
        rdmem_core::aio::AsyncOptions { slot_bytes: 4, ..Default::default() },
    ] {
        let r = AsyncEndpoint::with_options(transport.endpoint().unwrap(), options.clone());
        assert!(matches!(r, Err(Error::Config(_))), "{options:?}");
    }
}
