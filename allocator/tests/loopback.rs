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
