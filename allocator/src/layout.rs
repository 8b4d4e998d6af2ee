//! The on-pool format: header, chunk bitmap, chunk descriptors, chunks. Pure arithmetic.
//!
//! ```text
//! offset 0              header (HEADER_BYTES): magic, state, version, geometry, counters;
//!                       the named roots at ROOTS
//! CLIENTS               the client table (CLIENT_SLOTS slots; used on the cluster's first node)
//! bitmap_offset         one bit per chunk, 1 = claimed; u64 words claimed with CAS
//! desc_offset           one Descriptor (DESC_BYTES) per chunk: owner, class, remote free list
//! data_offset           chunk_count chunks of chunk_size bytes, data_offset % chunk_size == 0
//! ```
//! Invariants: `data_offset + chunk_count * chunk_size <= pool_size`; a chunk's bit is set only
//! while its descriptor's owner word is not 0. The owner word is the truth: a client claims a
//! chunk by CASing it from 0 *before* setting the bit, and releases it by clearing the bit
//! *before* zeroing the word. So a client killed at any point of a claim or a release leaves a
//! chunk whose owner names it (a dead client), which [`crate::Allocator::reclaim_dead_clients`]
//! takes back, never a set bit nobody owns. Usage is the bitmap's population count.
//! Every field is a little-endian u64 so it can be read, written and CASed as a word.

/// "RDMPOOL1", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RDMPOOL1");
/// Format version (2: the client table; 3: the named roots; 4: chunks claimed by their owner
/// word, continuation chunks naming their head, no usage counter).
pub const VERSION: u64 = 4;
/// Bytes reserved for the header at offset 0.
pub const HEADER_BYTES: u64 = 4096;
/// Bytes of one chunk descriptor.
pub const DESC_BYTES: u64 = 32;
/// Smallest block: room for the remote free list's next pointer and the freed mark.
pub const MIN_BLOCK: u64 = 16;

/// Where the named roots ([`crate::roots`]) start, inside the header: [`ROOT_SLOTS`] slots of
/// (name key, value), zero in a fresh pool.
pub const ROOTS: u64 = 1024;
/// Slots of the root table.
pub const ROOT_SLOTS: u64 = 64;
/// Bytes of one root slot.
pub const ROOT_SLOT_BYTES: u64 = 16;
const _: () = assert!(ROOTS >= 136 && ROOTS + ROOT_SLOTS * ROOT_SLOT_BYTES <= HEADER_BYTES);

/// Where the client table starts: right after the header.
pub const CLIENTS: u64 = HEADER_BYTES;
/// Slots of the client table: live clients of a cluster at once.
pub const CLIENT_SLOTS: u64 = 1024;
/// Bytes of one client slot.
pub const CLIENT_SLOT_BYTES: u64 = 32;
/// Bytes of the client table.
pub const CLIENT_TABLE_BYTES: u64 = CLIENT_SLOTS * CLIENT_SLOT_BYTES;

/// Word offsets in a client slot. A live client holds a slot (CAS of ID from 0) and beats it
/// (fetch-and-add on BEAT every LEASE_MS / 4 ms); a client that exits clears ID. Chunks whose
/// owner's client holds no slot, or one whose beat stopped, belong to a dead client.
pub mod client {
    /// The client id, 0 for a free slot.
    pub const ID: u64 = 0;
    /// The heartbeat counter.
    pub const BEAT: u64 = 8;
    /// The client's lease in milliseconds: dead after two of them without a beat.
    pub const LEASE_MS: u64 = 16;
}

