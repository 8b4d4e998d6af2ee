//! The DSM's control block in remote memory, and how shared addresses map to homes.
//!
//! ```text
//! allocator root "rdmem-dsm/control" (node 0): the control block's address with its instance
//!   in the low 12 bits (a tag: a later block at the same address is another value), or empty
//! control block (node 0), zeroed on creation:
//!   0      MAGIC, JOB (hash of the job name), SIZE (ranks), JOINED, LEFT (fetch-and-add),
//!          HEARTBEAT (every rank adds 1 every lease / 4: a job whose word stays put is dead),
//!          LEASE_MS (the job's lease, so a later job knows how long to watch the heartbeat),
//!          INSTANCE (tells this block from another made later at the same address)
//!   64     barrier: COUNTER, EPOCH, END (ring position the last round ended at), RING_HEAD
//!   96     CREATOR (rank + 1 of the rank that made the block: it frees it at leave),
//!          CHECKPOINT_SEQ (the checkpoint the memory nodes' state belongs to, 0: none),
//!          CHECKPOINT_ROUNDS (checkpoint attempts << 1 | 1 if the last one failed),
//!          RESUMED (ranks that resumed the job from its checkpoint, fetch-and-add)
//!   128    barrier notice ring: BARRIER_RING words
//!   LOCKS  LOCK_COUNT locks of LOCK_BYTES: lock word, notice head, LOCK_RING notice words
//!   ALLOCS ALLOC_COUNT entries of ALLOC_BYTES: state (0 free, 1 claimed, 2 ready), bytes,
//!          stripe pages, node count, the allocating rank, then one base address per node
//! ```
//! A write notice is `(rank + 1) << 48 | (page + 1)`; 0 is an empty slot.
//!
//! Shared addresses: allocation `i` covers `i << ALLOC_SHIFT ..`; its pages are striped over
//! the memory nodes `STRIPE_PAGES` at a time (stripe `k` on node `k % nodes`), each node holding
//! its stripes one after the other from its base address.

use super::PageId;
use rdmem_cache::PAGE_SIZE;

/// "RDMDSM01".
pub const MAGIC: u64 = u64::from_le_bytes(*b"RDMDSM01");
/// Header words.
pub const JOB: u64 = 8;
/// Ranks in the job.
pub const SIZE: u64 = 16;
/// Ranks that joined (FAA).
pub const JOINED: u64 = 24;
/// Ranks that left (FAA).
pub const LEFT: u64 = 32;
/// The job's heartbeat (every rank's [`rdmem_core::heartbeat::Heartbeat`]).
pub const HEARTBEAT: u64 = 40;
/// The job's lease in milliseconds.
pub const LEASE_MS: u64 = 48;
/// A number unique to this control block.
pub const INSTANCE: u64 = 56;
/// Barrier arrivals (only grows).
pub const BARRIER_COUNTER: u64 = 64;
/// Barrier rounds completed.
pub const BARRIER_EPOCH: u64 = 72;
/// The barrier ring position the last completed round ended at.
pub const BARRIER_END: u64 = 80;
/// Barrier notices appended so far (FAA).
pub const BARRIER_HEAD: u64 = 88;
/// Rank + 1 of the control block's creator.
pub const CREATOR: u64 = 96;
/// The sequence number of the checkpoint in progress or last taken (0: none): written before
/// the memory nodes' snapshots, so each snapshot holds the number it was taken as.
pub const CHECKPOINT_SEQ: u64 = 104;
/// Checkpoint attempts so far, shifted left by one, with bit 0 set if the last one failed:
/// rank 0 writes it when the snapshots are done, the others wait for it to change.
pub const CHECKPOINT_ROUNDS: u64 = 112;
/// Ranks that resumed the job from a checkpoint (zeroed in every snapshot).
pub const RESUMED: u64 = 120;
/// The barrier notice ring.
pub const BARRIER_RING_AT: u64 = 128;
/// Slots of the barrier ring.
pub const BARRIER_RING: u64 = 4096;
/// Where the locks start.
pub const LOCKS: u64 = BARRIER_RING_AT + BARRIER_RING * 8;
/// Locks in the table.
pub const LOCK_COUNT: u64 = 64;
/// Notice slots per lock.
pub const LOCK_RING: u64 = 254;
/// Bytes per lock: word, head, ring.
pub const LOCK_BYTES: u64 = 16 + LOCK_RING * 8;
/// Where the allocation log starts.
pub const ALLOCS: u64 = LOCKS + LOCK_COUNT * LOCK_BYTES;
/// Allocations a job can make.
pub const ALLOC_COUNT: u64 = 256;
/// Memory nodes an allocation can spread over.
pub const MAX_NODES: usize = 12;
/// Bytes per allocation entry.
pub const ALLOC_BYTES: u64 = 40 + 8 * MAX_NODES as u64;
/// The control block's size.
pub const CONTROL_BYTES: u64 = ALLOCS + ALLOC_COUNT * ALLOC_BYTES;

