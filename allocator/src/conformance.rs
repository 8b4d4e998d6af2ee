//! The allocator's behaviour as reusable checks over any transport (feature `conformance`):
//! the loopback tests and the device tests run the same functions. Each panics on the first
//! violation. Each needs a transport of two fresh (never formatted) nodes of the sizes it names.

use std::alloc::Layout;
use std::sync::Arc;

use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};

use crate::{AllocError, Allocator, AllocatorOptions, Mode, Placement};

/// Chunk size the checks format pools with.
pub const CHUNK: u64 = 64 << 10;

fn options(placement: Placement, mode: Mode) -> AllocatorOptions {
    AllocatorOptions { chunk_size: CHUNK, placement, mode }
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).expect("layout")
}

/// Every bad input gives its error (pools of at least 4 MiB).
pub fn bad_inputs<T: Transport>(transport: &Arc<T>) {
    let allocator = Allocator::new(Arc::clone(transport), options(Placement::Node(NodeId(0)), Mode::Stealing)).unwrap();
    let alloc = allocator.thread().unwrap();
    assert!(matches!(alloc.alloc(layout(0, 1)), Err(AllocError::ZeroSize)));
    assert!(matches!(alloc.alloc(layout(8, 1 << 17)), Err(AllocError::BadAlignment { .. })));
    assert!(matches!(alloc.alloc(layout(1 << 40, 8)), Err(AllocError::TooLarge { .. })));

    // Double free of an own small block, of a large block, and from another thread.
    let small = alloc.alloc(layout(40, 8)).unwrap();
    let keep = alloc.alloc(layout(40, 8)).unwrap(); // keeps the chunk claimed
    alloc.free(small).unwrap();
    assert!(matches!(alloc.free(small), Err(AllocError::DoubleFree { .. })));
    let large = alloc.alloc(layout(200_000, 8)).unwrap();
    let other = allocator.thread().unwrap();
    other.free(large).unwrap(); // a large block freed by another thread
    assert!(matches!(alloc.free(large), Err(AllocError::DoubleFree { .. })));

    // Addresses that were never handed out.
    let invalid = |addr: GlobalAddr| matches!(alloc.free(addr), Err(AllocError::InvalidAddress { .. }));
    assert!(invalid(GlobalAddr::new(NodeId(9), 1 << 20).unwrap()), "unknown node");
    assert!(invalid(GlobalAddr::new(NodeId(0), 64).unwrap()), "the pool header");
    assert!(invalid(keep.checked_add(8).unwrap()), "inside a block");
    assert!(invalid(GlobalAddr::new(NodeId(0), 3 << 20).unwrap()), "a chunk nobody claimed");
    assert!(
        matches!(other.free(keep.checked_add(8).unwrap()), Err(AllocError::InvalidAddress { .. })),
        "inside a block, remotely"
    );
    let never = keep.checked_add(64 * 10).unwrap(); // a slot of the chunk not handed out yet
    match alloc.free(never) {
        Err(AllocError::InvalidAddress { reason, .. }) => assert!(reason.contains("never allocated"), "{reason}"),
        other => panic!("freeing a never-allocated slot of one's own chunk: {other:?}"),
    }
    alloc.free(keep).unwrap();
}

