//! The page store: pools of pages under (pool, object, index) keys, a bounded local tier of
//! compressed pages, and remote space on memory nodes taken from rdmem's allocator.
//!
//! # Where a page lives
//! A put encodes the page ([`crate::page`]): same-filled pages become their 8-byte pattern and
//! take no space; the others are compressed (or kept as they are when that does not help) and
//! go to the *local tier*, a heap copy in the store. When a shard of the local tier is over
//! its share of [`StoreOptions::local_capacity`], its oldest pages are *remotified*: each gets
//! a block from the allocator and all of them are written with one doorbell
//! ([`StoreOptions::batch`] pages per batch), and only then do they leave the local tier. A
//! background [`Remotifier`] does this ahead of need, above [`StoreOptions::remotify_above`].
//!
//! # Shards and races
//! Keys are spread over [`StoreOptions::shards`] shards, each behind its own mutex; no
//! operation holds a shard's lock across the network. Every version of a page has a
//! generation (unique in its shard, never reused), and a remote block stays untouched while
//! its version is current: it is freed only after its entry has changed. So a `get` that read
//! a block and finds the same generation afterwards read that version's bytes; otherwise it
//! looks again. Every page also carries an XXH3 checksum of its bytes, checked on every `get`.
//!
//! # Pools
//! A persistent pool never loses a page whose put returned `Ok` (frontswap): when neither the
//! local tier nor any memory node has room, the put fails with [`TmemError::Full`]. An
//! ephemeral pool may drop pages (cleancache): its oldest local pages go first when room is
//! short, its put may store nothing, and a `get` may miss. In both, a put that did not store
//! its page also removes the older version under that key, so a `get` returns the last page
//! put or nothing, never an earlier one.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rdmem_allocator::{AllocError, Allocator, ThreadAlloc};
use rdmem_core::{Endpoint, GlobalAddr, Transport};

use crate::error::{Result, TmemError, Where};
use crate::page::{self, Encoded, PAGE_SIZE, Page, SCRATCH};

/// The most pools a store holds at once.
pub const MAX_POOLS: usize = 256;

/// The most pages one remotify batch writes with one doorbell.
pub const MAX_BATCH: usize = 256;

/// How often an idle remotifier looks at the local tier anyway.
const REMOTIFIER_IDLE: Duration = Duration::from_millis(10);

/// Tries a put makes to bring its shard under its share before it gives up on remote room.
const ROOM_TRIES: usize = 8;

/// A pool of a store: its slot and the generation of that slot, so the id of a destroyed pool
/// never names the pool created in its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId {
    slot: u16,
    generation: u32,
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.slot, self.generation)
    }
}

/// What a pool promises about the pages put in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// A page whose put returned `Ok` is kept until flushed (frontswap: swap pages).
    Persistent,
    /// Pages may be dropped at any time; `get` may miss (cleancache: clean page-cache pages).
    Ephemeral,
}

/// A page's key: the pool, an object in it (a file, a swap device) and the page's index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The pool.
    pub pool: PoolId,
    /// The object.
    pub object: u64,
    /// The page's index in the object.
    pub index: u32,
}

impl Key {
    /// The smallest and largest keys of `pool`: its pages are the keys between them.
    fn first_of(pool: PoolId) -> Key {
        Key { pool, object: 0, index: 0 }
    }

    fn last_of(pool: PoolId) -> Key {
        Key { pool, object: u64::MAX, index: u32::MAX }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {} of object {} in pool {}", self.index, self.object, self.pool)
    }
}

/// How a store keeps its pages.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes of (compressed) pages kept in local memory; past this, the oldest go to memory
    /// nodes. Split evenly over the shards. 0: every page that takes space goes remote at once.
    pub local_capacity: usize,
    /// The background [`Remotifier`] moves pages out of a shard once the local tier holds more
    /// than this (split over the shards the same way); more than `local_capacity` is taken as
    /// `local_capacity`.
    pub remotify_above: usize,
    /// Compress pages with LZ4 (false: keep them as they are; same-filled pages take no space
    /// either way).
    pub compress: bool,
    /// Pages written per remotify batch, with one doorbell (1 to [`MAX_BATCH`]).
    pub batch: usize,
    /// Shards of the index and the local tier (1 to 4096).
    pub shards: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { local_capacity: 64 << 20, remotify_above: 32 << 20, compress: true, batch: 32, shards: 64 }
    }
}