const _: () = assert!(CONTROL_BYTES < 1 << 20, "the control block fits in one allocation");

/// Allocation entry states.
pub const ALLOC_CLAIMED: u64 = 1;
/// The entry's fields are written.
pub const ALLOC_READY: u64 = 2;

/// Bits of a shared address inside its allocation: 64 GiB per allocation.
pub const ALLOC_SHIFT: u32 = 36;
/// Pages per stripe: the unit of placement and of read-ahead.
pub const STRIPE_PAGES: u64 = 16;

/// The offset of lock `id`'s word in the control block.
pub fn lock_at(id: u64) -> u64 {
    LOCKS + id * LOCK_BYTES
}

/// The offset of allocation `i`'s entry.
pub fn alloc_at(i: u64) -> u64 {
    ALLOCS + i * ALLOC_BYTES
}

/// A write notice for `page` by `rank`.
pub fn notice(rank: u32, page: PageId) -> u64 {
    (rank as u64 + 1) << 48 | (page + 1)
}

/// The rank and page of a notice; `None` for an empty slot.
pub fn parse_notice(word: u64) -> Option<(u32, PageId)> {
    let rank = word >> 48;
    let page = word & ((1 << 48) - 1);
    (rank != 0 && page != 0).then(|| ((rank - 1) as u32, page - 1))
}

/// FNV-1a of the job name: a job's ranks must agree on it.
pub fn job_hash(job: &str) -> u64 {
    job.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)) | 1
}

/// Where page `page_in_alloc` of an allocation with `nodes` nodes lives: (node index, byte
/// offset from that node's base, pages left in its stripe).
pub fn place(page_in_alloc: u64, nodes: u64) -> (usize, u64, u32) {
    let stripe = page_in_alloc / STRIPE_PAGES;
    let within = page_in_alloc % STRIPE_PAGES;
    let node = (stripe % nodes) as usize;
    let local_stripe = stripe / nodes;
    ((node), (local_stripe * STRIPE_PAGES + within) * PAGE_SIZE as u64, (STRIPE_PAGES - within) as u32)
}

/// Bytes each node holds for an allocation of `bytes` over `nodes` nodes.
pub fn per_node_bytes(bytes: u64, nodes: u64) -> u64 {
    let pages = bytes.div_ceil(PAGE_SIZE as u64);
    let stripes = pages.div_ceil(STRIPE_PAGES);
    stripes.div_ceil(nodes) * STRIPE_PAGES * PAGE_SIZE as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_go_round_the_nodes_and_stay_inside_each_node_share() {
        let (nodes, bytes) = (3, 100 * PAGE_SIZE as u64);
        let share = per_node_bytes(bytes, nodes);
        let mut seen = std::collections::HashSet::new();
        for page in 0..100 {
            let (node, offset, left) = place(page, nodes);
            assert_eq!(node as u64, (page / STRIPE_PAGES) % nodes);
            assert!(offset + PAGE_SIZE as u64 <= share, "page {page} beyond its node's share");
            assert!(seen.insert((node, offset)), "two pages at one place");
            assert_eq!(left as u64, STRIPE_PAGES - page % STRIPE_PAGES);
        }
        assert_eq!(parse_notice(notice(3, 77)), Some((3, 77)));
        assert_eq!(parse_notice(0), None);
    }
}
