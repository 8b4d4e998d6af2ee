//! The page cache of a compute process: remote pages kept in registered frames, an exact LRU
//! per shard, dirty pages tracked with twins and written home as byte diffs.
//!
//! - **Frames** live in one registered buffer per shard, so a miss READs the page in place.
//!   Pages map to shards by their read-ahead stripe, so a page and the pages after it that
//!   read-ahead brings in share a shard.
//! - **Page table and LRU**: each shard is a mutex around a hash map (page to frame slot, a
//!   one-multiply hasher) and an exact LRU order ([`lru::Lru`]), with its own counters, so a hit
//!   touches nothing but its shard ([`PageCache::read_if_cached`] needs no endpoint either). Invariant, between operations: every frame is either free
//!   or holds a page in the LRU (`free + lru.len() == frames`), also after a failed READ or
//!   write-back: a miss whose READ fails gives its frames back. With one shard the LRU is exact for the whole cache; with
//!   more, within each shard (threads then rarely wait for each other).
//! - **Writes** go to the frame. The first write to a clean page copies it to a *twin*; the page
//!   is then dirty. [`PageCache::flush`] (at a release or barrier) and eviction write home only
//!   the bytes that differ from the twin ([`diff::diff_runs`]), so processes writing disjoint
//!   bytes of one page do not overwrite each other. Pages written home are remembered for write
//!   notices ([`PageCache::take_written`]); [`PageCache::flush_pages`] writes home only some.
//! - **Read-ahead**: a miss on the page right after the previous miss also brings in up to
//!   `read_ahead` following pages with the same home: a READ per page, each straight into its
//!   frame, all in one doorbell (nothing is copied).
//!
//! The cache does not know what the pages are: a [`Homes`] says where each page lives.

pub mod diff;
pub mod lru;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rdmem_core::{Endpoint, GlobalAddr, LocalBuffer};

use self::lru::Lru;

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;

/// A page number in the space the cache serves (byte address / [`PAGE_SIZE`]).
pub type PageId = u64;

/// Where a page lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Home {
    /// The page's first byte at its home.
    pub addr: GlobalAddr,
    /// Pages `page..page + run` lie one after the other from `addr` on the same node (at
    /// least 1): how far read-ahead may go in one READ.
    pub run: u32,
}

/// Resolves pages to their homes.
pub trait Homes {
    /// The home of `page`, or an error for a page that does not exist.
    fn home(&self, page: PageId) -> rdmem_core::Result<Home>;
}

/// Sizes of a [`PageCache`].
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// Capacity in bytes (rounded down to whole pages per shard; at least one page per shard).
    pub capacity_bytes: u64,
    /// Shards: independent locks, each with its own exact LRU.
    pub shards: usize,
    /// Pages read ahead after a sequential miss (0: off).
    pub read_ahead: usize,
    /// Pages per read-ahead stripe: pages of one stripe share a shard.
    pub stripe_pages: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions { capacity_bytes: 64 << 20, shards: 16, read_ahead: 7, stripe_pages: 16 }
    }
}

/// What the cache did, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Page accesses served from a frame.
    pub hits: u64,
    /// Page accesses that had to READ the page.
    pub misses: u64,
    /// Pages dropped to make room.
    pub evictions: u64,
    /// Dirty pages whose diffs were written home (on flush or eviction).
    pub write_backs: u64,
    /// Pages dropped by invalidation.
    pub invalidations: u64,
    /// Pages brought in by read-ahead, beyond the one missed.
    pub read_ahead: u64,
    /// READs issued for pages.
    pub page_reads: u64,
    /// Bytes READ from homes.
    pub bytes_read: u64,
    /// Bytes written home.
    pub bytes_written: u64,
}

/// A hasher for page numbers: one multiplication (Fibonacci hashing), where the standard
/// SipHash costs tens of nanoseconds per hit. Page numbers are not attacker-chosen keys here:
/// they come from the program's own addresses.
#[derive(Default, Clone, Copy)]
struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PageTable = HashMap<PageId, u32, std::hash::BuildHasherDefault<PageHasher>>;

/// A frame's page and, when dirty, its twin.
struct Slot {
    page: PageId,
    twin: Option<Box<[u8]>>,
}

