//! One node's pool as a client sees it: formatting, chunk claims and releases, descriptors,
//! usage. Every change is a one-sided READ, WRITE, CAS or FAA; the memory node's CPU is never
//! involved, and it knows nothing of this format.
//!
//! Formatting: the pool starts zeroed. The first client to CAS the header's state word from 0
//! to "formatting by me" writes the geometry and then the state "ready", on one queue pair, so
//! in that order; every other client waits until it reads "ready" and then reads the geometry.
//! Two clients racing to format cannot both win the CAS.
//!
//! Chunk claims: each client caches the bitmap; claiming CASes a word from the cached value to
//! the value with the chunk's bit set. A stale cache costs one failed CAS, which returns the
//! current word, so a claim is one atomic when the cache is right and two when it is not.

use std::time::{Duration, Instant};

use rdmem_core::{Endpoint, GlobalAddr, NodeId, NodeInfo};

use crate::error::{AllocError, Result};
use crate::layout::{self, Geometry, client, desc, header};

/// An endpoint that counts the network operations it issues (for `rdma_ops_per_op`).
pub(crate) struct Net<E> {
    pub ep: E,
    pub ops: u64,
}

impl<E: Endpoint> Net<E> {
    pub(crate) fn read_u64(&mut self, addr: GlobalAddr) -> Result<u64> {
        self.ops += 1;
        Ok(self.ep.read_u64(addr)?)
    }

    pub(crate) fn read(&mut self, addr: GlobalAddr, buf: &mut [u8]) -> Result<()> {
        self.ops += 1;
        Ok(self.ep.read(addr, buf)?)
    }

    pub(crate) fn write(&mut self, addr: GlobalAddr, buf: &[u8]) -> Result<()> {
        self.ops += 1;
        Ok(self.ep.write(addr, buf)?)
    }

    pub(crate) fn cas(&mut self, addr: GlobalAddr, expected: u64, new: u64) -> Result<u64> {
        self.ops += 1;
        Ok(self.ep.cas(addr, expected, new)?)
    }

    pub(crate) fn faa(&mut self, addr: GlobalAddr, add: u64) -> Result<u64> {
        self.ops += 1;
        Ok(self.ep.faa(addr, add)?)
    }
}

/// The address of `offset` on `node` (offsets inside a pool always fit 48 bits).
pub(crate) fn at(node: NodeId, offset: u64) -> GlobalAddr {
    GlobalAddr::new(node, offset).expect("pool offsets fit in 48 bits")
}

/// How long a client waits for another one's formatting before giving up.
const FORMAT_WAIT: Duration = Duration::from_secs(10);