/// Blocks freed twice through remote free lists (pools of at least 4 MiB): the second free is
/// caught at once where its mark shows it; where it cannot be (the freed block was written to
/// after its free), the owner's `flush` reports the block and quarantines its chunk, and
/// nothing hangs or is handed out twice. A block taken back and handed out again can be freed
/// remotely again.
pub fn remote_double_frees<T: Transport>(transport: &Arc<T>) {
    let allocator = Allocator::new(Arc::clone(transport), options(Placement::Node(NodeId(0)), Mode::Stealing)).unwrap();
    let (owner, other) = (allocator.thread().unwrap(), allocator.thread().unwrap());

    // 1. A second remote free of the same block: caught by the freeing thread.
    let keep = owner.alloc(layout(40, 8)).unwrap(); // keeps the chunk claimed
    let x = owner.alloc(layout(40, 8)).unwrap();
    other.free(x).unwrap();
    assert!(matches!(other.free(x), Err(AllocError::DoubleFree { addr }) if addr == x), "second remote free");
    owner.flush().unwrap();

    // 2. Taken back and handed out again: a remote free is fine once more (the mark was cleared).
    let again = owner.alloc(layout(40, 8)).unwrap();
    assert_eq!(again, x, "the owner hands out the block it took back");
    other.free(again).unwrap();
    owner.flush().unwrap();

    // 3. A double free the freeing side cannot see (the block was written after its free):
    //    the list loops; the owner's flush stops, names the block, quarantines the chunk.
    let y = owner.alloc(layout(40, 8)).unwrap();
    other.free(y).unwrap();
    other.with_endpoint(|ep| ep.write(y.checked_add(8).unwrap(), &[0xAB; 8])).unwrap(); // use after free
    other.free(y).unwrap(); // not detectable here any more
    match owner.flush() {
        Err(AllocError::CorruptFreeList { block, .. }) => assert_eq!(block, y),
        r => panic!("flush after a looping remote free list: {r:?}"),
    }
    owner.flush().unwrap(); // reported once; the quarantined chunk is left alone
    // Nothing comes from the quarantined chunk again: new blocks are elsewhere, all distinct.
    let chunk_of = |a: GlobalAddr| a.offset() / CHUNK;
    let fresh: Vec<_> = (0..200).map(|_| owner.alloc(layout(40, 8)).unwrap()).collect();
    assert!(fresh.iter().all(|&a| chunk_of(a) != chunk_of(y)), "a block came from the quarantined chunk");
    let mut sorted = fresh.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), fresh.len(), "a block was handed out twice");
    for a in fresh {
        owner.free(a).unwrap();
    }
    owner.free(keep).unwrap(); // the owner's own live block in that chunk still frees

    // 4. The same found on the allocation path: logged there, reported by the next flush.
    let (p, q) = (owner.alloc(layout(30_000, 8)).unwrap(), owner.alloc(layout(30_000, 8)).unwrap());
    assert_eq!(chunk_of(p), chunk_of(q), "two 32 KiB blocks fill one 64 KiB chunk");
    other.free(p).unwrap();
    other.with_endpoint(|ep| ep.write(p.checked_add(8).unwrap(), &[0xCD; 8])).unwrap();
    other.free(p).unwrap();
    let r = owner.alloc(layout(30_000, 8)).unwrap(); // refill: reclaims, finds the loop
    assert_ne!(chunk_of(r), chunk_of(p), "the block came from the quarantined chunk");
    match owner.flush() {
        Err(AllocError::CorruptFreeList { block, .. }) => assert_eq!(block, p),
        other => panic!("flush after a corrupt list found on refill: {other:?}"),
    }
    owner.free(q).unwrap();
    owner.free(r).unwrap();
    owner.flush().unwrap();
}

/// Round-robin puts every other block on each node (pools of at least 1 MiB).
pub fn round_robin_spreads_over_both_nodes<T: Transport>(transport: &Arc<T>) {
    let allocator = Allocator::new(Arc::clone(transport), options(Placement::RoundRobin, Mode::Stealing)).unwrap();
    let alloc = allocator.thread().unwrap();
    let addrs: Vec<_> = (0..100).map(|_| alloc.alloc(layout(64, 8)).unwrap()).collect();
    let on = |n: u16| addrs.iter().filter(|a| a.node() == NodeId(n)).count();
    assert_eq!((on(0), on(1)), (50, 50));
    for a in addrs {
        alloc.free(a).unwrap();
    }
}

/// With node 0 full, stealing goes on on node 1 and strict fails naming node 0; a quota stops
/// earlier (pools of 2 MiB: small, so filling them is quick).
pub fn stealing_keeps_allocating_when_a_node_is_full_and_strict_does_not<T: Transport>(transport: &Arc<T>) {
    let fill = |mode| {
        let allocator = Allocator::new(Arc::clone(transport), options(Placement::Node(NodeId(0)), mode)).unwrap();
        let alloc = allocator.thread().unwrap();
        let mut on = [0usize; 2];
        let mut addrs = Vec::new();
        let err = loop {
            match alloc.alloc(layout(30_000, 8)) {
                Ok(a) => {
                    on[a.node().0 as usize] += 1;
                    addrs.push(a);
                }
                Err(e) => break e,
            }
        };
        for a in addrs {
            alloc.free(a).unwrap();
        }
        (on, err)
    };
    let (on, err) = fill(Mode::Strict { chunks_per_node: None });
    assert!(on[0] > 0 && on[1] == 0, "strict stays on node 0: {on:?}");
    assert!(matches!(err, AllocError::OutOfMemory { node: NodeId(0), .. }), "{err}");
    assert!(err.to_string().contains("node 0"), "{err}");
    let (on, err) = fill(Mode::Stealing);
    assert!(on[0] > 0 && on[1] > 0, "stealing moves on to node 1: {on:?}");
    assert!(matches!(err, AllocError::OutOfMemory { .. }), "{err}");
    let (on, _) = fill(Mode::Strict { chunks_per_node: Some(3) });
    assert_eq!(on, [6, 0], "3 chunks of 64 KiB hold 2 blocks of 30 KB each");
}