/// One shard: frames `0..frames` in `buf`.
struct Shard<B> {
    buf: B,
    frames: usize,
    slots: Vec<Option<Slot>>,
    table: PageTable,
    lru: Lru,
    /// This shard's counters (summed by [`PageCache::stats`]): a hit touches nothing shared
    /// but its shard.
    counts: CacheStats,
    free: Vec<u32>,
    /// Slots with a twin.
    dirty: Vec<u32>,
    /// Twins to reuse, so writes allocate nothing once warm.
    spare_twins: Vec<Box<[u8]>>,
    /// Reused diff runs.
    runs: Vec<Range<usize>>,
}

impl<B> Shard<B> {
    /// The frame invariant: every frame is either free or holds a page in the LRU,
    /// `free.len() + lru.len() == frames`, and the page table maps exactly the LRU's pages.
    fn debug_check(&self) {
        debug_assert_eq!(self.free.len() + self.lru.len(), self.frames, "page cache frames leaked");
        debug_assert_eq!(self.table.len(), self.lru.len(), "page table and LRU disagree");
    }
}

/// Splits `len` bytes at byte address `addr` by page: (page, range within the page, range
/// within the caller's buffer).
fn pieces(addr: u64, len: usize) -> impl Iterator<Item = (PageId, Range<usize>, Range<usize>)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done == len {
            return None;
        }
        let at = addr + done as u64;
        let (page, offset) = (at / PAGE_SIZE as u64, (at % PAGE_SIZE as u64) as usize);
        let n = (PAGE_SIZE - offset).min(len - done);
        let piece = (page, offset..offset + n, done..done + n);
        done += n;
        Some(piece)
    })
}

/// The page of the `len` bytes at `addr` and their range in it, when they lie in one page.
fn one_page(addr: u64, len: usize) -> Option<(PageId, Range<usize>)> {
    let offset = (addr % PAGE_SIZE as u64) as usize;
    (len > 0 && offset + len <= PAGE_SIZE).then(|| (addr / PAGE_SIZE as u64, offset..offset + len))
}

