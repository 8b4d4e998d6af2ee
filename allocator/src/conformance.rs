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
    AllocatorOptions { chunk_size: CHUNK, placement, mode, ..AllocatorOptions::default() }
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

/// Chunks of dead clients go back to the pools; live clients keep theirs (pools of at least
/// 8 MiB). Three other clients: one whose heartbeat stops (as if killed), one that exits
/// without freeing, one alive. Nothing here depends on timing: the live client's heartbeat is
/// seen to move before the reclaim, and the dead ones' leases are short.
pub fn dead_clients<T: Transport>(transport: &Arc<T>) {
    let quick = AllocatorOptions {
        lease: std::time::Duration::from_millis(20),
        ..options(Placement::RoundRobin, Mode::Stealing)
    };
    let reclaimer = Allocator::new(Arc::clone(transport), quick).unwrap();
    let before = reclaimer.thread().unwrap().usage().unwrap();

    // Killed: small and large blocks on both nodes, then its heartbeat stops. Its objects are
    // forgotten (as a killed process's would be), so nothing frees them later.
    let killed = Allocator::new(Arc::clone(transport), quick).unwrap();
    let killed_thread = killed.thread().unwrap();
    for i in 0..40 {
        killed_thread.alloc(layout(if i % 10 == 0 { 150_000 } else { 100 }, 8)).unwrap();
    }
    killed.stop_heartbeat();
    let killed_id = killed.client_id();
    std::mem::forget(killed_thread);
    std::mem::forget(killed);

    // Exited without freeing: its slot is gone, its chunks stay claimed.
    let exited = Allocator::new(Arc::clone(transport), quick).unwrap();
    let exited_thread = exited.thread().unwrap();
    exited_thread.alloc(layout(100, 8)).unwrap();
    exited_thread.alloc(layout(150_000, 8)).unwrap();
    drop(exited_thread);
    drop(exited);

    // Alive: its block must survive with its bytes.
    let live = Allocator::new(Arc::clone(transport), quick).unwrap();
    let live_thread = live.thread().unwrap();
    let kept = live_thread.alloc(layout(64, 8)).unwrap();
    live_thread.with_endpoint(|ep| ep.write_u64(kept, 0x5eed)).unwrap();

    let grown = reclaimer.thread().unwrap().usage().unwrap();
    assert!(grown.iter().zip(&before).all(|(g, b)| g.chunks_used > b.chunks_used), "{grown:?}");
    let snapshot = reclaimer.client_snapshot().unwrap();
    assert!(snapshot.client_ids().contains(&killed_id) && !snapshot.client_ids().contains(&0));
    // The live client's heartbeat moves; and the snapshot gets older than two short leases.
    let live_beat = snapshot.beat(live.client_id()).expect("the live client holds a slot");
    let started = std::time::Instant::now();
    while reclaimer.client_snapshot().unwrap().beat(live.client_id()) == Some(live_beat) {
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "the live client's heartbeat never moved");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(quick.lease * 2);

    let done = reclaimer.reclaim_dead_clients(&snapshot).unwrap();
    assert_eq!(done.clients, vec![killed_id], "only the killed client held a slot it no longer beats");
    assert!(done.chunks.iter().map(|(_, n)| n).sum::<u64>() >= 4, "{done:?}");
    assert_eq!(live_thread.with_endpoint(|ep| ep.read_u64(kept)).unwrap(), 0x5eed, "the live client's block was kept");
    let again = reclaimer.reclaim_dead_clients(&reclaimer.client_snapshot().unwrap()).unwrap();
    assert_eq!(again, Default::default(), "nothing left to reclaim");
    live_thread.free(kept).unwrap();
    live_thread.flush().unwrap();
    assert_eq!(reclaimer.thread().unwrap().usage().unwrap(), before, "every dead client's chunk is back");
}