/// Reads `node`'s geometry, formatting the pool first if nobody has. `token` (nonzero, below
/// 2^56) marks this client's formatting claim.
pub(crate) fn open_or_format<E: Endpoint>(
    net: &mut Net<E>,
    node: NodeInfo,
    chunk_size: u64,
    token: u64,
) -> Result<Geometry> {
    let bad = |reason: String| AllocError::BadPool { node: node.id, reason };
    let state_addr = at(node.id, header::STATE);
    let started = Instant::now();
    let mut state = net.read_u64(state_addr)?;
    loop {
        match state & 0xff {
            0 => {
                let geo = Geometry::plan(node.pool_size, chunk_size).ok_or_else(|| {
                    bad(format!("{} bytes cannot hold one chunk of {chunk_size} bytes", node.pool_size))
                })?;
                let mine = layout::STATE_FORMATTING | (token << 8);
                let old = net.cas(state_addr, 0, mine)?;
                if old != 0 {
                    state = old;
                    continue;
                }
                // We won: the pool is zeroed, so formatting is writing the geometry, then
                // the magic, then "ready", in this order on one queue pair.
                let mut words = [0u8; header::GEOMETRY_BYTES - 16];
                for (i, v) in [
                    layout::VERSION,
                    geo.pool_size,
                    geo.chunk_size,
                    geo.chunk_count,
                    geo.bitmap_offset,
                    geo.desc_offset,
                    geo.data_offset,
                ]
                .into_iter()
                .enumerate()
                {
                    words[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
                let (magic, ready) = (layout::MAGIC.to_le_bytes(), layout::STATE_READY.to_le_bytes());
                let mut batch = net.ep.batch();
                batch
                    .write(at(node.id, header::VERSION), &words)
                    .write(at(node.id, header::MAGIC), &magic)
                    .write(state_addr, &ready);
                batch.submit()?;
                net.ops += 3;
                tracing::info!(
                    "formatted the pool of {}: {} chunks of {} bytes",
                    node.id,
                    geo.chunk_count,
                    geo.chunk_size
                );
                return Ok(geo);
            }
            layout::STATE_READY => return read_geometry(net, node),
            layout::STATE_FORMATTING => {
                if started.elapsed() > FORMAT_WAIT {
                    return Err(bad(format!(
                        "another client (token {:#x}) started formatting it {} s ago and has not finished; if it died, \
                         restart the memory node to get a fresh pool",
                        state >> 8,
                        FORMAT_WAIT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
                state = net.read_u64(state_addr)?;
            }
            other => return Err(bad(format!("unknown header state {other:#x}: not an rdmem pool"))),
        }
    }
}

/// Reads and checks a formatted pool's geometry.
pub(crate) fn read_geometry<E: Endpoint>(net: &mut Net<E>, node: NodeInfo) -> Result<Geometry> {
    let bad = |reason: String| AllocError::BadPool { node: node.id, reason };
    let mut raw = [0u8; header::GEOMETRY_BYTES];
    net.read(at(node.id, 0), &mut raw)?;
    let word = |offset: u64| u64::from_le_bytes(raw[offset as usize..offset as usize + 8].try_into().expect("8 bytes"));
    if word(header::MAGIC) != layout::MAGIC {
        return Err(bad(format!("bad magic {:#x}: not an rdmem pool", word(header::MAGIC))));
    }
    if word(header::VERSION) != layout::VERSION {
        return Err(bad(format!("format version {} (this build reads {})", word(header::VERSION), layout::VERSION)));
    }
    let geo = Geometry {
        pool_size: word(header::POOL_SIZE),
        chunk_size: word(header::CHUNK_SIZE),
        chunk_count: word(header::CHUNK_COUNT),
        bitmap_offset: word(header::BITMAP),
        desc_offset: word(header::DESCRIPTORS),
        data_offset: word(header::DATA),
    };
    if Geometry::plan(geo.pool_size, geo.chunk_size) != Some(geo) || geo.pool_size > node.pool_size {
        return Err(bad(format!("inconsistent geometry {geo:?} for a pool of {} bytes", node.pool_size)));
    }
    Ok(geo)
}

/// Usage of one node's pool, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeUsage {
    /// The node.
    pub node: NodeId,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Chunks in the pool.
    pub chunks_total: u64,
    /// Chunks claimed by clients.
    pub chunks_used: u64,
}

impl NodeUsage {
    /// Bytes in claimed chunks.
    pub fn bytes_used(&self) -> u64 {
        self.chunks_used * self.chunk_size
    }

    /// Bytes in all chunks.
    pub fn bytes_total(&self) -> u64 {
        self.chunks_total * self.chunk_size
    }
}

/// Reads the usage counter of a node (one READ).
pub(crate) fn usage<E: Endpoint>(net: &mut Net<E>, node: NodeId, geo: &Geometry) -> Result<NodeUsage> {
    let used = net.read_u64(at(node, header::USED_CHUNKS))?;
    Ok(NodeUsage { node, chunk_size: geo.chunk_size, chunks_total: geo.chunk_count, chunks_used: used })
}

/// A client's view of one node's chunk bitmap (a cache; the pool's copy is the truth).
pub(crate) struct Bitmap {
    words: Vec<u64>,
    /// Where the next search starts, so clients spread over the pool.
    cursor: usize,
    fresh: bool,
}

impl Bitmap {
    pub(crate) fn new(geo: &Geometry, start: usize) -> Self {
        let words = geo.bitmap_words() as usize;
        Bitmap { words: vec![0; words], cursor: start % words.max(1), fresh: false }
    }

    /// Bits past the last chunk count as claimed.
    fn padding(geo: &Geometry, word: usize) -> u64 {
        let valid = geo.chunk_count - (word as u64) * 64;
        if valid >= 64 { 0 } else { !0u64 << valid }
    }

    /// Claims `span` contiguous chunks; `Ok(None)` when the pool has no such run.
    pub(crate) fn claim<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        span: u64,
    ) -> Result<Option<u64>> {
        loop {
            match self.find_run(geo, span) {
                Some(first) => {
                    if self.try_set(net, node, geo, first, span)? {
                        net.faa(at(node, header::USED_CHUNKS), span)?;
                        self.cursor = ((first + span) / 64) as usize % self.words.len();
                        return Ok(Some(first));
                    }
                    // The cache was stale; try_set refreshed the words it touched.
                }
                None if self.fresh => return Ok(None),
                None => self.refresh(net, node, geo)?,
            }
        }
    }

    /// Releases `span` chunks from `first` (their bits must be set).
    pub(crate) fn release<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        first: u64,
        span: u64,
    ) -> Result<()> {
        net.faa(at(node, header::USED_CHUNKS), span.wrapping_neg())?;
        for (word, mask) in word_masks(first, span) {
            self.clear_bits(net, node, geo, word, mask)?;
        }
        self.fresh = false;
        Ok(())
    }

    fn refresh<E: Endpoint>(&mut self, net: &mut Net<E>, node: NodeId, geo: &Geometry) -> Result<()> {
        let mut raw = vec![0u8; self.words.len() * 8];
        net.read(at(node, geo.bitmap_offset), &mut raw)?;
        for (w, bytes) in self.words.iter_mut().zip(raw.chunks(8)) {
            *w = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        }
        self.fresh = true;
        Ok(())
    }

    /// The first chunk of a free run of `span` in the cache, searching from the cursor.
    fn find_run(&self, geo: &Geometry, span: u64) -> Option<u64> {
        let n = geo.chunk_count;
        let start = (self.cursor as u64 * 64).min(n);
        let free =
            |i: u64| (self.words[(i / 64) as usize] | Self::padding(geo, (i / 64) as usize)) & (1 << (i % 64)) == 0;
        let search = |from: u64, to: u64| {
            let mut run = 0;
            for i in from..to {
                if free(i) {
                    run += 1;
                    if run == span {
                        return Some(i + 1 - span);
                    }
                } else {
                    run = 0;
                }
            }
            None
        };
        search(start, n).or_else(|| search(0, (start + span).min(n)))
    }

    /// CASes the run's bits on, word by word; undoes its own on a conflict. True on success.
    fn try_set<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        first: u64,
        span: u64,
    ) -> Result<bool> {
        let mut done: Vec<(usize, u64)> = Vec::new();
        for (word, mask) in word_masks(first, span) {
            let addr = at(node, geo.bitmap_offset + word as u64 * 8);
            let expected = self.words[word];
            let old = net.cas(addr, expected, expected | mask)?;
            if old != expected {
                self.words[word] = old;
                self.fresh = false;
                for (w, m) in done {
                    self.clear_bits(net, node, geo, w, m)?;
                }
                return Ok(false);
            }
            self.words[word] = expected | mask;
            done.push((word, mask));
        }
        Ok(true)
    }

    /// Clears `mask` in bitmap word `word` with CAS (no counter change). The bits must be set:
    /// finding one clear means the chunks were released twice.
    fn clear_bits<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        word: usize,
        mask: u64,
    ) -> Result<()> {
        let addr = at(node, geo.bitmap_offset + word as u64 * 8);
        let mut expected = self.words[word] | mask;
        loop {
            let old = net.cas(addr, expected, expected & !mask)?;
            if old == expected {
                self.words[word] = expected & !mask;
                return Ok(());
            }
            if old & mask != mask {
                return Err(AllocError::BadPool {
                    node,
                    reason: format!(
                        "bitmap word {word} is {old:#x}: bits {mask:#x} were already clear (chunks released twice)"
                    ),
                });
            }
            expected = old;
        }
    }
}

/// The bitmap words and masks covering chunks `first..first + span`.
fn word_masks(first: u64, span: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first + span;
    let mut i = first;
    std::iter::from_fn(move || {
        if i >= end {
            return None;
        }
        let word = i / 64;
        let lo = i % 64;
        let hi = (end - word * 64).min(64);
        let mask = if hi - lo == 64 { !0 } else { ((1u64 << (hi - lo)) - 1) << lo };
        i = (word + 1) * 64;
        Some((word as usize, mask))
    })
}

/// One slot of the client table, as read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientSlot {
    pub slot: u64,
    pub id: u64,
    pub beat: u64,
    pub lease: Duration,
}

