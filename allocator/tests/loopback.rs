//! The allocator on the loopback transport: random alloc/free sequences from several threads
//! of several clients, every bad input, placement and the two multi-node modes.

use std::alloc::Layout;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rdmem_allocator::conformance;
use rdmem_allocator::stress::{self, Live, Step};
use rdmem_allocator::{Allocator, AllocatorOptions, Mode, Placement, RemoteBox};
use rdmem_core::{LoopbackTransport, NodeId};

const CHUNK: u64 = 64 << 10;

fn options(placement: Placement, mode: Mode) -> AllocatorOptions {
    AllocatorOptions { chunk_size: CHUNK, placement, mode, ..AllocatorOptions::default() }
}

fn two_nodes(size: u64) -> Arc<LoopbackTransport> {
    Arc::new(LoopbackTransport::new(&[size, size]))
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u64..600, 0u32..7).prop_map(|(size, align_shift)| Step::Alloc { size, align_shift }),
        1 => (20_000u64..200_000, 0u32..3).prop_map(|(size, align_shift)| Step::Alloc { size, align_shift }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, hand_over)| Step::Free { pick, hand_over }),
        1 => Just(Step::FreeHandedOver),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// 2 clients x 4 threads on 2 nodes: no two live blocks overlap, every block keeps its
    /// bytes until freed, alignment holds, and usage returns exactly to where it started.
    #[test]
    fn random_sequences_from_two_clients_of_four_threads(
        scripts in proptest::collection::vec(proptest::collection::vec(step(), 1..120), 8)
    ) {
        let transport = two_nodes(16 << 20);
        let clients = [
            Allocator::new(Arc::clone(&transport), options(Placement::RoundRobin, Mode::Stealing)).unwrap(),
            Allocator::new(Arc::clone(&transport), options(Placement::LeastLoaded, Mode::Stealing)).unwrap(),
        ];
        let start = clients[0].thread().unwrap().usage().unwrap();
        let (live, pile) = (Live::default(), Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            for (t, script) in scripts.iter().enumerate() {
                let (client, live, pile) = (&clients[t % 2], &live, &pile);
                s.spawn(move || {
                    let alloc = client.thread().unwrap();
                    stress::run_steps(&alloc, script.iter().cloned(), live, pile, (t as u64) << 32).unwrap();
                    alloc.flush().unwrap();
                });
            }
        });
        let last = clients[0].thread().unwrap();
        for block in pile.into_inner().unwrap() {
            stress::check_and_free(&last, &live, block).unwrap();
        }
        drop(last);
        // Frees into chunks of threads that had already ended went to those chunks' remote
        // free lists; one more flush per client adopts the ended threads' chunks and takes
        // them back.
        for client in &clients {
            client.thread().unwrap().flush().unwrap();
        }
        prop_assert!(live.is_empty());
        let end = clients[0].thread().unwrap().usage().unwrap();
        prop_assert_eq!(end, start, "usage must return to its starting value");
    }
}

#[test]
fn seeded_stress_ends_clean() {
    let transport = two_nodes(32 << 20);
    let allocator = Allocator::new(Arc::clone(&transport), options(Placement::RoundRobin, Mode::Stealing)).unwrap();
    let before = allocator.thread().unwrap().usage().unwrap();
    let counts = stress::stress(&allocator, 4, 2000, 7).unwrap();
    assert!(counts.allocs > 1000 && counts.handed_over > 100, "{counts:?}");
    assert_eq!(allocator.thread().unwrap().usage().unwrap(), before);
}

#[test]
fn least_loaded_picks_the_emptier_node() {
    let transport = two_nodes(8 << 20);
    let filler = Allocator::new(Arc::clone(&transport), options(Placement::Node(NodeId(0)), Mode::Stealing)).unwrap();
    let f = filler.thread().unwrap();
    let big: Vec<_> = (0..4).map(|_| f.alloc(layout(1 << 20, 8)).unwrap()).collect();
    let allocator = Allocator::new(Arc::clone(&transport), options(Placement::LeastLoaded, Mode::Stealing)).unwrap();
    let alloc = allocator.thread().unwrap();
    assert_eq!(alloc.alloc(layout(64, 8)).unwrap().node(), NodeId(1));
    for a in big {
        f.free(a).unwrap();
    }
}