/// Counters and sizes of a store (summed over its shards by [`PageStore::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Puts that stored their page.
    pub puts: u64,
    /// Puts that stored nothing (an ephemeral pool short of room, or [`TmemError::Full`]).
    pub puts_refused: u64,
    /// Gets that found their page.
    pub hits: u64,
    /// Gets that found nothing.
    pub misses: u64,
    /// Pages removed by a flush (of a page, an object or a pool).
    pub flushed: u64,
    /// Ephemeral pages dropped to make room.
    pub dropped: u64,
    /// Pages moved from the local tier to memory nodes.
    pub remotified: u64,
    /// Pages kept as their fill pattern (no space).
    pub filled_pages: u64,
    /// Pages in the local tier, and their bytes (as kept: compressed or not).
    pub local_pages: u64,
    /// See `local_pages`.
    pub local_bytes: u64,
    /// Pages on memory nodes, and their bytes (as kept; each takes an allocator block of the
    /// next power of two, at least 16 bytes).
    pub remote_pages: u64,
    /// See `remote_pages`.
    pub remote_bytes: u64,
}

impl StoreStats {
    /// Pages stored.
    pub fn pages(&self) -> u64 {
        self.filled_pages + self.local_pages + self.remote_pages
    }

    /// Bytes of the pages stored, over the bytes they take (same-filled ones count, and take
    /// none); `None` while no page takes any space (nothing stored, or only same-filled pages).
    pub fn compression_ratio(&self) -> Option<f64> {
        let kept = self.local_bytes + self.remote_bytes;
        (kept > 0).then(|| (self.pages() * PAGE_SIZE as u64) as f64 / kept as f64)
    }

    fn add(&mut self, o: &StoreStats) {
        self.puts += o.puts;
        self.puts_refused += o.puts_refused;
        self.hits += o.hits;
        self.misses += o.misses;
        self.flushed += o.flushed;
        self.dropped += o.dropped;
        self.remotified += o.remotified;
        self.filled_pages += o.filled_pages;
        self.local_pages += o.local_pages;
        self.local_bytes += o.local_bytes;
        self.remote_pages += o.remote_pages;
        self.remote_bytes += o.remote_bytes;
    }
}

/// One version of a page.
struct Entry {
    generation: u64,
    kind: PoolKind,
    checksum: u64,
    body: Body,
}

enum Body {
    Filled(u64),
    Local { bytes: Box<[u8]>, compressed: bool },
    Remote { addr: GlobalAddr, len: u32, compressed: bool },
}

#[derive(Default)]
struct Shard {
    map: BTreeMap<Key, Entry>,
    /// Local entries, oldest first, with their generation (stale ones are skipped).
    local: VecDeque<(Key, u64)>,
    /// Bytes of local pages a remotify batch has taken off `local` and is writing out: they
    /// still count in `stats.local_bytes` until published, but are leaving.
    moving: u64,
    next_generation: u64,
    stats: StoreStats,
}

impl Shard {
    /// Local bytes that stay local: those not being written out by a remotify batch.
    fn resident(&self) -> u64 {
        self.stats.local_bytes - self.moving
    }

    /// Drops queue entries of versions that are gone (replaced, flushed), once they outnumber
    /// the local pages: the queue stays within about twice the local tier's page count.
    fn compact_queue(&mut self) {
        if self.local.len() > 2 * self.stats.local_pages as usize + 64 {
            let map = &self.map;
            self.local.retain(|(key, generation)| {
                map.get(key).is_some_and(|e| e.generation == *generation && matches!(e.body, Body::Local { .. }))
            });
        }
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Takes `key`'s entry out, keeping the counts right; its remote block (if any) is the
    /// caller's to free.
    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        self.uncount(&entry);
        Some(entry)
    }

    fn count(&mut self, entry: &Entry) {
        match &entry.body {
            Body::Filled(_) => self.stats.filled_pages += 1,
            Body::Local { bytes, .. } => {
                self.stats.local_pages += 1;
                self.stats.local_bytes += bytes.len() as u64;
            }
            Body::Remote { len, .. } => {
                self.stats.remote_pages += 1;
                self.stats.remote_bytes += u64::from(*len);
            }
        }
    }

    fn uncount(&mut self, entry: &Entry) {
        match &entry.body {
            Body::Filled(_) => self.stats.filled_pages -= 1,
            Body::Local { bytes, .. } => {
                self.stats.local_pages -= 1;
                self.stats.local_bytes -= bytes.len() as u64;
            }
            Body::Remote { len, .. } => {
                self.stats.remote_pages -= 1;
                self.stats.remote_bytes -= u64::from(*len);
            }
        }
    }