/// Reads the client table of `node` (one READ): the occupied slots.
pub(crate) fn read_clients<E: Endpoint>(net: &mut Net<E>, node: NodeId) -> Result<Vec<ClientSlot>> {
    let mut raw = vec![0u8; layout::CLIENT_TABLE_BYTES as usize];
    net.read(at(node, layout::CLIENTS), &mut raw)?;
    let word = |slot: usize, w: u64| {
        let at = slot * layout::CLIENT_SLOT_BYTES as usize + w as usize;
        u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
    };
    Ok((0..layout::CLIENT_SLOTS as usize)
        .filter(|&s| word(s, client::ID) != 0)
        .map(|s| ClientSlot {
            slot: s as u64,
            id: word(s, client::ID),
            beat: word(s, client::BEAT),
            lease: Duration::from_millis(word(s, client::LEASE_MS)),
        })
        .collect())
}

/// The address of word `w` of client slot `slot` on `node`.
pub(crate) fn client_word(node: NodeId, slot: u64, w: u64) -> GlobalAddr {
    at(node, layout::CLIENTS + slot * layout::CLIENT_SLOT_BYTES + w)
}

/// Takes a free slot of `node`'s client table for `id` (CAS of its id word from 0) and records
/// the lease; the slot's number.
pub(crate) fn register_client<E: Endpoint>(net: &mut Net<E>, node: NodeId, id: u64, lease: Duration) -> Result<u64> {
    let mut raw = vec![0u8; layout::CLIENT_TABLE_BYTES as usize];
    net.read(at(node, layout::CLIENTS), &mut raw)?;
    for slot in 0..layout::CLIENT_SLOTS {
        let at = (slot * layout::CLIENT_SLOT_BYTES) as usize;
        if raw[at..at + 8] != [0u8; 8] {
            continue;
        }
        if net.cas(client_word(node, slot, client::ID), 0, id)? == 0 {
            let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
            net.write(client_word(node, slot, client::LEASE_MS), &ms.to_le_bytes())?;
            return Ok(slot);
        }
    }
    Err(AllocError::BadPool {
        node,
        reason: format!(
            "its client table is full: {} clients hold a slot (reclaim dead ones with `rdmem-pools reclaim`)",
            layout::CLIENT_SLOTS
        ),
    })
}