#[test]
fn racing_clients_format_the_pool_once() {
    let transport = two_nodes(8 << 20);
    let allocators: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    Allocator::new(Arc::clone(&transport), options(Placement::RoundRobin, Mode::Stealing)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids: Vec<_> = allocators.iter().map(|a| a.client_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 6, "distinct client ids");
    assert!(allocators.iter().all(|a| a.chunk_size(NodeId(0)) == Some(CHUNK)));
    let usage = allocators[0].thread().unwrap().usage().unwrap();
    assert!(usage.iter().all(|u| u.chunks_used == 0 && u.chunks_total > 0), "{usage:?}");
}

#[test]
fn small_blocks_cost_almost_no_network_operations() {
    let allocator = Allocator::new(two_nodes(16 << 20), AllocatorOptions::default()).unwrap();
    let alloc = allocator.thread().unwrap();
    let before = alloc.network_ops();
    let pairs = 100_000;
    let mut held = Vec::with_capacity(64);
    for _ in 0..pairs / 64 {
        held.extend((0..64).map(|_| alloc.alloc(layout(64, 8)).unwrap()));
        for a in held.drain(..) {
            alloc.free(a).unwrap();
        }
    }
    let per_pair = (alloc.network_ops() - before) as f64 / pairs as f64;
    assert!(per_pair <= 0.02, "{per_pair} network operations per alloc+free pair");
}

#[test]
fn remote_box_reads_writes_and_frees_on_drop() {
    let allocator = Allocator::new(two_nodes(4 << 20), options(Placement::Node(NodeId(1)), Mode::Stealing)).unwrap();
    let alloc = allocator.thread().unwrap();
    let before = alloc.usage().unwrap();
    {
        let b = RemoteBox::new(&alloc, [7u32; 6]).unwrap();
        assert_eq!(b.addr().node(), NodeId(1));
        b.write(&[9u32; 6]).unwrap();
        assert_eq!(b.read().unwrap(), [9u32; 6]);
        let c = RemoteBox::new(&alloc, 5u64).unwrap();
        c.free().unwrap();
    }
    alloc.flush().unwrap();
    assert_eq!(alloc.usage().unwrap(), before);
}

#[test]
fn bad_inputs_are_errors() {
    conformance::bad_inputs(&two_nodes(4 << 20));
}

#[test]
fn remote_double_frees_are_caught_and_never_hang_the_owner() {
    // Run off the test thread with a bound no machine hits by being slow (the walk is a few
    // hundred loopback operations): a looping free list used to spin the owner forever.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        conformance::remote_double_frees(&two_nodes(4 << 20));
        tx.send(()).unwrap();
    });
    match rx.recv_timeout(std::time::Duration::from_secs(300)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the checks failed (see the panic above)"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the owner hangs on a looping remote free list"),
    }
}

#[test]
fn chunks_of_dead_clients_are_reclaimed_and_live_ones_kept() {
    conformance::dead_clients(&two_nodes(8 << 20));
}

#[test]
fn adopted_allocations_survive_reclaiming_their_dead_allocator() {
    conformance::adopted_allocations_survive_reclaim(&two_nodes(8 << 20));
}

#[test]
fn alloc_zeroed_gives_zeroed_blocks() {
    conformance::zeroed_blocks(&two_nodes(4 << 20));
}

#[test]
fn round_robin_spreads_over_both_nodes() {
    conformance::round_robin_spreads_over_both_nodes(&two_nodes(8 << 20));
}

#[test]
fn stealing_keeps_allocating_when_a_node_is_full_and_strict_does_not() {
    conformance::stealing_keeps_allocating_when_a_node_is_full_and_strict_does_not(&two_nodes(2 << 20));
}