    /// Drops the oldest local ephemeral pages until the local tier holds at most `limit`
    /// resident bytes; false if that was not enough.
    fn drop_ephemeral(&mut self, limit: u64) -> bool {
        let mut keep = VecDeque::new();
        while self.resident() > limit {
            let Some((key, generation)) = self.local.pop_front() else { break };
            match self.map.get(&key) {
                Some(e)
                    if e.generation == generation
                        && e.kind == PoolKind::Ephemeral
                        && matches!(e.body, Body::Local { .. }) =>
                {
                    self.remove(&key);
                    self.stats.dropped += 1;
                }
                Some(e) if e.generation == generation => keep.push_back((key, generation)),
                _ => {}
            }
        }
        while let Some(k) = keep.pop_back() {
            self.local.push_front(k);
        }
        self.resident() <= limit
    }
}

/// Cache-line aligned, so that neighbouring shards' locks do not share a line.
#[repr(align(128))]
struct Padded<T>(T);

struct Shared<T: Transport> {
    allocator: Allocator<T>,
    options: StoreOptions,
    shards: Box<[Padded<Mutex<Shard>>]>,
    /// Per pool slot: 0 free, else `generation << 2 | kind` (1 persistent, 2 ephemeral, 3 being
    /// destroyed).
    pools: Box<[AtomicU32]>,
    /// Local-tier bytes each shard may hold, and the bytes above which the remotifier works.
    shard_capacity: u64,
    shard_remotify_above: u64,
    /// The remotifier's thread, to wake when a shard goes over `shard_remotify_above`.
    remotifier: Mutex<Option<std::thread::Thread>>,
    remotify_wanted: AtomicBool,
}

const STATE_PERSISTENT: u32 = 1;
const STATE_EPHEMERAL: u32 = 2;
const STATE_DESTROYING: u32 = 3;

/// The state bits of a live pool of `kind`.
fn state_of(kind: PoolKind) -> u32 {
    match kind {
        PoolKind::Persistent => STATE_PERSISTENT,
        PoolKind::Ephemeral => STATE_EPHEMERAL,
    }
}

/// A store of pages, shared by the threads of a process (clone it freely). Each thread works
/// through its own [`StoreHandle`] ([`PageStore::handle`]). When the last clone and handle are
/// dropped, the store's remote blocks go back to the allocator (its pages are gone).
///
/// ```
/// use std::sync::Arc;
/// use rdmem_allocator::{Allocator, AllocatorOptions};
/// use rdmem_core::LoopbackTransport;
/// use rdmem_tmem::{PAGE_SIZE, PageStore, PoolKind, StoreOptions};
///
/// let transport = Arc::new(LoopbackTransport::new(&[64 << 20])); // or RdmaTransport
/// let allocator = Allocator::new(transport, AllocatorOptions::default())?;
/// let store = PageStore::new(allocator, StoreOptions { local_capacity: 0, ..StoreOptions::default() })?;
/// let pool = store.create_pool(PoolKind::Persistent)?;
/// let mut handle = store.handle()?; // one per thread
///
/// let page = [7u8; PAGE_SIZE];
/// handle.put(pool, 1, 0, &page)?; // local_capacity 0: written to the memory node at once
/// let mut out = [0u8; PAGE_SIZE];
/// assert!(handle.get(pool, 1, 0, &mut out)?);
/// assert_eq!(out, page);
/// assert!(handle.flush_page(pool, 1, 0)?);
/// assert!(!handle.get(pool, 1, 0, &mut out)?);
/// # Ok::<(), rdmem_tmem::TmemError>(())
/// ```
pub struct PageStore<T: Transport> {
    shared: Arc<Shared<T>>,
}

impl<T: Transport> Clone for PageStore<T> {
    fn clone(&self) -> Self {
        PageStore { shared: Arc::clone(&self.shared) }
    }
}

impl<T: Transport> PageStore<T> {
    /// A store whose remote pages come from `allocator` (its placement and mode decide which
    /// memory node takes them, and what happens when one is full).
    pub fn new(allocator: Allocator<T>, options: StoreOptions) -> Result<Self> {
        if !(1..=MAX_BATCH).contains(&options.batch) {
            return Err(TmemError::InvalidOptions(format!("batch {} is not in 1..={MAX_BATCH}", options.batch)));
        }
        if !(1..=4096).contains(&options.shards) {
            return Err(TmemError::InvalidOptions(format!("shards {} is not in 1..=4096", options.shards)));
        }
        let mut options = options;
        options.remotify_above = options.remotify_above.min(options.local_capacity);
        let shards = options.shards as u64;
        let shared = Shared {
            allocator,
            shard_capacity: options.local_capacity as u64 / shards,
            shard_remotify_above: options.remotify_above as u64 / shards,
            shards: (0..options.shards).map(|_| Padded(Mutex::default())).collect(),
            pools: (0..MAX_POOLS).map(|_| AtomicU32::new(0)).collect(),
            options,
            remotifier: Mutex::new(None),
            remotify_wanted: AtomicBool::new(false),
        };
        Ok(PageStore { shared: Arc::new(shared) })
    }