/// Writes `src` at `in_page` of the cached page in `slot`, making its twin first if it was
/// clean.
fn write_frame<B: LocalBuffer>(shard: &mut Shard<B>, slot: u32, in_page: Range<usize>, src: &[u8]) {
    let range = frame(slot);
    let entry = shard.slots[slot as usize].as_mut().expect("a cached slot has a page");
    if entry.twin.is_none() {
        let mut twin = shard.spare_twins.pop().unwrap_or_else(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
        twin.copy_from_slice(&shard.buf[range.clone()]);
        entry.twin = Some(twin);
        shard.dirty.push(slot);
    }
    shard.buf[range.start + in_page.start..range.start + in_page.end].copy_from_slice(src);
}

fn frame(slot: u32) -> Range<usize> {
    let start = slot as usize * PAGE_SIZE;
    start..start + PAGE_SIZE
}

/// A shard on cache lines of its own, so threads busy with different shards never share a
/// line (128 bytes: adjacent lines are prefetched in pairs).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A process's page cache; share it between threads, each calling with its own endpoint.
pub struct PageCache<B> {
    shards: Vec<Padded<Mutex<Shard<B>>>>,
    options: CacheOptions,
    /// log2 of `stripe_pages` when it is a power of two (a shift instead of a division).
    stripe_shift: Option<u32>,
    /// The last page the latest miss brought in (for sequential detection); `u64::MAX` for none.
    last_miss: AtomicU64,
    /// Pages written home since the last [`PageCache::take_written`].
    written: Mutex<HashSet<PageId>>,
}

/// READs the pages from `home` on, one per slot of `slots` (distinct, at most 64), each
/// straight into its frame of `buf`, in one doorbell.
fn read_into_frames<E: Endpoint>(
    ep: &mut E,
    buf: &mut E::Buffer,
    home: GlobalAddr,
    slots: &[u32],
) -> rdmem_core::Result<()> {
    let len = (slots.len() * PAGE_SIZE) as u64;
    if home.checked_add(len).is_none() {
        // A `Homes` that gave a run past the end of the address space.
        let pool_size = ep.nodes().iter().find(|n| n.id == home.node()).map_or(0, |n| n.pool_size);
        return Err(rdmem_core::Error::OutOfRange { op: rdmem_core::OpKind::Read, addr: home, len, pool_size });
    }
    // The frames in address order, cut out of the buffer one after another.
    let mut order = [(0u32, 0usize); 64];
    for (i, &slot) in slots.iter().enumerate() {
        order[i] = (slot, i);
    }
    let order = &mut order[..slots.len()];
    order.sort_unstable();
    let mut rest = buf.reg_slice_mut();
    let mut consumed = 0;
    let mut batch = ep.batch();
    for &(slot, i) in order.iter() {
        let start = slot as usize * PAGE_SIZE;
        let (_, tail) = rest.split_at(start - consumed);
        let (dst, after) = tail.split_at(PAGE_SIZE);
        rest = after;
        consumed = start + PAGE_SIZE;
        let src = home.checked_add((i * PAGE_SIZE) as u64).expect("checked above");
        batch.read_into_slice(src, dst);
    }
    batch.submit()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: LocalBuffer> PageCache<B> {
    /// A cache with `options`, its frames registered through `ep`.
    pub fn new<E: Endpoint<Buffer = B>>(ep: &mut E, options: CacheOptions) -> rdmem_core::Result<Self> {
        let shards = options.shards.max(1);
        let frames = ((options.capacity_bytes / PAGE_SIZE as u64) as usize / shards).max(1);
        let shards = (0..shards)
            .map(|_| {
                Ok(Padded(Mutex::new(Shard {
                    buf: ep.buffer(frames * PAGE_SIZE)?,
                    frames,
                    slots: (0..frames).map(|_| None).collect(),
                    table: PageTable::with_capacity_and_hasher(frames, Default::default()),
                    counts: CacheStats::default(),
                    lru: Lru::new(frames),
                    free: (0..frames as u32).rev().collect(),
                    dirty: Vec::new(),
                    spare_twins: Vec::new(),
                    runs: Vec::new(),
                })))
            })
            .collect::<rdmem_core::Result<Vec<_>>>()?;
        let stripe_pages = options.stripe_pages.max(1);
        let stripe_shift = stripe_pages.is_power_of_two().then(|| stripe_pages.trailing_zeros());
        let options = CacheOptions { stripe_pages, ..options };
        Ok(PageCache {
            shards,
            options,
            stripe_shift,
            last_miss: AtomicU64::new(u64::MAX),
            written: Mutex::new(HashSet::new()),
        })
    }

    /// The capacity in pages.
    pub fn capacity_pages(&self) -> usize {
        self.shards.len() * lock(&self.shards[0]).frames
    }

    fn shard_index(&self, page: PageId) -> usize {
        let stripe = match self.stripe_shift {
            Some(shift) => page >> shift,
            None => page / self.options.stripe_pages,
        };
        // Fibonacci hashing spreads consecutive stripes over the shards; a multiply and a
        // shift bring its 32 bits into range (no division on the hit path).
        let h = stripe.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        ((h * self.shards.len() as u64) >> 32) as usize
    }

    /// The shard holding `page` (0 to `shards - 1`): threads whose pages are in different
    /// shards never wait for each other.
    pub fn shard_of(&self, page: PageId) -> usize {
        self.shard_index(page)
    }

    fn shard(&self, page: PageId) -> &Mutex<Shard<B>> {
        &self.shards[self.shard_index(page)]
    }

    /// Copies `dst.len()` bytes at byte address `addr` (in page space) into `dst`, through the
    /// cache.
    pub fn read<E: Endpoint<Buffer = B>>(
        &self,
        ep: &mut E,
        homes: &impl Homes,
        addr: u64,
        dst: &mut [u8],
    ) -> rdmem_core::Result<()> {
        self.each_page(ep, homes, addr, dst.len(), true, |shard, slot, in_page, part| {
            let start = frame(slot).start;
            dst[part].copy_from_slice(&shard.buf[start + in_page.start..start + in_page.end]);
        })
    }

    /// Writes `src` at byte address `addr` (in page space) into the cached pages; they become
    /// dirty and reach their homes on [`PageCache::flush`] or eviction.
    pub fn write<E: Endpoint<Buffer = B>>(
        &self,
        ep: &mut E,
        homes: &impl Homes,
        addr: u64,
        src: &[u8],
    ) -> rdmem_core::Result<()> {
        self.each_page(ep, homes, addr, src.len(), false, |shard, slot, in_page, part| {
            write_frame(shard, slot, in_page, &src[part]);
        })
    }

    /// Runs `each(shard, slot, in_page, part)` for every page of the `len` bytes at `addr`, with
    /// the page cached (READ on a miss; read-ahead when `ahead`) and its shard locked: `in_page`
    /// is the range in the page, `part` the matching range of the caller's bytes.
    fn each_page<E: Endpoint<Buffer = B>>(
        &self,
        ep: &mut E,
        homes: &impl Homes,
        addr: u64,
        len: usize,
        ahead: bool,
        mut each: impl FnMut(&mut Shard<B>, u32, Range<usize>, Range<usize>),
    ) -> rdmem_core::Result<()> {
        for (page, in_page, part) in pieces(addr, len) {
            let mut shard = lock(self.shard(page));
            let slot = match self.hit(&mut shard, page) {
                Some(slot) => slot,
                None => self.miss(&mut shard, ep, homes, page, ahead)?,
            };
            each(&mut shard, slot, in_page, part);
        }
        Ok(())
    }

    /// The slot holding `page` if it is cached (counted as a hit, made most recent).
    #[inline]
    fn hit(&self, shard: &mut Shard<B>, page: PageId) -> Option<u32> {
        let slot = *shard.table.get(&page)?;
        shard.lru.touch(slot as usize);
        shard.counts.hits += 1;
        Some(slot)
    }

    /// The slow path: `page` is not cached. READs it (and, on a sequential miss when `ahead`,
    /// the pages after it) into free frames; counts the miss and makes the page most recent.
    #[cold]
    fn miss<E: Endpoint<Buffer = B>>(
        &self,
        shard: &mut Shard<B>,
        ep: &mut E,
        homes: &impl Homes,
        page: PageId,
        ahead: bool,
    ) -> rdmem_core::Result<u32> {
        shard.counts.misses += 1;
        let home = homes.home(page)?;
        let sequential = page > 0 && self.last_miss.load(Ordering::Relaxed) == page - 1;
        let mut count = 1;
        if ahead && sequential && self.options.read_ahead > 0 {
            let limit = (self.options.read_ahead + 1).min(home.run as usize).min(shard.frames);
            while count < limit && !shard.table.contains_key(&(page + count as u64)) {
                count += 1;
            }
        }
        // Room first (this may write dirty victims home), then one READ. The slots taken are in
        // neither the free list nor the LRU until the READ succeeds: on any error they go back
        // to the free list, so the shard never loses a frame.
        let mut slots = [0u32; 64];
        let count = count.min(slots.len());
        let mut taken = 0;
        let mut room = Ok(());
        while taken < count {
            match self.free_slot(shard, ep, homes) {
                Ok(slot) => slots[taken] = slot,
                Err(e) => {
                    room = Err(e);
                    break;
                }
            }
            taken += 1;
        }
        let bytes = count * PAGE_SIZE;
        let read = room.and_then(|()| {
            if count == 1 {
                ep.read_into(home.addr, &mut shard.buf, frame(slots[0]))
            } else {
                read_into_frames(ep, &mut shard.buf, home.addr, &slots[..count])
            }
        });
        if let Err(e) = read {
            shard.free.extend_from_slice(&slots[..taken]);
            shard.debug_check();
            return Err(e);
        }
        if count > 1 {
            shard.counts.read_ahead += count as u64 - 1;
        }
        // The next miss is sequential if it comes right after the last page brought in.
        self.last_miss.store(page + count as u64 - 1, Ordering::Relaxed);
        shard.counts.page_reads += 1;
        shard.counts.bytes_read += bytes as u64;
        // The pages read ahead first, so the one asked for is the most recent.
        for i in (0..count).rev() {
            let (p, slot) = (page + i as u64, slots[i]);
            shard.slots[slot as usize] = Some(Slot { page: p, twin: None });
            shard.table.insert(p, slot);
            shard.lru.push_most_recent(slot as usize);
        }
        shard.debug_check();
        Ok(slots[0])
    }

    /// A free frame slot, evicting the least recent page (written home first if dirty).
    fn free_slot<E: Endpoint<Buffer = B>>(
        &self,
        shard: &mut Shard<B>,
        ep: &mut E,
        homes: &impl Homes,
    ) -> rdmem_core::Result<u32> {
        if let Some(slot) = shard.free.pop() {
            return Ok(slot);
        }
        // Every frame is free or in the LRU (`Shard::debug_check`), and callers take fewer
        // slots than the shard has frames: a shard with no free frame has pages to evict.
        let Some(victim) = shard.lru.least_recent() else {
            return Err(rdmem_core::Error::Config(
                "page cache: a shard has no frame left (a bug: frames leaked)".into(),
            ));
        };
        let victim = victim as u32;
        self.write_home(shard, ep, homes, &[victim])?;
        shard.lru.remove(victim as usize);
        let page = shard.slots[victim as usize].take().expect("a linked slot has a page").page;
        shard.table.remove(&page);
        shard.counts.evictions += 1;
        Ok(victim)
    }

    /// Writes the diffs of the dirty pages among `slots` home in one batch, then makes them
    /// clean and remembers them as written.
    fn write_home<E: Endpoint<Buffer = B>>(
        &self,
        shard: &mut Shard<B>,
        ep: &mut E,
        homes: &impl Homes,
        slots: &[u32],
    ) -> rdmem_core::Result<()> {
        let Shard { buf, slots: entries, runs, .. } = shard;
        runs.clear();
        // (slot, home, first run, end of runs) per dirty page.
        let mut pages: Vec<(u32, GlobalAddr, usize, usize)> = Vec::new();
        for &slot in slots {
            let Some(Slot { page, twin: Some(twin) }) = &entries[slot as usize] else { continue };
            let home = homes.home(*page)?;
            let first = runs.len();
            diff::diff_runs(twin, &buf[frame(slot)], runs);
            pages.push((slot, home.addr, first, runs.len()));
        }
        if pages.is_empty() {
            return Ok(());
        }
        let mut bytes = 0;
        let mut batch = ep.batch();
        for &(slot, home, first, end) in &pages {
            let base = frame(slot).start;
            for r in &runs[first..end] {
                let dst = home.checked_add(r.start as u64).expect("a page lies inside its pool");
                batch.write_from(dst, buf, base + r.start..base + r.end);
                bytes += r.len();
            }
        }
        batch.submit()?;
        shard.counts.write_backs += pages.len() as u64;
        shard.counts.bytes_written += bytes as u64;
        let mut written = lock(&self.written);
        for &(slot, ..) in &pages {
            let entry = entries[slot as usize].as_mut().expect("a dirty slot has a page");
            if let Some(twin) = entry.twin.take() {
                shard.spare_twins.push(twin);
            }
            written.insert(entry.page);
        }
        shard.dirty.retain(|s| !slots.contains(s));
        Ok(())
    }

    /// Writes every dirty page's diff home (one batch per shard); the pages stay cached, clean.
    pub fn flush<E: Endpoint<Buffer = B>>(&self, ep: &mut E, homes: &impl Homes) -> rdmem_core::Result<()> {
        for shard in &self.shards {
            let mut shard = lock(shard);
            if shard.dirty.is_empty() {
                continue;
            }
            let dirty = std::mem::take(&mut shard.dirty);
            let result = self.write_home(&mut shard, ep, homes, &dirty);
            if result.is_err() {
                // Nothing is lost: the pages keep their twins and stay dirty.
                shard.dirty = dirty;
            }
            result?;
        }
        Ok(())
    }

    /// Writes the diffs of those of `pages` that are cached and dirty home (one batch per shard
    /// they fall in); the pages stay cached, clean. Pages not cached are skipped: they were
    /// written home when they left.
    pub fn flush_pages<E: Endpoint<Buffer = B>>(
        &self,
        ep: &mut E,
        homes: &impl Homes,
        pages: &[PageId],
    ) -> rdmem_core::Result<()> {
        let mut slots = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let mut shard = lock(shard);
            if shard.dirty.is_empty() {
                continue;
            }
            slots.clear();
            for &page in pages.iter().filter(|&&p| self.shard_index(p) == i) {
                if let Some(&slot) = shard.table.get(&page) {
                    slots.push(slot);
                }
            }
            if !slots.is_empty() {
                self.write_home(&mut shard, ep, homes, &slots)?;
            }
        }
        Ok(())
    }

    /// Drops `pages` from the cache (writing a dirty one's diff home first), so the next access
    /// READs them again.
    pub fn invalidate<E: Endpoint<Buffer = B>>(
        &self,
        ep: &mut E,
        homes: &impl Homes,
        pages: impl IntoIterator<Item = PageId>,
    ) -> rdmem_core::Result<()> {
        for page in pages {
            let mut shard = lock(self.shard(page));
            let Some(&slot) = shard.table.get(&page) else { continue };
            self.write_home(&mut shard, ep, homes, &[slot])?;
            self.drop_slot(&mut shard, slot);
        }
        Ok(())
    }

    /// Drops every page (dirty ones written home first).
    pub fn invalidate_all<E: Endpoint<Buffer = B>>(&self, ep: &mut E, homes: &impl Homes) -> rdmem_core::Result<()> {
        self.flush(ep, homes)?;
        for shard in &self.shards {
            let mut shard = lock(shard);
            let cached: Vec<u32> = shard.table.values().copied().collect();
            for slot in cached {
                self.drop_slot(&mut shard, slot);
            }
        }
        Ok(())
    }

    fn drop_slot(&self, shard: &mut Shard<B>, slot: u32) {
        let entry = shard.slots[slot as usize].take().expect("a cached slot has a page");
        shard.table.remove(&entry.page);
        shard.lru.remove(slot as usize);
        shard.free.push(slot);
        shard.counts.invalidations += 1;
    }

    /// The pages written home (by a flush, an eviction or an invalidation) since the last call,
    /// sorted, and forgets them: the DSM's barrier notices.
    pub fn take_written(&self) -> Vec<PageId> {
        let mut pages: Vec<PageId> = lock(&self.written).drain().collect();
        pages.sort_unstable();
        pages
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        let mut total = CacheStats::default();
        for shard in &self.shards {
            let c = lock(shard).counts;
            total.hits += c.hits;
            total.misses += c.misses;
            total.evictions += c.evictions;
            total.write_backs += c.write_backs;
            total.invalidations += c.invalidations;
            total.read_ahead += c.read_ahead;
            total.page_reads += c.page_reads;
            total.bytes_read += c.bytes_read;
            total.bytes_written += c.bytes_written;
        }
        total
    }

    /// The hit path alone, with no endpoint: copies the `dst.len()` bytes at `addr` when they
    /// lie in one page that is cached (`true`, counted as a hit); does nothing otherwise
    /// (`false`: use [`PageCache::read`]).
    pub fn read_if_cached(&self, addr: u64, dst: &mut [u8]) -> bool {
        let Some((page, in_page)) = one_page(addr, dst.len()) else { return false };
        let mut shard = lock(self.shard(page));
        let Some(slot) = self.hit(&mut shard, page) else { return false };
        let start = frame(slot).start;
        dst.copy_from_slice(&shard.buf[start + in_page.start..start + in_page.end]);
        true
    }

    /// The hit path of [`PageCache::write`], with no endpoint: writes `src` at `addr` when it
    /// lies in one page that is cached (`true`); does nothing otherwise (`false`).
    pub fn write_if_cached(&self, addr: u64, src: &[u8]) -> bool {
        let Some((page, in_page)) = one_page(addr, src.len()) else { return false };
        let mut shard = lock(self.shard(page));
        let Some(slot) = self.hit(&mut shard, page) else { return false };
        write_frame(&mut shard, slot, in_page, src);
        true
    }

    /// The pages of `page`'s shard, least recently used first (for tests and debugging).
    pub fn lru_order(&self, page: PageId) -> Vec<PageId> {
        let shard = lock(self.shard(page));
        shard.lru.iter_least_to_most().map(|slot| shard.slots[slot].as_ref().expect("linked").page).collect()
    }

    /// True when `page` is cached.
    pub fn is_cached(&self, page: PageId) -> bool {
        lock(self.shard(page)).table.contains_key(&page)
    }

    /// True when `page` is cached and dirty.
    pub fn is_dirty(&self, page: PageId) -> bool {
        let shard = lock(self.shard(page));
        shard.table.get(&page).is_some_and(|&s| shard.slots[s as usize].as_ref().is_some_and(|e| e.twin.is_some()))
    }
}