#[test]
fn named_roots_publish_and_find_addresses_with_compare_and_swap() {
    let transport = two_nodes(4 << 20);
    let a =
        Allocator::new(transport.clone(), options(Placement::RoundRobin, Mode::Stealing)).unwrap().thread().unwrap();
    let b = Allocator::new(transport, options(Placement::RoundRobin, Mode::Stealing)).unwrap().thread().unwrap();
    let (ra, rb) = (a.root(NodeId(1), "test/index").unwrap(), b.root(NodeId(1), "test/index").unwrap());
    assert_eq!(ra.word(), rb.word(), "one name, one root, whichever client opens it");
    assert_eq!(b.find_root(NodeId(1), "test/never-opened").unwrap(), None, "a lookup takes no slot");
    assert_eq!(b.find_root(NodeId(1), "test/index").unwrap().map(|r| r.word()), Some(ra.word()));
    let other = a.root(NodeId(1), "test/other").unwrap();
    assert_ne!(other.word(), ra.word());
    let x = a.alloc(layout(64, 8)).unwrap();
    let y = b.alloc(layout(64, 8)).unwrap();
    a.with_endpoint(|ep| {
        assert_eq!(ra.get(ep).unwrap(), None);
        assert_eq!(ra.compare_exchange(ep, None, Some(x)).unwrap(), Ok(()));
    });
    b.with_endpoint(|ep| {
        assert_eq!(rb.compare_exchange(ep, None, Some(y)).unwrap(), Err(Some(x)), "published first by a");
        assert_eq!(rb.get(ep).unwrap(), Some(x));
        assert_eq!(rb.compare_exchange(ep, Some(x), None).unwrap(), Ok(()));
        assert_eq!(other.get(ep).unwrap(), None, "other names are untouched");
    });
    // Bad input is an error, not a corrupt table.
    assert!(matches!(a.root(NodeId(1), ""), Err(rdmem_allocator::AllocError::BadRoot { .. })));
    assert!(matches!(a.root(NodeId(7), "x"), Err(rdmem_allocator::AllocError::BadRoot { .. })));
    let zero = rdmem_core::GlobalAddr::new(NodeId(0), 0).unwrap();
    a.with_endpoint(|ep| {
        assert!(matches!(ra.compare_exchange(ep, None, Some(zero)), Err(rdmem_allocator::AllocError::BadRoot { .. })));
    });
}

#[test]
fn the_root_table_fills_up_with_an_error() {
    let transport = Arc::new(LoopbackTransport::new(&[4 << 20]));
    let a = Allocator::new(transport, options(Placement::RoundRobin, Mode::Stealing)).unwrap().thread().unwrap();
    let slots = rdmem_allocator::layout::ROOT_SLOTS;
    for i in 0..slots {
        a.root(NodeId(0), &format!("name {i}")).unwrap();
    }
    let e = a.root(NodeId(0), "one too many").unwrap_err();
    assert!(matches!(e, rdmem_allocator::AllocError::BadRoot { .. }) && e.to_string().contains("full"), "{e}");
    a.root(NodeId(0), "name 3").expect("names already there are still found");
    assert_eq!(a.find_root(NodeId(0), "one too many").unwrap(), None, "a lookup in a full table finds nothing");
}

#[test]
fn fixed_limits_and_bad_options_have_their_own_errors() {
    use rdmem_allocator::AllocError;
    let transport = Arc::new(LoopbackTransport::new(&[4 << 20]));
    let short = AllocatorOptions { lease: std::time::Duration::from_millis(1), ..AllocatorOptions::default() };
    assert!(matches!(Allocator::new(transport.clone(), short), Err(AllocError::BadOptions(_))));
    let allocator = Allocator::new(transport, options(Placement::RoundRobin, Mode::Stealing)).unwrap();
    for _ in 0..u16::MAX {
        drop(allocator.thread().unwrap());
    }
    match allocator.thread() {
        Err(AllocError::Limit { limit, .. }) => assert_eq!(limit, u16::MAX as u64),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("thread allocator 65536 was made"),
    }
    // And it stays so: ids never wrap round to ones in use.
    assert!(matches!(allocator.thread(), Err(AllocError::Limit { .. })));
}

/// Round-robin stealing clients with a lease of 8 ms: the dead are found within 16 ms.
fn quick_lease() -> AllocatorOptions {
    AllocatorOptions { lease: std::time::Duration::from_millis(8), ..options(Placement::RoundRobin, Mode::Stealing) }
}

/// What a killed client was in the middle of: claiming a run of chunks, a single large chunk
/// and small chunks of two classes, freeing the run, emptying a small chunk (released), a
/// remote free of its block by a live client, a flush that takes it back, a large free.
fn workload_to_kill(
    victim: &rdmem_allocator::ThreadAlloc<LoopbackTransport>,
    live: &rdmem_allocator::ThreadAlloc<LoopbackTransport>,
) -> rdmem_allocator::Result<()> {
    let run = victim.alloc(layout(3 * CHUNK as usize - 100, 8))?;
    let one = victim.alloc(layout(CHUNK as usize, 8))?;
    let blocks = (0..6).map(|_| victim.alloc(layout(16 << 10, 8))).collect::<rdmem_allocator::Result<Vec<_>>>()?;
    let small = victim.alloc(layout(100, 8))?;
    victim.free(run)?;
    for &b in &blocks[..4] {
        victim.free(b)?; // the first 16 KiB chunk is empty and not current: released
    }
    live.free(small).expect("the live client's remote free");
    victim.flush()?;
    victim.free(one)?;
    Ok(())
}