    /// The options it was made with.
    pub fn options(&self) -> &StoreOptions {
        &self.shared.options
    }

    /// Creates a pool; fails with [`TmemError::InvalidOptions`] when [`MAX_POOLS`] exist.
    pub fn create_pool(&self, kind: PoolKind) -> Result<PoolId> {
        let kind_bits = state_of(kind);
        for (slot, state) in self.shared.pools.iter().enumerate() {
            let mut current = state.load(Ordering::Acquire);
            // A free slot keeps the generation of its last pool in its upper bits (state 0).
            while current & 3 == 0 {
                let generation = (current >> 2).wrapping_add(1).max(1) & (u32::MAX >> 2);
                match state.compare_exchange(current, generation << 2 | kind_bits, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Ok(PoolId { slot: slot as u16, generation }),
                    Err(now) => current = now,
                }
            }
        }
        Err(TmemError::InvalidOptions(format!("all {MAX_POOLS} pools are in use: destroy one first")))
    }

    /// The kind of `pool`, or [`TmemError::UnknownPool`].
    pub fn pool_kind(&self, pool: PoolId) -> Result<PoolKind> {
        self.shared.kind(pool)
    }

    /// A thread's handle: its allocator (with its endpoint) and registered memory for a batch.
    pub fn handle(&self) -> Result<StoreHandle<T>> {
        let alloc = self.shared.allocator.thread()?;
        let staging = alloc.with_endpoint(|ep| ep.buffer(self.shared.options.batch * PAGE_SIZE))?;
        Ok(StoreHandle { store: self.clone(), alloc, staging, scratch: vec![0; SCRATCH].into_boxed_slice() })
    }

    /// The store's counters and sizes, summed over its shards.
    pub fn stats(&self) -> StoreStats {
        let mut total = StoreStats::default();
        for shard in self.shared.shards.iter() {
            total.add(&lock(&shard.0).stats);
        }
        total
    }

    /// Starts the background thread that moves pages out of the local tier while a shard holds
    /// more than its share of [`StoreOptions::remotify_above`]; it stops when the returned
    /// guard is dropped. One at a time per store.
    pub fn start_remotifier(&self) -> Result<Remotifier> {
        let mut slot = lock(&self.shared.remotifier);
        if slot.is_some() {
            return Err(TmemError::InvalidOptions("this store already has a remotifier running".into()));
        }
        let mut handle = self.handle()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("rdmem-tmem-remotify".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    handle.store.shared.remotify_wanted.store(false, Ordering::Release);
                    let moved = handle.remotify_over(handle.store.shared.shard_remotify_above);
                    match moved {
                        Ok(0) => std::thread::park_timeout(REMOTIFIER_IDLE),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!("remotifier: {e}; the local tier keeps the pages for now");
                            std::thread::park_timeout(REMOTIFIER_IDLE * 10);
                        }
                    }
                }
                let store = handle.store.clone();
                drop(handle);
                *lock(&store.shared.remotifier) = None;
            })
            .map_err(|e| TmemError::InvalidOptions(format!("cannot start the remotifier thread: {e}")))?;
        *slot = Some(thread.thread().clone());
        Ok(Remotifier { stop, thread: Some(thread) })
    }
}

impl<T: Transport> Shared<T> {
    /// True when a remotifier should be woken (it is not already asked to).
    fn remotifier_wanted(&self) -> bool {
        !self.remotify_wanted.load(Ordering::Relaxed) && !self.remotify_wanted.swap(true, Ordering::AcqRel)
    }

    fn wake_remotifier(&self) {
        if let Some(thread) = lock(&self.remotifier).as_ref() {
            thread.unpark();
        }
    }