/// Header word offsets.
pub mod header {
    /// [`super::MAGIC`], written by the formatter.
    pub const MAGIC: u64 = 0;
    /// 0 = never formatted; [`super::STATE_FORMATTING`] | client id << 8 while formatting;
    /// [`super::STATE_READY`] once the geometry is written. Claimed with CAS.
    pub const STATE: u64 = 8;
    /// [`super::VERSION`].
    pub const VERSION: u64 = 16;
    /// The pool size the formatter saw.
    pub const POOL_SIZE: u64 = 24;
    /// Chunk size in bytes.
    pub const CHUNK_SIZE: u64 = 32;
    /// Number of chunks.
    pub const CHUNK_COUNT: u64 = 40;
    /// Offset of the chunk bitmap.
    pub const BITMAP: u64 = 48;
    /// Offset of the descriptors.
    pub const DESCRIPTORS: u64 = 56;
    /// Offset of chunk 0.
    pub const DATA: u64 = 64;
    // Word 72 is unused (version 3 kept a usage counter there).
    /// The next client id to hand out (fetch-and-add, starts at 0: ids are this + 1).
    pub const NEXT_CLIENT: u64 = 80;
    /// Bytes of the geometry written in one WRITE: MAGIC..=DATA.
    pub const GEOMETRY_BYTES: usize = 72;
}

/// Header state: formatting in progress (low byte; the client id is in the bits above).
pub const STATE_FORMATTING: u64 = 1;
/// Header state: formatted and usable.
pub const STATE_READY: u64 = 2;

/// Descriptor word offsets (from the descriptor's start).
pub mod desc {
    /// Who holds the chunk; 0 when it is free. Claimed by CAS from 0. One of:
    /// - [`super::owner`] (the node of the owner's client table << 48 | client id << 16 |
    ///   arena id, arena >= 1): a small chunk, or the first chunk of a large allocation;
    /// - [`super::releasing`] (arena 0): the chunk is being released by that client. Freeing a
    ///   large allocation starts with a CAS from its owner to this, which is how a second free
    ///   of the same block is caught;
    /// - [`super::continuation`]: a later chunk of the large allocation whose first chunk is
    ///   named; it is claimed and released with that one.
    pub const OWNER: u64 = 0;
    /// The block size for small chunks; [`super::LARGE`] | span for the first chunk of a large
    /// allocation; [`super::CONTINUATION`] for its other chunks.
    pub const CLASS: u64 = 8;
    /// Head of the remote free list (a raw GlobalAddr of a free block, 0 = empty). Pushed
    /// with CAS by other threads and clients, taken whole by the owner.
    pub const REMOTE_FREE: u64 = 16;
}

/// A block on a remote free list: word 0 is the next block's raw address (0 ends the list),
/// word 1 is [`freed_mark`] of the block's address and its chunk's owner word, so that a
/// second remote free of the same block is caught at once (blocks are at least
/// [`MIN_BLOCK`] = 16 bytes). The owner clears word 1 when it takes the block back, before
/// handing the block out again. A block left on the list of a dead client's chunk keeps its
/// mark, but the chunk's next owner has another owner word, so the mark no longer matches.
pub const FREED_MAGIC: u64 = u64::from_le_bytes(*b"RDMFREED");

/// Word 1 of `block` (a raw `GlobalAddr`) while it is on the remote free list of its chunk,
/// whose owner word is `owner`.
pub fn freed_mark(block: u64, owner: u64) -> u64 {
    FREED_MAGIC ^ block ^ owner.rotate_left(17)
}

/// Client ids are at most this (bit 47 of an owner word marks a continuation).
pub const MAX_CLIENT_ID: u64 = (1 << 31) - 1;

/// Bit 47 of an owner word: [`continuation`].
const CONTINUATION_OWNER: u64 = 1 << 47;

/// The owner word of chunks claimed by `arena` (at least 1) of client `client` (at most
/// [`MAX_CLIENT_ID`]), whose slot is in the client table of node `table` (the first node of
/// its cluster).
pub fn owner(table: u16, client: u64, arena: u16) -> u64 {
    (table as u64) << 48 | (client & MAX_CLIENT_ID) << 16 | arena as u64
}

/// The owner word a client puts on a chunk it is releasing (arena 0 of its owner words): if it
/// dies before the release is done, the chunk is a dead client's and is reclaimed.
pub fn releasing(table: u16, client: u64) -> u64 {
    owner(table, client, 0)
}

