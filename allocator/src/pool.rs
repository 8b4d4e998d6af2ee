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

use std::ops::Range;
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
#[inline]
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

/// Usage of one node's pool: its chunks, and how many are claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeUsage {
    /// The node.
    pub node: NodeId,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Chunks in the pool.
    pub chunks_total: u64,
    /// Chunks claimed by clients: the bits set in the pool's bitmap.
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

/// Reads a node's usage: its bitmap, counted (one READ of a bit per chunk).
pub(crate) fn usage<E: Endpoint>(net: &mut Net<E>, node: NodeId, geo: &Geometry) -> Result<NodeUsage> {
    let mut bitmap = Bitmap::new(geo, 0);
    bitmap.refresh(net, node, geo)?;
    let used = bitmap.words.iter().map(|w| w.count_ones() as u64).sum();
    Ok(NodeUsage { node, chunk_size: geo.chunk_size, chunks_total: geo.chunk_count, chunks_used: used })
}

/// A client's view of one node's chunk bitmap (a cache; the pool's descriptors are the truth).
pub(crate) struct Bitmap {
    words: Vec<u64>,
    /// Where the next search starts, so clients spread over the pool.
    cursor: usize,
    /// No chunk was released since the last refresh: a run missing here is missing there.
    fresh: bool,
}

impl Bitmap {
    pub(crate) fn new(geo: &Geometry, start: usize) -> Self {
        let words = geo.bitmap_words() as usize;
        Bitmap { words: vec![0; words], cursor: start % words.max(1), fresh: false }
    }

    /// True when chunk `chunk`'s bit is set in the cache.
    pub(crate) fn is_set(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Bits past the last chunk count as claimed.
    fn padding(geo: &Geometry, word: usize) -> u64 {
        let valid = geo.chunk_count - (word as u64) * 64;
        if valid >= 64 { 0 } else { !0u64 << valid }
    }

    /// Claims `span` contiguous chunks for `owner` ([`layout::owner`]), the first with `class`
    /// in its descriptor and the others as its continuations; `Ok(None)` when the pool has no
    /// such run. Each chunk is taken by a CAS of its owner word from 0, and only then is its
    /// bit set (see [`layout`]).
    pub(crate) fn claim<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        span: u64,
        owner: u64,
        class: u64,
    ) -> Result<Option<u64>> {
        loop {
            let Some(first) = self.find_run(geo, span) else {
                if self.fresh {
                    return Ok(None);
                }
                self.refresh(net, node, geo)?;
                continue;
            };
            if let Err(busy) = take_owner_words(net, node, geo, first, span, owner, class)? {
                // Held by another client (being claimed, or released, or dead): skip it.
                self.words[(busy / 64) as usize] |= 1 << (busy % 64);
                continue;
            }
            // The descriptors (the first one's for a single chunk, else the continuations')
            // go in the same doorbell as the bits.
            let descs: Vec<u8> = if span == 1 {
                descriptor(owner, class).to_vec()
            } else {
                (1..span).flat_map(|_| descriptor(layout::continuation(node.0, first), layout::CONTINUATION)).collect()
            };
            let at_desc = at(node, geo.desc_offset_of(if span == 1 { first } else { first + 1 }));
            self.update_bits(net, node, geo, first..first + span, true, Some((at_desc, &descs)))?;
            self.cursor = ((first + span) / 64) as usize % self.words.len();
            return Ok(Some(first));
        }
    }

    /// Releases chunk `head` and the chunks in `rest`, whose owner words the caller holds: clears
    /// their bits, then zeroes the descriptors in `rest`, then `head`'s, so that a release cut
    /// short leaves chunks that name a dead client or their head.
    pub(crate) fn release<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        head: u64,
        rest: &[Range<u64>],
    ) -> Result<()> {
        self.update_bits(net, node, geo, head..head + 1, false, None)?;
        for run in rest {
            self.update_bits(net, node, geo, run.clone(), false, None)?;
        }
        let zeros: Vec<Vec<u8>> =
            rest.iter().map(|run| vec![0u8; ((run.end - run.start) * layout::DESC_BYTES) as usize]).collect();
        let head_zeros = [0u8; layout::DESC_BYTES as usize];
        let mut batch = net.ep.batch();
        for (run, zeros) in rest.iter().zip(&zeros) {
            batch.write(at(node, geo.desc_offset_of(run.start)), zeros);
        }
        batch.write(at(node, geo.desc_offset_of(head)), &head_zeros);
        let ops = batch.len() as u64;
        batch.submit()?;
        net.ops += ops;
        self.fresh = false;
        Ok(())
    }

    pub(crate) fn refresh<E: Endpoint>(&mut self, net: &mut Net<E>, node: NodeId, geo: &Geometry) -> Result<()> {
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

    /// Sets (or clears) the bits of `chunks`, whose owner words the caller holds, so no other
    /// client changes those bits: a CAS per word from the cached value, one doorbell for the
    /// first try of every word (with `with`, a WRITE, in front), then again from what a stale
    /// word held. A bit already as asked is left so (a restored fuzzy snapshot can hold one).
    fn update_bits<E: Endpoint>(
        &mut self,
        net: &mut Net<E>,
        node: NodeId,
        geo: &Geometry,
        chunks: Range<u64>,
        set: bool,
        with: Option<(GlobalAddr, &[u8])>,
    ) -> Result<()> {
        let change = |word: u64, mask: u64| if set { word | mask } else { word & !mask };
        let words: Vec<(usize, u64)> = word_masks(chunks.start, chunks.end - chunks.start).collect();
        let mut olds = vec![0u64; words.len()];
        let mut batch = net.ep.batch();
        if let Some((addr, bytes)) = with {
            batch.write(addr, bytes);
        }
        for (&(word, mask), old) in words.iter().zip(olds.iter_mut()) {
            let expected = self.words[word];
            batch.cas(at(node, geo.bitmap_offset + word as u64 * 8), expected, change(expected, mask), old);
        }
        let ops = batch.len() as u64;
        batch.submit()?;
        net.ops += ops;
        for (&(word, mask), &old) in words.iter().zip(&olds) {
            let mut expected = self.words[word];
            let mut old = old;
            while old != expected {
                expected = old;
                if change(old, mask) == old {
                    break;
                }
                old = net.cas(at(node, geo.bitmap_offset + word as u64 * 8), expected, change(expected, mask))?;
            }
            self.words[word] = change(expected, mask);
        }
        Ok(())
    }
}

