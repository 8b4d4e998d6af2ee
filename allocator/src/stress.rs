//! A checked random workload: allocations and frees from several threads, with blocks handed
//! between threads (and so freed remotely), every block filled with its own pattern and checked
//! before it is freed, and no two live blocks of the process overlapping. Used by the tests
//! (with proptest's scripts) and by `rdmem-pools stress` (against real memory nodes, from
//! several processes at once: overlaps across processes show up as damaged patterns).

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::Mutex;

use rdmem_core::{Endpoint, GlobalAddr, Transport};

use crate::alloc::{Allocator, ThreadAlloc};
use crate::error::AllocError;

/// One step of a thread's script.
#[derive(Debug, Clone)]
pub enum Step {
    /// Allocate `size` bytes aligned to `2^align_shift`.
    Alloc {
        /// Bytes.
        size: u64,
        /// log2 of the alignment.
        align_shift: u32,
    },
    /// Free the `pick % live`-th block of this thread, or hand it over to the shared pile.
    Free {
        /// Which block.
        pick: usize,
        /// Hand it over instead of freeing it.
        hand_over: bool,
    },
    /// Free a block another thread handed over (freed remotely if that thread owns it).
    FreeHandedOver,
}

/// A live block and the tag its pattern derives from.
#[derive(Debug)]
pub struct Block {
    addr: GlobalAddr,
    len: u64,
    tag: u64,
}

/// The live blocks of a process, (node, offset) -> length; inserts check for overlaps.
#[derive(Debug, Default)]
pub struct Live(Mutex<BTreeMap<(u16, u64), u64>>);

impl Live {
    fn insert(&self, addr: GlobalAddr, len: u64) -> Result<(), String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.node().0, addr.offset());
        if let Some((&(n, off), &l)) = map.range(..=key).next_back() {
            if n == key.0 && off + l > key.1 {
                return Err(format!("{addr}+{len} overlaps the live block at {n}:{off:#x}+{l}"));
            }
        }
        if let Some((&(n, off), _)) = map.range(key..).next() {
            if n == key.0 && key.1 + len > off {
                return Err(format!("{addr}+{len} overlaps the live block at {n}:{off:#x}"));
            }
        }
        map.insert(key, len);
        Ok(())
    }

    fn remove(&self, addr: GlobalAddr) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&(addr.node().0, addr.offset()));
    }

    /// True when no block is live.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Successful allocations.
    pub allocs: u64,
    /// Frees (own and handed over).
    pub frees: u64,
    /// Frees of blocks handed over by another thread.
    pub handed_over: u64,
    /// Allocations refused with OutOfMemory (skipped).
    pub out_of_memory: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.allocs += o.allocs;
        self.frees += o.frees;
        self.handed_over += o.handed_over;
        self.out_of_memory += o.out_of_memory;
    }
}

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (tag.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}

/// Checks a block's pattern, then frees it.
pub fn check_and_free<T: Transport>(alloc: &ThreadAlloc<T>, live: &Live, block: Block) -> Result<(), String> {
    let mut back = vec![0u8; block.len as usize];
    alloc.with_endpoint(|ep| ep.read(block.addr, &mut back)).map_err(|e| format!("READ {}: {e}", block.addr))?;
    if back != pattern(block.tag, block.len as usize) {
        return Err(format!("the block at {} ({} bytes) was overwritten while live", block.addr, block.len));
    }
    live.remove(block.addr);
    alloc.free(block.addr).map_err(|e| format!("free {}: {e}", block.addr))
}

/// Runs one thread's script; frees what it still holds at the end.
pub fn run_steps<T: Transport>(
    alloc: &ThreadAlloc<T>,
    steps: impl IntoIterator<Item = Step>,
    live: &Live,
    pile: &Mutex<Vec<Block>>,
    tag_base: u64,
) -> Result<Counts, String> {
    let mut mine: Vec<Block> = Vec::new();
    let mut counts = Counts::default();
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Step::Alloc { size, align_shift } => {
                let align = 1u64 << align_shift;
                let layout = Layout::from_size_align(size as usize, align as usize).map_err(|e| e.to_string())?;
                let addr = match alloc.alloc(layout) {
                    Ok(addr) => addr,
                    Err(AllocError::OutOfMemory { .. }) => {
                        counts.out_of_memory += 1;
                        continue;
                    }
                    Err(e) => return Err(format!("alloc({size}, {align}): {e}")),
                };
                if addr.offset() % align != 0 {
                    return Err(format!("{addr} is not aligned to {align}"));
                }
                live.insert(addr, size)?;
                let tag = tag_base + i as u64;
                alloc.with_endpoint(|ep| ep.write(addr, &pattern(tag, size as usize))).map_err(|e| e.to_string())?;
                mine.push(Block { addr, len: size, tag });
                counts.allocs += 1;
            }
            Step::Free { pick, hand_over } if !mine.is_empty() => {
                let block = mine.swap_remove(pick % mine.len());
                if hand_over {
                    pile.lock().unwrap_or_else(|p| p.into_inner()).push(block);
                } else {
                    check_and_free(alloc, live, block)?;
                    counts.frees += 1;
                }
            }
            Step::FreeHandedOver => {
                let block = pile.lock().unwrap_or_else(|p| p.into_inner()).pop();
                if let Some(block) = block {
                    check_and_free(alloc, live, block)?;
                    counts.frees += 1;
                    counts.handed_over += 1;
                }
            }
            Step::Free { .. } => {}
        }
    }
    for block in mine {
        check_and_free(alloc, live, block)?;
        counts.frees += 1;
    }
    Ok(counts)
}

/// A random script of `len` steps from `seed` (xorshift; the same seed gives the same script).
/// Sizes 1..600 bytes mostly, sometimes 20 KB..200 KB; alignments up to 64.
pub fn random_steps(seed: u64, len: usize) -> impl Iterator<Item = Step> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..len).map(move |_| match next() % 9 {
        0..=3 => Step::Alloc { size: 1 + next() % 600, align_shift: (next() % 7) as u32 },
        4 => Step::Alloc { size: 20_000 + next() % 180_000, align_shift: (next() % 3) as u32 },
        5..=7 => Step::Free { pick: next() as usize, hand_over: next() % 2 == 0 },
        _ => Step::FreeHandedOver,
    })
}

/// `threads` threads run random scripts of `steps` steps; then everything left is freed and
/// every arena flushed. Errors on any damaged block, overlap or failed operation.
pub fn stress<T: Transport>(
    allocator: &Allocator<T>,
    threads: usize,
    steps: usize,
    seed: u64,
) -> Result<Counts, String> {
    let (live, pile) = (Live::default(), Mutex::new(Vec::new()));
    let results: Vec<Result<Counts, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (live, pile) = (&live, &pile);
                s.spawn(move || {
                    let alloc = allocator.thread().map_err(|e| e.to_string())?;
                    let seed = seed.wrapping_add(t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let counts =
                        run_steps(&alloc, random_steps(seed, steps), live, pile, (t as u64) << 40 | seed >> 40)?;
                    alloc.flush().map_err(|e| e.to_string())?;
                    Ok(counts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a stress thread panicked".into()))).collect()
    });
    let mut total = Counts::default();
    for r in results {
        total += r?;
    }
    let last = allocator.thread().map_err(|e| e.to_string())?;
    for block in pile.into_inner().unwrap_or_else(|p| p.into_inner()) {
        check_and_free(&last, &live, block)?;
        total.frees += 1;
    }
    last.flush().map_err(|e| e.to_string())?;
    if !live.is_empty() {
        return Err("blocks are still live after the run".into());
    }
    Ok(total)
}