/// True for a [`releasing`] owner word.
pub fn is_releasing(owner: u64) -> bool {
    owner != 0 && !is_continuation(owner) && owner & 0xffff == 0
}

/// The owner word of a later chunk of the large allocation whose first chunk is `head`.
pub fn continuation(table: u16, head: u64) -> u64 {
    (table as u64) << 48 | CONTINUATION_OWNER | (head & (CONTINUATION_OWNER - 1))
}

/// True for a [`continuation`] owner word.
pub fn is_continuation(owner: u64) -> bool {
    owner & CONTINUATION_OWNER != 0
}

/// The client table node and client id of an owner word ([`owner`] or [`releasing`]).
pub fn owner_client(owner: u64) -> (u16, u64) {
    ((owner >> 48) as u16, (owner >> 16) & MAX_CLIENT_ID)
}

/// Class flag: first chunk of a large allocation; the low bits hold the span in chunks.
pub const LARGE: u64 = 1 << 63;
/// Class value: a later chunk of a large allocation (its owner word is a [`continuation`]).
pub const CONTINUATION: u64 = 1 << 62;

/// Where everything lives in a formatted pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Pool size.
    pub pool_size: u64,
    /// Chunk size, a power of two.
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Offset of the bitmap.
    pub bitmap_offset: u64,
    /// Offset of the descriptors.
    pub desc_offset: u64,
    /// Offset of chunk 0.
    pub data_offset: u64,
}

impl Geometry {
    /// The largest layout of `chunk_size` chunks that fits `pool_size`, or `None` when not
    /// even one chunk fits or `chunk_size` is not a power of two of at least 4 KiB.
    pub fn plan(pool_size: u64, chunk_size: u64) -> Option<Self> {
        if !chunk_size.is_power_of_two() || chunk_size < 4096 {
            return None;
        }
        // An upper bound (ignoring the bitmap and alignment), then down until it fits.
        let mut count = pool_size.checked_sub(HEADER_BYTES + CLIENT_TABLE_BYTES)? / (chunk_size + DESC_BYTES);
        while count > 0 {
            let bitmap_offset = HEADER_BYTES + CLIENT_TABLE_BYTES;
            let desc_offset = bitmap_offset + count.div_ceil(64) * 8;
            let data_offset = (desc_offset + count * DESC_BYTES).next_multiple_of(chunk_size);
            if data_offset + count * chunk_size <= pool_size {
                return Some(Geometry {
                    pool_size,
                    chunk_size,
                    chunk_count: count,
                    bitmap_offset,
                    desc_offset,
                    data_offset,
                });
            }
            count -= 1;
        }
        None
    }

    /// Offset of chunk `index`.
    #[inline]
    pub fn chunk_offset(&self, index: u64) -> u64 {
        self.data_offset + (index << self.chunk_size.trailing_zeros())
    }

    /// The chunk holding `offset`, if it is in the data area.
    #[inline]
    pub fn chunk_of(&self, offset: u64) -> Option<u64> {
        let rel = offset.checked_sub(self.data_offset)?;
        let index = rel >> self.chunk_size.trailing_zeros(); // a power of two: no division
        (index < self.chunk_count).then_some(index)
    }

    /// Offset of chunk `index`'s descriptor.
    pub fn desc_offset_of(&self, index: u64) -> u64 {
        self.desc_offset + index * DESC_BYTES
    }

    /// Offset of the bitmap word holding chunk `index`'s bit, and the bit.
    pub fn bitmap_word_of(&self, index: u64) -> (u64, u64) {
        (self.bitmap_offset + (index / 64) * 8, 1 << (index % 64))
    }

    /// Number of bitmap words.
    pub fn bitmap_words(&self) -> u64 {
        self.chunk_count.div_ceil(64)
    }

    /// The largest request served from a size class (larger ones take whole chunks).
    #[inline]
    pub fn max_small(&self) -> u64 {
        self.chunk_size / 2
    }
}