/// Every chunk of both nodes can be claimed again (one chunk-sized block each), and is given
/// back.
fn assert_every_chunk_claimable(allocator: &Allocator<LoopbackTransport>) {
    let thread = allocator.thread().unwrap();
    let total: u64 = thread.usage().unwrap().iter().map(|u| u.chunks_total - u.chunks_used).sum();
    let mut taken = Vec::new();
    while let Ok(addr) = thread.alloc(layout(CHUNK as usize, 8)) {
        taken.push(addr);
    }
    assert_eq!(taken.len() as u64, total, "every free chunk can be claimed");
    for addr in taken {
        thread.free(addr).unwrap();
    }
}

/// A client killed at each network operation of [`workload_to_kill`] in turn leaks nothing:
/// once it is reclaimed, usage is where it started and every chunk can be claimed again.
/// (Format version 3 set a chunk's bit, then bumped a counter, then wrote the owner: a client
/// killed in between left a chunk nobody could reclaim.)
#[test]
fn a_client_killed_at_any_operation_leaks_nothing() {
    let transport = two_nodes(4 << 20);
    let quick = quick_lease();
    let reclaimer = Allocator::new(Arc::clone(&transport), quick).unwrap();
    let live = reclaimer.thread().unwrap();
    let before = live.usage().unwrap();
    let mut kill_at = 0;
    loop {
        let (process, kill) = transport.process();
        let victim = Allocator::new(Arc::new(process), quick).unwrap();
        let thread = victim.thread().unwrap();
        victim.stop_heartbeat(); // its beats would spend the operations counted here
        kill.after(kill_at);
        let finished = workload_to_kill(&thread, &live).is_ok();
        kill.now();
        drop((thread, victim)); // as a killed process: nothing it does now takes effect
        let done = reclaimer.reclaim_dead_clients_now().unwrap();
        assert_eq!(done.clients.len(), 1, "killed after {kill_at} operations: {done:?}");
        assert_eq!(live.usage().unwrap(), before, "killed after {kill_at} operations: {done:?}");
        if finished {
            break;
        }
        kill_at += 1;
    }
    assert!(kill_at > 20, "the workload ran to its end after {kill_at} operations");
    assert_every_chunk_claimable(&reclaimer);
}

/// A reclaimer killed at each operation of its reclaim leaks nothing either: the next
/// reclaimer finishes its work (chunks it was releasing name it, and it is dead too).
#[test]
fn a_reclaimer_killed_at_any_operation_leaks_nothing() {
    let transport = two_nodes(4 << 20);
    let quick = quick_lease();
    let reclaimer = Allocator::new(Arc::clone(&transport), quick).unwrap();
    let before = reclaimer.thread().unwrap().usage().unwrap();
    let mut kill_at = 0;
    loop {
        // A dead client holding a run, a large chunk and small chunks on both nodes.
        let dead = Allocator::new(Arc::clone(&transport), quick).unwrap();
        let thread = dead.thread().unwrap();
        for size in [3 * CHUNK as usize - 100, CHUNK as usize, 100, 16 << 10, 3 * CHUNK as usize, 200] {
            thread.alloc(layout(size, 8)).unwrap();
        }
        dead.stop_heartbeat();
        std::mem::forget((thread, dead));
        let (process, kill) = transport.process();
        let first = Allocator::new(Arc::new(process), quick).unwrap();
        first.stop_heartbeat();
        kill.after(kill_at);
        let finished = first.reclaim_dead_clients_now().is_ok();
        kill.now();
        drop(first);
        let done = reclaimer.reclaim_dead_clients_now().unwrap();
        assert_eq!(reclaimer.thread().unwrap().usage().unwrap(), before, "killed after {kill_at} operations: {done:?}");
        if finished {
            break;
        }
        kill_at += 1;
    }
    assert!(kill_at > 10, "the reclaim ran to its end after {kill_at} operations");
    assert_every_chunk_claimable(&reclaimer);
}