/// A dead client's allocations that a live one adopted survive reclaiming the dead, with their
/// bytes; its others are reclaimed; the adopter frees the adopted large one like its own, and
/// bad addresses are refused (pools of at least 8 MiB on two nodes).
pub fn adopted_allocations_survive_reclaim<T: Transport>(transport: &Arc<T>) {
    let quick = AllocatorOptions {
        lease: std::time::Duration::from_millis(20),
        ..options(Placement::RoundRobin, Mode::Stealing)
    };
    let heir = Allocator::new(Arc::clone(transport), quick).unwrap();
    let heir_thread = heir.thread().unwrap();
    let before = heir_thread.usage().unwrap();
    let dead = Allocator::new(Arc::clone(transport), quick).unwrap();
    let dead_thread = dead.thread().unwrap();
    let large = dead_thread.alloc(layout(3 << 20, 4096)).unwrap();
    let small = dead_thread.alloc(layout(100, 8)).unwrap();
    let lost = dead_thread.alloc(layout(200_000, 8)).unwrap();
    dead_thread.with_endpoint(|ep| {
        ep.write_u64(large.checked_add(8).unwrap(), 0x1a46e).unwrap();
        ep.write_u64(small, 0x5a11).unwrap();
    });
    dead.stop_heartbeat();
    std::mem::forget(dead_thread);
    std::mem::forget(dead);
    let snapshot = heir.client_snapshot().unwrap();

    assert_eq!(heir_thread.adopt(large).unwrap(), (3 << 20) / quick.chunk_size, "every chunk of the allocation");
    assert_eq!(heir_thread.adopt(large).unwrap(), 0, "adopting twice takes nothing more");
    assert_eq!(heir_thread.adopt(small).unwrap(), 1);
    let inside = large.checked_add(quick.chunk_size).unwrap();
    assert!(matches!(heir_thread.adopt(inside), Err(AllocError::InvalidAddress { .. })), "inside a large one");
    let far = GlobalAddr::new(NodeId(9), 0).unwrap();
    assert!(matches!(heir_thread.adopt(far), Err(AllocError::InvalidAddress { .. })), "unknown node");

    std::thread::sleep(quick.lease * 2);
    let done = heir.reclaim_dead_clients(&snapshot).unwrap();
    let not_adopted = 200_000u64.div_ceil(quick.chunk_size);
    assert_eq!(done.chunks.iter().map(|(_, n)| n).sum::<u64>(), not_adopted, "only what was not adopted: {done:?}");
    heir_thread.with_endpoint(|ep| {
        assert_eq!(ep.read_u64(large.checked_add(8).unwrap()).unwrap(), 0x1a46e, "adopted bytes kept");
        assert_eq!(ep.read_u64(small).unwrap(), 0x5a11);
    });
    let _ = lost;
    heir_thread.free(large).unwrap();
    let again = heir_thread.free(large);
    assert!(matches!(again, Err(AllocError::DoubleFree { .. } | AllocError::InvalidAddress { .. })), "{again:?}");
    heir_thread.flush().unwrap();
    let after = heir_thread.usage().unwrap();
    let used = |u: &[crate::NodeUsage]| u.iter().map(|n| n.chunks_used).sum::<u64>();
    assert_eq!(used(&after), used(&before) + 1, "all back but the adopted small block's chunk");
}

/// `alloc` hands out a block as its last user left it; `alloc_zeroed` zeroes it (pools of at
/// least 4 MiB).
pub fn zeroed_blocks<T: Transport>(transport: &Arc<T>) {
    let allocator = Allocator::new(Arc::clone(transport), options(Placement::Node(NodeId(0)), Mode::Stealing)).unwrap();
    let alloc = allocator.thread().unwrap();
    for size in [64usize, 300_000] {
        let keep = alloc.alloc(layout(64, 8)).unwrap(); // keeps the small chunk claimed
        let a = alloc.alloc(layout(size, 8)).unwrap();
        alloc.with_endpoint(|ep| ep.write(a, &vec![0xEE; size])).unwrap();
        alloc.free(a).unwrap();
        let b = alloc.alloc_zeroed(layout(size, 8)).unwrap();
        let mut bytes = vec![1u8; size];
        alloc.with_endpoint(|ep| ep.read(b, &mut bytes)).unwrap();
        assert!(bytes.iter().all(|&x| x == 0), "alloc_zeroed of {size} bytes handed out dirty bytes");
        alloc.free(b).unwrap();
        alloc.free(keep).unwrap();
    }
}