/// The size class (block size) for `size` bytes aligned to `align`: the next power of two of
/// both, at least [`MIN_BLOCK`]. Blocks of a class are aligned to their size because chunks are
/// aligned to the chunk size.
#[inline]
pub fn class_for(size: u64, align: u64) -> u64 {
    size.max(align).max(MIN_BLOCK).next_power_of_two()
}

/// The index of a class among the powers of two from [`MIN_BLOCK`].
#[inline]
pub fn class_index(class: u64) -> usize {
    (class.trailing_zeros() - MIN_BLOCK.trailing_zeros()) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn owner_words_of_each_kind_tell_themselves_apart() {
        let (mine, releasing, cont) =
            (owner(3, MAX_CLIENT_ID, 1), releasing(3, MAX_CLIENT_ID), continuation(3, 1 << 40));
        assert_eq!(owner_client(mine), (3, MAX_CLIENT_ID));
        assert_eq!(owner_client(releasing), (3, MAX_CLIENT_ID));
        assert!(!is_releasing(mine) && !is_continuation(mine));
        assert!(is_releasing(releasing) && !is_continuation(releasing));
        assert!(is_continuation(cont) && !is_releasing(cont) && !is_releasing(0));
        assert_ne!(freed_mark(64, mine), freed_mark(64, owner(3, 7, 1)), "another owner, another mark");
    }

    proptest! {
        #[test]
        fn plans_fit_and_do_not_overlap(pool in 0u64..(1 << 34), shift in 12u32..24) {
            let chunk = 1u64 << shift;
            match Geometry::plan(pool, chunk) {
                Some(g) => {
                    prop_assert!(g.chunk_count > 0);
                    prop_assert!(g.bitmap_offset >= CLIENTS + CLIENT_TABLE_BYTES);
                    prop_assert!(g.desc_offset >= g.bitmap_offset + g.bitmap_words() * 8);
                    prop_assert!(g.data_offset >= g.desc_offset + g.chunk_count * DESC_BYTES);
                    prop_assert_eq!(g.data_offset % chunk, 0);
                    prop_assert!(g.data_offset + g.chunk_count * chunk <= pool);
                    // Not wasteful: one more chunk would not fit.
                    let more = g.chunk_count + 1;
                    let data = (HEADER_BYTES + CLIENT_TABLE_BYTES + more.div_ceil(64) * 8 + more * DESC_BYTES)
                        .next_multiple_of(chunk);
                    prop_assert!(data + more * chunk > pool);
                }
                None => prop_assert!(pool < HEADER_BYTES + CLIENT_TABLE_BYTES + DESC_BYTES + 8 + 2 * chunk),
            }
        }

        #[test]
        fn classes_cover_size_and_alignment(size in 1u64..(1 << 20), align_shift in 0u32..20) {
            let align = 1u64 << align_shift;
            let class = class_for(size, align);
            prop_assert!(class >= size && class >= align && class >= MIN_BLOCK);
            prop_assert!(class.is_power_of_two());
            prop_assert!(class < 2 * size.max(align).max(MIN_BLOCK));
        }

        #[test]
        fn chunk_of_inverts_chunk_offset(index in 0u64..1000, within in 0u64..65536) {
            let g = Geometry::plan(1 << 30, 65536).unwrap();
            prop_assume!(index < g.chunk_count);
            prop_assert_eq!(g.chunk_of(g.chunk_offset(index) + within), Some(index));
        }
    }

    #[test]
    fn small_and_odd_inputs() {
        assert_eq!(Geometry::plan(1 << 20, 3000), None, "not a power of two");
        assert_eq!(Geometry::plan(4096, 4096), None, "only room for the header");
        let g = Geometry::plan(64 << 20, 1 << 20).unwrap();
        assert_eq!((g.chunk_count, g.data_offset), (63, 1 << 20));
        assert_eq!(g.chunk_of(0), None);
        assert_eq!(g.chunk_of(g.data_offset + 63 * (1 << 20)), None);
        assert_eq!(class_index(16), 0);
        assert_eq!(class_index(1 << 19), 15);
    }
}
