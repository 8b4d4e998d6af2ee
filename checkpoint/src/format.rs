//! The snapshot file, byte for byte (all integers little-endian):
//!
//! ```text
//! header  (64 B)  magic "RDMEMSNP" | format u32 = 1 | flags u32 (bit 0: pinned, asked for by
//!                 number) | seq u64 | parent u64
//!                 (0: a full snapshot) | pool_size u64 | block_size u64 | reserved u64
//!                 | hash u64 (XXH3 of the 56 bytes before it)
//! data            the bytes of each data entry's block, in table order
//! table           per block in the file (24 B): index u64 | kind u32 (0 data, 1 zeros)
//!                 | reserved u32 | hash u64 (XXH3 of the block's bytes; 0 for zeros)
//! footer  (40 B)  magic "RDMEMEND" | seq u64 | entries u64 | table hash u64
//!                 | hash u64 (XXH3 of the 32 bytes before it)
//! ```
//! The table comes last because a snapshot is written in one pass over the pool, and which
//! blocks changed is known only at the end. A file without its footer (torn) or whose hashes do
//! not match (corrupt) is refused; every block's hash is checked as it is read back.

use std::io::{self, Read, Write};

use xxhash_rust::xxh3::xxh3_64;

pub(crate) const MAGIC: [u8; 8] = *b"RDMEMSNP";
pub(crate) const END: [u8; 8] = *b"RDMEMEND";
pub(crate) const FORMAT: u32 = 1;
pub(crate) const HEADER_LEN: usize = 64;
pub(crate) const ENTRY_LEN: usize = 24;
pub(crate) const FOOTER_LEN: usize = 40;

/// What a snapshot file says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) seq: u64,
    /// The snapshot this one changes (`None`: a full snapshot).
    pub(crate) parent: Option<u64>,
    pub(crate) pool_size: u64,
    pub(crate) block_size: u64,
    /// Asked for by number (a DSM checkpoint): kept by pruning until a newer pinned one.
    pub(crate) pinned: bool,
}

/// The largest block size a header may give (a damaged one must not make a restore allocate
/// without bound).
pub(crate) const MAX_BLOCK_SIZE: u64 = 1 << 30;

/// A block's content as a snapshot records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// All zeros: no data in the file.
    Zeros,
    /// These bytes' hash; the bytes follow in the file's data.
    Data(u64),
}

impl BlockState {
    /// The state of `bytes`.
    pub(crate) fn of(bytes: &[u8]) -> BlockState {
        if is_zero(bytes) { BlockState::Zeros } else { BlockState::Data(xxh3_64(bytes)) }
    }
}

/// One block in a snapshot's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) index: u64,
    pub(crate) state: BlockState,
}

/// The end of a snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Footer {
    pub(crate) seq: u64,
    pub(crate) entries: u64,
    pub(crate) table_hash: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Whether every byte is zero (eight at a time).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0) && words.remainder().iter().all(|&b| b == 0)
}

impl Header {
    pub(crate) fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.pinned).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.parent.unwrap_or(0).to_le_bytes());
        b[32..40].copy_from_slice(&self.pool_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.block_size.to_le_bytes());
        let hash = xxh3_64(&b[..56]);
        b[56..].copy_from_slice(&hash.to_le_bytes());
        w.write_all(&b)
    }

    /// Reads and checks a header; the error says what is wrong.
    pub(crate) fn read_from(r: &mut impl Read) -> Result<Header, String> {
        let mut b = [0u8; HEADER_LEN];
        r.read_exact(&mut b).map_err(|e| format!("cannot read its header ({e})"))?;
        if b[..8] != MAGIC {
            return Err("not an rdmem snapshot (bad magic)".into());
        }
        if xxh3_64(&b[..56]) != u64_at(&b, 56) {
            return Err("its header is corrupt (checksum mismatch)".into());
        }
        let format = u32_at(&b, 8);
        if format != FORMAT {
            return Err(format!("snapshot format {format}; this build reads format {FORMAT}"));
        }
        let seq = u64_at(&b, 16);
        let parent = match u64_at(&b, 24) {
            0 => None,
            p => Some(p),
        };
        let (pool_size, block_size) = (u64_at(&b, 32), u64_at(&b, 40));
        let flags = u32_at(&b, 12);
        let block_ok = block_size.is_power_of_two() && (4096..=MAX_BLOCK_SIZE).contains(&block_size);
        if seq == 0 || seq == u64::MAX || parent.is_some_and(|p| p >= seq) || !block_ok || pool_size == 0 || flags > 1 {
            return Err(format!(
                "its header is inconsistent (seq {seq}, parent {parent:?}, block size {block_size}, flags {flags})"
            ));
        }
        Ok(Header { seq, parent, pool_size, block_size, pinned: flags == 1 })
    }

    /// Blocks in the pool (the last may be short).
    pub(crate) fn blocks(&self) -> u64 {
        self.pool_size.div_ceil(self.block_size)
    }
}

