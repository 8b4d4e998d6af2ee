//! The allocator on the loopback transport: random alloc/free sequences from several threads
//! of several clients, every bad input, placement and the two multi-node modes.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rdmem_allocator::{AllocError, Allocator, AllocatorOptions, Mode, Placement, ThreadAlloc};
use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, Transport};

const CHUNK: u64 = 64 << 10;

fn options(placement: Placement, mode: Mode) -> AllocatorOptions {
    AllocatorOptions { chunk_size: CHUNK, placement, mode }
}

/// Live blocks of every thread and client: (node, offset) -> length. Overlaps are checked on
/// every insert.
#[derive(Default)]
struct Live(Mutex<BTreeMap<(u16, u64), u64>>);

impl Live {
    fn insert(&self, addr: GlobalAddr, len: u64) {
        let mut map = self.0.lock().unwrap();
        let key = (addr.node().0, addr.offset());
        if let Some((&(n, off), &l)) = map.range(..=key).next_back() {
            assert!(n != key.0 || off + l <= key.1, "{addr} overlaps the live block at {n}:{off:#x}+{l}");
        }
        if let Some((&(n, off), _)) = map.range(key..).next() {
            assert!(n != key.0 || key.1 + len <= off, "{addr}+{len} overlaps the live block at {n}:{off:#x}");
        }
        map.insert(key, len);
    }

    fn remove(&self, addr: GlobalAddr) {
        assert!(self.0.lock().unwrap().remove(&(addr.node().0, addr.offset())).is_some());
    }
}

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (tag.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}

#[derive(Debug, Clone)]
enum Step {
    Alloc {
        size: u64,
        align_shift: u32,
    },
    /// Free the n-th (mod count) live block of this thread, or give it to the hand-over pile.
    Free {
        pick: usize,
        hand_over: bool,
    },
    /// Free a block some other thread or client handed over.
    FreeHandedOver,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u64..600, 0u32..7).prop_map(|(size, align_shift)| Step::Alloc { size, align_shift }),
        1 => (20_000u64..200_000, 0u32..3).prop_map(|(size, align_shift)| Step::Alloc { size, align_shift }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, hand_over)| Step::Free { pick, hand_over }),
        1 => Just(Step::FreeHandedOver),
    ]
}

struct Block {
    addr: GlobalAddr,
    len: u64,
    tag: u64,
}

fn check_and_free<T: Transport>(alloc: &ThreadAlloc<T>, live: &Live, block: Block) {
    let mut back = vec![0u8; block.len as usize];
    alloc.with_endpoint(|ep| ep.read(block.addr, &mut back)).unwrap();
    assert!(back == pattern(block.tag, block.len as usize), "block at {} was overwritten", block.addr);
    live.remove(block.addr);
    alloc.free(block.addr).unwrap();
}

fn run_thread<T: Transport>(
    alloc: &ThreadAlloc<T>,
    steps: &[Step],
    live: &Live,
    pile: &Mutex<Vec<Block>>,
    tag_base: u64,
) {
    let mut mine: Vec<Block> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Alloc { size, align_shift } => {
                let align = 1u64 << align_shift;
                let addr = match alloc.alloc(Layout::from_size_align(size as usize, align as usize).unwrap()) {
                    Ok(addr) => addr,
                    Err(AllocError::OutOfMemory { .. }) => continue,
                    Err(e) => panic!("alloc({size}, {align}): {e}"),
                };
                assert_eq!(addr.offset() % align, 0, "alignment {align} of {addr}");
                live.insert(addr, size);
                let tag = tag_base + i as u64;
                alloc.with_endpoint(|ep| ep.write(addr, &pattern(tag, size as usize))).unwrap();
                mine.push(Block { addr, len: size, tag });
            }
            Step::Free { pick, hand_over } if !mine.is_empty() => {
                let block = mine.swap_remove(pick % mine.len());
                if hand_over {
                    pile.lock().unwrap().push(block);
                } else {
                    check_and_free(alloc, live, block);
                }
            }
            Step::FreeHandedOver => {
                let block = pile.lock().unwrap().pop();
                if let Some(block) = block {
                    check_and_free(alloc, live, block);
                }
            }
            Step::Free { .. } => {}
        }
    }
    for block in mine {
        check_and_free(alloc, live, block);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// 2 clients x 4 threads on 2 nodes: no two live blocks overlap, every block keeps its
    /// bytes until freed, alignment holds, and usage returns exactly to where it started.
    #[test]
    fn random_sequences_from_two_clients_of_four_threads(
        scripts in proptest::collection::vec(proptest::collection::vec(step(), 1..120), 8)
    ) {
        let transport = Arc::new(LoopbackTransport::new(&[16 << 20, 16 << 20]));
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
                    run_thread(&alloc, script, live, pile, (t as u64) << 32);
                    alloc.flush().unwrap();
                });
            }
        });
        // What was handed over and never taken: free it from a fresh thread of client 0.
        let last = clients[0].thread().unwrap();
        for block in pile.into_inner().unwrap() {
            check_and_free(&last, &live, block);
        }
        drop(last);
        // Frees into chunks of threads that had already ended went to those chunks' remote
        // free lists; one more flush per client adopts the ended threads' chunks and takes
        // them back.
        for client in &clients {
            client.thread().unwrap().flush().unwrap();
        }
        prop_assert!(live.0.lock().unwrap().is_empty());
        let end = clients[0].thread().unwrap().usage().unwrap();
        prop_assert_eq!(end, start, "usage must return to its starting value");
    }
}