/// Writes a chunk descriptor: owner and class, with an empty remote free list.
pub(crate) fn write_descriptors<E: Endpoint>(
    net: &mut Net<E>,
    node: NodeId,
    geo: &Geometry,
    first: u64,
    descs: &[(u64, u64)],
) -> Result<()> {
    let mut raw = vec![0u8; descs.len() * layout::DESC_BYTES as usize];
    for (i, (owner, class)) in descs.iter().enumerate() {
        let d = &mut raw[i * layout::DESC_BYTES as usize..];
        d[..8].copy_from_slice(&owner.to_le_bytes());
        d[8..16].copy_from_slice(&class.to_le_bytes());
    }
    net.write(at(node, geo.desc_offset_of(first)), &raw)
}

/// The address of a descriptor word.
pub(crate) fn desc_word(node: NodeId, geo: &Geometry, chunk: u64, word: u64) -> GlobalAddr {
    at(node, geo.desc_offset_of(chunk) + word)
}

/// Reads a chunk's owner and class (one READ).
pub(crate) fn read_descriptor<E: Endpoint>(
    net: &mut Net<E>,
    node: NodeId,
    geo: &Geometry,
    chunk: u64,
) -> Result<(u64, u64)> {
    let mut raw = [0u8; 16];
    net.read(desc_word(node, geo, chunk, desc::OWNER), &mut raw)?;
    Ok((
        u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(raw[8..].try_into().expect("8 bytes")),
    ))
}

#[cfg(test)]
mod tests {
    use super::word_masks;

    #[test]
    fn masks_cover_runs_across_words() {
        assert_eq!(word_masks(3, 2).collect::<Vec<_>>(), vec![(0, 0b11000)]);
        assert_eq!(word_masks(62, 4).collect::<Vec<_>>(), vec![(0, 0b11 << 62), (1, 0b11)]);
        assert_eq!(word_masks(64, 64).collect::<Vec<_>>(), vec![(1, !0)]);
        assert_eq!(word_masks(0, 130).collect::<Vec<_>>(), vec![(0, !0), (1, !0), (2, 0b11)]);
    }
}