impl Entry {
    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        let (kind, hash) = match self.state {
            BlockState::Data(h) => (0u32, h),
            BlockState::Zeros => (1u32, 0),
        };
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&hash.to_le_bytes());
    }

    pub(crate) fn get(b: &[u8]) -> Result<Entry, String> {
        let index = u64_at(b, 0);
        let state = match u32_at(b, 8) {
            0 => BlockState::Data(u64_at(b, 16)),
            1 => BlockState::Zeros,
            k => return Err(format!("block {index} has unknown kind {k}")),
        };
        Ok(Entry { index, state })
    }
}

impl Footer {
    pub(crate) fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(&END);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.entries.to_le_bytes());
        b[24..32].copy_from_slice(&self.table_hash.to_le_bytes());
        let hash = xxh3_64(&b[..32]);
        b[32..].copy_from_slice(&hash.to_le_bytes());
        w.write_all(&b)
    }

    pub(crate) fn parse(b: &[u8; FOOTER_LEN]) -> Result<Footer, String> {
        if b[..8] != END {
            return Err("it has no footer (torn: its writing never finished)".into());
        }
        if xxh3_64(&b[..32]) != u64_at(b, 32) {
            return Err("its footer is corrupt (checksum mismatch)".into());
        }
        Ok(Footer { seq: u64_at(b, 8), entries: u64_at(b, 16), table_hash: u64_at(b, 24) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let h = Header { seq: 7, parent: Some(3), pool_size: 1 << 20, block_size: 4096, pinned: true };
        let mut b = Vec::new();
        h.write_to(&mut b).unwrap();
        assert_eq!(Header::read_from(&mut b.as_slice()), Ok(h));
        for at in 0..HEADER_LEN {
            let mut bad = b.clone();
            bad[at] ^= 0x10;
            assert!(Header::read_from(&mut bad.as_slice()).is_err(), "byte {at} flipped");
        }
        assert!(Header::read_from(&mut &b[..10]).unwrap_err().contains("cannot read"));
        // A block size no snapshot is written with (huge, or not a power of two) is refused,
        // even with a good checksum.
        for block_size in [1 << 62, 3 << 12, 1024] {
            let mut raw = Vec::new();
            Header { block_size, ..h }.write_to(&mut raw).unwrap();
            assert!(Header::read_from(&mut raw.as_slice()).unwrap_err().contains("inconsistent"), "{block_size}");
        }
    }

    #[test]
    fn footer_round_trips_and_refuses_damage() {
        let f = Footer { seq: 9, entries: 12, table_hash: 0xabcdef };
        let mut b = Vec::new();
        f.write_to(&mut b).unwrap();
        let b: [u8; FOOTER_LEN] = b.try_into().unwrap();
        assert_eq!(Footer::parse(&b), Ok(f));
        for at in 0..FOOTER_LEN {
            let mut bad = b;
            bad[at] ^= 1;
            assert!(Footer::parse(&bad).is_err(), "byte {at} flipped");
        }
    }

    #[test]
    fn zero_blocks_are_found_whatever_their_length() {
        assert!(is_zero(&[0; 13]));
        assert!(is_zero(&[]));
        for at in 0..13 {
            let mut b = [0u8; 13];
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
        }
        assert_eq!(BlockState::of(&[0; 64]), BlockState::Zeros);
        assert!(matches!(BlockState::of(&[1; 64]), BlockState::Data(_)));
    }
}