    fn kind(&self, pool: PoolId) -> Result<PoolKind> {
        let state = self.pools.get(pool.slot as usize).map(|s| s.load(Ordering::Acquire));
        match state {
            Some(s) if s >> 2 == pool.generation && s & 3 == STATE_PERSISTENT => Ok(PoolKind::Persistent),
            Some(s) if s >> 2 == pool.generation && s & 3 == STATE_EPHEMERAL => Ok(PoolKind::Ephemeral),
            _ => Err(TmemError::UnknownPool(pool)),
        }
    }

    fn shard_of(&self, key: &Key) -> usize {
        // Runs of 16 pages share a shard (neighbours are often used together).
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&key.object.to_le_bytes());
        bytes[8..].copy_from_slice(&(u64::from(key.index >> 4) | u64::from(key.pool.slot) << 32).to_le_bytes());
        let h = xxhash_rust::xxh3::xxh3_64(&bytes);
        (h % self.shards.len() as u64) as usize
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[i].0)
    }
}

impl<T: Transport> Drop for Shared<T> {
    /// The last handle and clone are gone: the remote blocks go back to the allocator.
    fn drop(&mut self) {
        let mut blocks = Vec::new();
        for shard in self.shards.iter_mut() {
            let shard = shard.0.get_mut().unwrap_or_else(|p| p.into_inner());
            blocks.extend(shard.map.values().filter_map(|e| match e.body {
                Body::Remote { addr, .. } => Some(addr),
                _ => None,
            }));
        }
        if blocks.is_empty() {
            return;
        }
        match self.allocator.thread() {
            Ok(alloc) => {
                for addr in blocks {
                    if let Err(e) = alloc.free(addr) {
                        tracing::warn!("page store: cannot free the remote block at {addr}: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!("page store: cannot free its {} remote blocks: {e}", blocks.len()),
        }
    }
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    // A panic while holding a shard leaves counts possibly off by one page, never a page
    // handed out for another: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The background remotifier of a store ([`PageStore::start_remotifier`]); dropping it stops
/// the thread (after the batch it is writing).
pub struct Remotifier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Remotifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// What one remotify batch did: pages taken off the queue, and how many of them went remote.
struct Batch {
    picked: usize,
    moved: usize,
}

/// One page picked for a remotify batch.
struct Moving {
    key: Key,
    generation: u64,
    at: usize,
    len: usize,
    compressed: bool,
    addr: Option<GlobalAddr>,
}

/// A thread's way into a [`PageStore`]: `put`, `get`, the flushes and remotify. Not `Sync`:
/// make one per thread.
pub struct StoreHandle<T: Transport> {
    store: PageStore<T>,
    alloc: ThreadAlloc<T>,
    /// Registered memory: a remotify batch is gathered here and written from it; a remote
    /// page is read into it.
    staging: <T::Endpoint as Endpoint>::Buffer,
    /// Where a page is compressed.
    scratch: Box<[u8]>,
}

impl<T: Transport> StoreHandle<T> {
    /// The store.
    pub fn store(&self) -> &PageStore<T> {
        &self.store
    }

    /// Stores `page` under (`pool`, `object`, `index`), replacing what was there. In a
    /// persistent pool, `Ok` means the page is kept until flushed; [`TmemError::Full`] means
    /// it was not stored. In an ephemeral pool, `Ok` promises nothing. Either way, when the
    /// page was not stored, the older version under its key is gone too.
    pub fn put(&mut self, pool: PoolId, object: u64, index: u32, page: &Page) -> Result<()> {
        let shared = &self.store.shared;
        let kind = shared.kind(pool)?;
        let key = Key { pool, object, index };
        let checksum = page::checksum(page);
        let body = match page::encode(page, shared.options.compress, &mut self.scratch) {
            Encoded::Filled(word) => Body::Filled(word),
            Encoded::Bytes { bytes, compressed } => Body::Local { bytes: bytes.into(), compressed },
        };
        let s = shared.shard_of(&key);
        let (old, generation, over) = {
            let mut shard = shared.shard(s);
            // Checked again under the shard's lock: a pool being destroyed takes no more pages.
            shared.kind(pool)?;
            let generation = shard.generation();
            let entry = Entry { generation, kind, checksum, body };
            shard.count(&entry);
            let local = matches!(entry.body, Body::Local { .. });
            shard.stats.puts += 1;
            let old = shard.map.insert(key, entry);
            if let Some(o) = &old {
                shard.uncount(o);
            }
            if local {
                shard.local.push_back((key, generation));
                shard.compact_queue();
            }
            (old, generation, shard.resident())
        };
        self.free_body(old.map(|e| e.body));
        if over > shared.shard_remotify_above && shared.remotifier_wanted() {
            shared.wake_remotifier();
        }
        if over > shared.shard_capacity {
            self.make_room(s, key, generation)?;
        }
        Ok(())
    }

    /// Brings shard `s` under its capacity after the put of `key` (version `generation`):
    /// remotify its oldest pages, then drop ephemeral ones; failing both, the put is undone.
    fn make_room(&mut self, s: usize, key: Key, generation: u64) -> Result<()> {
        let shared = Arc::clone(&self.store.shared);
        let mut reason = String::new();
        for _ in 0..ROOM_TRIES {
            if shared.shard(s).resident() <= shared.shard_capacity {
                return Ok(());
            }
            // Nothing left to take means the resident bytes are within the capacity (pages
            // another thread is writing out count as gone), so the loop ends at the check.
            match self.remotify_shard(s, shared.shard_capacity) {
                Ok(_) => {}
                Err(TmemError::Alloc(AllocError::OutOfMemory { node, reason: r })) => {
                    reason = format!("{node}: {r}");
                    break;
                }
                Err(e) => {
                    reason = e.to_string();
                    break;
                }
            }
        }
        let mut shard = shared.shard(s);
        if shard.drop_ephemeral(shared.shard_capacity) {
            return Ok(());
        }
        // Still over: the page just put is refused (if it is still the one under its key and
        // still local; another thread may have moved or replaced it meanwhile).
        let refuse = matches!(shard.map.get(&key), Some(e) if e.generation == generation && matches!(e.body, Body::Local { .. }));
        if !refuse {
            return Ok(());
        }
        let entry = shard.remove(&key).expect("just seen");
        shard.stats.puts -= 1;
        shard.stats.puts_refused += 1;
        let local_bytes = shard.stats.local_bytes as usize;
        drop(shard);
        match entry.kind {
            PoolKind::Ephemeral => Ok(()),
            PoolKind::Persistent => Err(TmemError::Full {
                pool: key.pool,
                local_bytes,
                local_capacity: shared.shard_capacity as usize,
                reason: if reason.is_empty() { "the local tier could not be emptied".into() } else { reason },
            }),
        }
    }

    /// Reads the page under (`pool`, `object`, `index`) into `out`: true if there was one.
    /// A page whose bytes do not decode to what was put fails with [`TmemError::Corrupt`] (and
    /// is dropped).
    pub fn get(&mut self, pool: PoolId, object: u64, index: u32, out: &mut Page) -> Result<bool> {
        let shared = &self.store.shared;
        shared.kind(pool)?;
        let key = Key { pool, object, index };
        let s = shared.shard_of(&key);
        loop {
            let (addr, len, compressed, generation, checksum) = {
                let mut shard = shared.shard(s);
                let Some(entry) = shard.map.get(&key) else {
                    shard.stats.misses += 1;
                    return Ok(false);
                };
                let remote = match &entry.body {
                    Body::Filled(word) => {
                        page::fill(out, *word);
                        None
                    }
                    Body::Local { bytes, compressed } => {
                        if !page::decode(bytes, *compressed, out) || page::checksum(out) != entry.checksum {
                            shard.remove(&key);
                            return Err(TmemError::Corrupt { key, at: Where::Local });
                        }
                        None
                    }
                    Body::Remote { addr, len, compressed } => {
                        Some((*addr, *len as usize, *compressed, entry.generation, entry.checksum))
                    }
                };
                match remote {
                    Some(remote) => remote,
                    None => {
                        shard.stats.hits += 1;
                        return Ok(true);
                    }
                }
            };
            Self::read_remote(&self.alloc, &mut self.staging, addr, len)?;
            let mut shard = shared.shard(s);
            // Unchanged since before the READ: the block was this version's all along.
            if !matches!(shard.map.get(&key), Some(e) if e.generation == generation) {
                continue;
            }
            if page::decode(&self.staging[..len], compressed, out) && page::checksum(out) == checksum {
                shard.stats.hits += 1;
                return Ok(true);
            }
            let entry = shard.remove(&key);
            drop(shard);
            self.free_body(entry.map(|e| e.body));
            return Err(TmemError::Corrupt { key, at: Where::Remote(addr) });
        }
    }

    /// Removes the page under (`pool`, `object`, `index`): true if there was one.
    pub fn flush_page(&mut self, pool: PoolId, object: u64, index: u32) -> Result<bool> {
        let shared = &self.store.shared;
        shared.kind(pool)?;
        let key = Key { pool, object, index };
        let entry = {
            let mut shard = shared.shard(shared.shard_of(&key));
            let entry = shard.remove(&key);
            shard.stats.flushed += entry.is_some() as u64;
            entry
        };
        let found = entry.is_some();
        self.free_body(entry.map(|e| e.body));
        Ok(found)
    }

    /// Removes every page of `object` in `pool`: how many there were.
    pub fn flush_object(&mut self, pool: PoolId, object: u64) -> Result<u64> {
        self.store.shared.kind(pool)?;
        let first = Key { pool, object, index: 0 };
        Ok(self.flush_range(first, Key { index: u32::MAX, ..first }))
    }

    /// Removes every page of `pool` (the pool stays): how many there were.
    pub fn flush_pool(&mut self, pool: PoolId) -> Result<u64> {
        self.store.shared.kind(pool)?;
        Ok(self.flush_range(Key::first_of(pool), Key::last_of(pool)))
    }

    /// Removes every page of `pool` and the pool: its id is unknown from then on (a pool
    /// created later gets another id). Puts racing with it either land before and are removed,
    /// or fail with [`TmemError::UnknownPool`].
    pub fn destroy_pool(&mut self, pool: PoolId) -> Result<u64> {
        let shared = Arc::clone(&self.store.shared);
        let kind_bits = state_of(shared.kind(pool)?);
        let state = &shared.pools[pool.slot as usize];
        let live = pool.generation << 2 | kind_bits;
        state
            .compare_exchange(live, pool.generation << 2 | STATE_DESTROYING, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| TmemError::UnknownPool(pool))?;
        let flushed = self.flush_range(Key::first_of(pool), Key::last_of(pool));
        state.store(pool.generation << 2, Ordering::Release);
        Ok(flushed)
    }

    fn flush_range(&mut self, first: Key, last: Key) -> u64 {
        let shared = Arc::clone(&self.store.shared);
        let mut flushed = 0;
        let mut bodies = Vec::new();
        for s in 0..shared.shards.len() {
            {
                let mut shard = shared.shard(s);
                let keys: Vec<Key> = shard.map.range(first..=last).map(|(k, _)| *k).collect();
                for key in &keys {
                    let entry = shard.remove(key).expect("just listed");
                    bodies.push(entry.body);
                }
                shard.stats.flushed += keys.len() as u64;
                flushed += keys.len() as u64;
            }
            for body in bodies.drain(..) {
                self.free_body(Some(body));
            }
        }
        flushed
    }

    /// Moves every page of the local tier to memory nodes now (batched as for the
    /// remotifier): how many moved. Fails with the allocator's error only when no page could
    /// move (no node has room: the pages stay local).
    pub fn remotify(&mut self) -> Result<u64> {
        self.remotify_over(0)
    }

    /// Remotifies every shard down to `limit` bytes of local tier.
    fn remotify_over(&mut self, limit: u64) -> Result<u64> {
        let mut moved = 0;
        for s in 0..self.store.shared.shards.len() {
            loop {
                match self.remotify_shard(s, limit) {
                    Ok(Batch { picked: 0, .. }) => break,
                    Ok(batch) => moved += batch.moved as u64,
                    Err(e) if moved == 0 => return Err(e),
                    Err(e) => {
                        tracing::debug!("remotify stopped after {moved} pages: {e}");
                        return Ok(moved);
                    }
                }
            }
        }
        Ok(moved)
    }

    /// Moves one batch of shard `s`'s oldest local pages to memory nodes, while the shard holds
    /// more than `limit` bytes locally: how many moved (0: nothing to move). The shard is not
    /// locked during the allocation and the WRITEs: its pages stay readable locally until
    /// they are on the node, and a page replaced or flushed meanwhile has its new block freed.
    fn remotify_shard(&mut self, s: usize, limit: u64) -> Result<Batch> {
        let shared = Arc::clone(&self.store.shared);
        let mut moving: Vec<Moving> = Vec::with_capacity(shared.options.batch);
        {
            let mut shard = shared.shard(s);
            let (mut at, mut resident) = (0, shard.resident());
            while moving.len() < shared.options.batch && resident > limit {
                let Some((key, generation)) = shard.local.pop_front() else { break };
                let Some(Entry { generation: g, body: Body::Local { bytes, compressed }, .. }) = shard.map.get(&key)
                else {
                    continue;
                };
                if *g != generation {
                    continue;
                }
                self.staging[at..at + bytes.len()].copy_from_slice(bytes);
                moving.push(Moving { key, generation, at, len: bytes.len(), compressed: *compressed, addr: None });
                at += bytes.len();
                resident -= bytes.len() as u64;
            }
            shard.moving += at as u64;
        }
        if moving.is_empty() {
            return Ok(Batch { picked: 0, moved: 0 });
        }
        let mut failure = None;
        for m in moving.iter_mut() {
            let layout = std::alloc::Layout::from_size_align(m.len, 8).expect("a page's length");
            match self.alloc.alloc(layout) {
                Ok(addr) => m.addr = Some(addr),
                Err(e) => {
                    failure = Some(TmemError::from(e));
                    break;
                }
            }
        }
        let staging = &self.staging;
        let written = self.alloc.with_endpoint(|ep| {
            let mut batch = ep.batch();
            for m in &moving {
                if let Some(addr) = m.addr {
                    batch.write_from(addr, staging, m.at..m.at + m.len);
                }
            }
            batch.submit()
        });
        if let Err(e) = written {
            // Nothing is published: every page stays local, and the blocks go back.
            for m in moving.iter_mut() {
                if let Some(addr) = m.addr.take() {
                    self.free_block(addr);
                }
            }
            failure = Some(e.into());
        }
        let (moved, stale) = self.publish(s, &moving);
        for addr in stale {
            self.free_block(addr);
        }
        match failure {
            Some(e) if moved == 0 => Err(e),
            _ => Ok(Batch { picked: moving.len(), moved }),
        }
    }

    /// Ends a remotify batch of shard `s` under one lock: pages written and still current go
    /// remote; those that got no block go back to the front of the queue (oldest first, as
    /// they were); the blocks of pages replaced or flushed meanwhile are returned to free.
    fn publish(&self, s: usize, moving: &[Moving]) -> (usize, Vec<GlobalAddr>) {
        let mut shard = self.store.shared.shard(s);
        shard.moving -= moving.iter().map(|m| m.len as u64).sum::<u64>();
        let (mut moved, mut stale) = (0, Vec::new());
        for m in moving.iter().rev() {
            let current = shard.map.get(&m.key).is_some_and(|e| e.generation == m.generation);
            match m.addr {
                Some(addr) if current => {
                    let mut entry = shard.map.remove(&m.key).expect("just seen");
                    shard.uncount(&entry);
                    entry.body = Body::Remote { addr, len: m.len as u32, compressed: m.compressed };
                    shard.count(&entry);
                    shard.map.insert(m.key, entry);
                    shard.stats.remotified += 1;
                    moved += 1;
                }
                Some(addr) => stale.push(addr),
                None if current => shard.local.push_front((m.key, m.generation)),
                None => {}
            }
        }
        (moved, stale)
    }

    /// READs `len` bytes at `addr` into `staging` (fields apart, so that the caller may hold
    /// the store's state meanwhile).
    fn read_remote(
        alloc: &ThreadAlloc<T>,
        staging: &mut <T::Endpoint as Endpoint>::Buffer,
        addr: GlobalAddr,
        len: usize,
    ) -> Result<()> {
        alloc.with_endpoint(|ep| ep.read_into(addr, staging, 0..len))?;
        Ok(())
    }

    /// Frees what a removed version held (its remote block).
    fn free_body(&self, body: Option<Body>) {
        if let Some(Body::Remote { addr, .. }) = body {
            self.free_block(addr);
        }
    }

    fn free_block(&self, addr: GlobalAddr) {
        if let Err(e) = self.alloc.free(addr) {
            // Its space is lost to this store until the client's chunks are reclaimed; the
            // page itself is already gone from the index, so nothing reads it.
            tracing::warn!("page store: cannot free the remote block at {addr}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdmem_allocator::AllocatorOptions;
    use rdmem_core::LoopbackTransport;

    /// A page rewritten over and over in the local tier leaves one queue entry per version
    /// unless the queue is compacted: it stays within about twice the local pages.
    #[test]
    fn the_local_queue_stays_bounded_under_rewrites() {
        let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
        let allocator = Allocator::new(transport, AllocatorOptions::default()).unwrap();
        let store = PageStore::new(allocator, StoreOptions { shards: 1, ..StoreOptions::default() }).unwrap();
        let pool = store.create_pool(PoolKind::Persistent).unwrap();
        let mut handle = store.handle().unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for version in 0..10_000u32 {
            page[..4].copy_from_slice(&version.to_le_bytes());
            page[100] = 1; // not same-filled
            handle.put(pool, 1, version % 3, &page).unwrap();
        }
        let queued = lock(&store.shared.shards[0].0).local.len();
        assert!(queued <= 2 * 3 + 64 + 1, "{queued} queue entries for 3 local pages");
    }
}