/// A descriptor as written: owner, class, an empty remote free list.
fn descriptor(owner: u64, class: u64) -> [u8; layout::DESC_BYTES as usize] {
    let mut d = [0u8; layout::DESC_BYTES as usize];
    d[..8].copy_from_slice(&owner.to_le_bytes());
    d[8..16].copy_from_slice(&class.to_le_bytes());
    d
}

/// Takes the owner words of `first..first + span` from 0: the first one's for `owner` (with
/// its class written, for a run, before the rest are taken, so a client dying next leaves a
/// head whose continuations can be found), the others as its continuations, in one doorbell.
/// `Err(chunk)` names a chunk somebody else holds; what was taken is given back.
fn take_owner_words<E: Endpoint>(
    net: &mut Net<E>,
    node: NodeId,
    geo: &Geometry,
    first: u64,
    span: u64,
    owner: u64,
    class: u64,
) -> Result<std::result::Result<(), u64>> {
    if net.cas(desc_word(node, geo, first, desc::OWNER), 0, owner)? != 0 {
        return Ok(Err(first));
    }
    if span == 1 {
        return Ok(Ok(()));
    }
    let cont = layout::continuation(node.0, first);
    let head = descriptor(owner, class);
    let mut olds = vec![0u64; span as usize - 1];
    let mut batch = net.ep.batch();
    batch.write(at(node, geo.desc_offset_of(first)), &head);
    for (c, old) in (first + 1..first + span).zip(olds.iter_mut()) {
        batch.cas(desc_word(node, geo, c, desc::OWNER), 0, cont, old);
    }
    batch.submit()?;
    net.ops += span;
    let Some(busy) = olds.iter().position(|&o| o != 0) else { return Ok(Ok(())) };
    // Give back the continuations taken (CAS, so one that is not ours stays as it is), then
    // the first chunk.
    let taken: Vec<u64> = (first + 1..first + span).zip(&olds).filter(|&(_, &o)| o == 0).map(|(c, _)| c).collect();
    let mut ignored = vec![0u64; taken.len()];
    let mut undo = net.ep.batch();
    for (&c, ignored) in taken.iter().zip(ignored.iter_mut()) {
        undo.cas(desc_word(node, geo, c, desc::OWNER), cont, 0, ignored);
    }
    let zeros = [0u8; layout::DESC_BYTES as usize];
    undo.write(at(node, geo.desc_offset_of(first)), &zeros);
    let ops = undo.len() as u64;
    undo.submit()?;
    net.ops += ops;
    Ok(Err(first + 1 + busy as u64))
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

/// The address of a descriptor word.
pub(crate) fn desc_word(node: NodeId, geo: &Geometry, chunk: u64, word: u64) -> GlobalAddr {
    at(node, geo.desc_offset_of(chunk) + word)
}

/// Reads the owner and class of chunks `chunks` (one READ).
pub(crate) fn read_descriptors<E: Endpoint>(
    net: &mut Net<E>,
    node: NodeId,
    geo: &Geometry,
    chunks: Range<u64>,
) -> Result<Vec<(u64, u64)>> {
    let mut raw = vec![0u8; ((chunks.end - chunks.start) * layout::DESC_BYTES) as usize];
    net.read(at(node, geo.desc_offset_of(chunks.start)), &mut raw)?;
    let word = |d: &[u8], w: u64| u64::from_le_bytes(d[w as usize..w as usize + 8].try_into().expect("8 bytes"));
    Ok(raw.chunks(layout::DESC_BYTES as usize).map(|d| (word(d, desc::OWNER), word(d, desc::CLASS))).collect())
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