/// A chunk whose bit is set with no owner (no client leaves one, but a fuzzy snapshot taken
/// while a chunk was released can restore one) is released by the next reclaim.
#[test]
fn a_chunk_claimed_by_nobody_is_reclaimed() {
    let transport = two_nodes(4 << 20);
    let allocator = Allocator::new(Arc::clone(&transport), options(Placement::RoundRobin, Mode::Stealing)).unwrap();
    let thread = allocator.thread().unwrap();
    let before = thread.usage().unwrap();
    let geo = rdmem_allocator::layout::Geometry::plan(4 << 20, CHUNK).unwrap();
    let word = rdmem_core::GlobalAddr::new(NodeId(0), geo.bitmap_offset).unwrap();
    thread.with_endpoint(|ep| rdmem_core::Endpoint::faa(ep, word, 1 << 5)).unwrap();
    assert_eq!(thread.usage().unwrap()[0].chunks_used, before[0].chunks_used + 1);
    let done = allocator.reclaim_dead_clients_now().unwrap();
    assert_eq!(done.chunks, vec![(NodeId(0), 1)], "{done:?}");
    assert_eq!(thread.usage().unwrap(), before);
    assert_every_chunk_claimable(&allocator);
}

/// Three client processes racing a live one for chunks of two nodes (small blocks, runs of
/// chunks, frees of each other's blocks), each killed after a different number of its
/// operations, 20 times over: after the reclaim, usage is where it started and every chunk
/// can be claimed.
#[test]
fn clients_killed_while_racing_for_chunks_leak_nothing() {
    let transport = two_nodes(16 << 20);
    let quick = quick_lease();
    let reclaimer = Allocator::new(Arc::clone(&transport), quick).unwrap();
    let before = reclaimer.thread().unwrap().usage().unwrap();
    // The victims' live blocks, freed by another victim or by the live client.
    let handed: Arc<Mutex<Vec<rdmem_core::GlobalAddr>>> = Arc::default();
    for round in 0..20u64 {
        let victims: Vec<_> = (0..3u64)
            .map(|v| {
                let (process, kill) = transport.process();
                let allocator = Allocator::new(Arc::new(process), quick).unwrap();
                allocator.stop_heartbeat();
                kill.after(40 + (round * 37 + v * 101) % 300);
                let handed = Arc::clone(&handed);
                std::thread::spawn(move || {
                    let thread = allocator.thread().unwrap();
                    let mut rng = round * 3 + v + 1;
                    let mut mine = Vec::new();
                    for _ in 0..2000 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let done = match rng % 8 {
                            0 => thread.alloc(layout(2 * CHUNK as usize + 1, 8)).map(|a| mine.push(a)),
                            1..=4 => thread.alloc(layout(1 << (4 + rng % 11), 8)).map(|a| mine.push(a)),
                            5 => handed.lock().unwrap().pop().map_or(Ok(()), |a| thread.free(a)),
                            6 if !mine.is_empty() => {
                                handed.lock().unwrap().push(mine.swap_remove(rng as usize % mine.len()));
                                Ok(())
                            }
                            _ => mine.pop().map_or(Ok(()), |a| thread.free(a)),
                        };
                        if let Err(e) = done {
                            assert!(kill.fired(), "only the kill stops a victim: {e}");
                            break;
                        }
                    }
                    kill.now();
                })
            })
            .collect();
        let thread = reclaimer.thread().unwrap();
        let mut kept = Vec::new();
        for i in 0..200 {
            let a = thread.alloc(layout(if i % 5 == 0 { 3 * CHUNK as usize } else { 700 }, 8)).unwrap();
            if i % 3 == 1 {
                kept.push(a);
            } else {
                thread.free(a).unwrap();
            }
            if let Some(b) = handed.lock().unwrap().pop() {
                thread.free(b).unwrap(); // a victim's block: dead or alive, not yet reclaimed
            }
        }
        for v in victims {
            v.join().unwrap();
        }
        for a in kept {
            thread.free(a).unwrap();
        }
        thread.flush().unwrap();
        drop(thread);
        handed.lock().unwrap().clear(); // freed with their dead owners
        let done = reclaimer.reclaim_dead_clients_now().unwrap();
        assert_eq!(done.clients.len(), 3, "round {round}: {done:?}");
        assert_eq!(reclaimer.thread().unwrap().usage().unwrap(), before, "round {round}: {done:?}");
    }
    assert_every_chunk_claimable(&reclaimer);
}
