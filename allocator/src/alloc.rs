//! The allocator: a process-wide [`Allocator`] and per-thread [`ThreadAlloc`]s.
//!
//! Fast path (no network): a size class's current chunk has a free block, from its local free
//! list or past its bump pointer. Slow path, only when it has none: take back blocks other
//! threads and clients freed into this arena's chunks (their remote free lists), else claim a
//! new chunk (one CAS, plus the descriptor WRITE and the usage FAA).
//!
//! Per chunk, locally: `free.len() + live + (blocks - bump) == blocks`, and a block is in
//! `allocated` exactly when it was handed out and not freed. A chunk whose last live block is
//! freed goes back to the pool (unless it is its class's current chunk), so usage returns to
//! where it started once everything is freed and [`ThreadAlloc::flush`] took back remote frees.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use rdmem_core::heartbeat::Heartbeat;
use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};

use crate::error::{AllocError, Result};
use crate::layout::{self, Geometry, client, desc};
use crate::pool::{self, Bitmap, Net, NodeUsage, at, read_descriptors};
use crate::roots::Root;
use crate::table::ChunkTable;

/// Where new blocks go when there are several memory nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Each allocation of a thread on the next node in turn.
    RoundRobin,
    /// On the node with the smallest share of its chunks in use, by reading the nodes' chunk
    /// bitmaps (one READ per node, a bit per chunk) whenever a chunk is needed.
    LeastLoaded,
    /// Always this node.
    Node(NodeId),
}

/// What happens when the chosen node cannot serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Take memory from the other nodes (Barrelfish's stealing servers).
    Stealing,
    /// Fail with [`AllocError::OutOfMemory`] naming the node. `chunks_per_node` limits the
    /// chunks each thread's arena may hold on one node (`None`: the node's capacity).
    Strict {
        /// Chunks one arena may hold per node.
        chunks_per_node: Option<u64>,
    },
}

/// How an [`Allocator`] formats pools and places blocks.
#[derive(Debug, Clone, Copy)]
pub struct AllocatorOptions {
    /// Chunk size used when this client formats a fresh pool (a power of two, at least 4 KiB).
    /// A pool already formatted keeps its own.
    pub chunk_size: u64,
    /// Which node new blocks go to.
    pub placement: Placement,
    /// Stealing or strict.
    pub mode: Mode,
    /// This client's lease: its heartbeat moves every quarter of it, and a client whose
    /// heartbeat has not moved for two leases is dead to [`Allocator::reclaim_dead_clients`].
    pub lease: Duration,
}

/// The default client lease: generous, so that a stalled but live client is not taken for dead.
pub const DEFAULT_CLIENT_LEASE: Duration = Duration::from_secs(5);

impl Default for AllocatorOptions {
    fn default() -> Self {
        AllocatorOptions {
            chunk_size: 1 << 20,
            placement: Placement::RoundRobin,
            mode: Mode::Stealing,
            lease: DEFAULT_CLIENT_LEASE,
        }
    }
}

struct NodeState {
    id: NodeId,
    geo: Geometry,
}

struct Shared<T: Transport> {
    transport: Arc<T>,
    nodes: Vec<NodeState>,
    client: u64,
    /// This client's slot in the first node's client table, and its heartbeat there.
    slot: u64,
    heartbeat: Mutex<Option<Heartbeat>>,
    options: AllocatorOptions,
    /// The largest allocation: the largest pool's chunks.
    max_size: u64,
    next_arena: AtomicU16,
    /// Chunks of thread allocators that were dropped with live blocks (node index, chunk),
    /// adopted by the next `flush` of any thread of this client (mimalloc's abandoned segments).
    orphans: Mutex<Vec<(usize, u64, OwnedChunk)>>,
}

/// A client's allocator over all memory nodes of a transport. Cheap to clone; give each thread
/// its own [`ThreadAlloc`] with [`Allocator::thread`].
pub struct Allocator<T: Transport> {
    shared: Arc<Shared<T>>,
}

impl<T: Transport> Clone for Allocator<T> {
    fn clone(&self) -> Self {
        Allocator { shared: Arc::clone(&self.shared) }
    }
}

impl<T: Transport> Drop for Shared<T> {
    /// The client leaves: its heartbeat stops and its slot is freed. Chunks it still holds
    /// become a dead client's (see [`Allocator::reclaim_dead_clients`]).
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            heartbeat.stop();
            let first = self.nodes[0].id;
            let freed = self
                .transport
                .endpoint()
                .and_then(|mut ep| ep.cas(pool::client_word(first, self.slot, client::ID), self.client, 0));
            if let Err(e) = freed {
                tracing::warn!("client {} could not free its client table slot: {e}", self.client);
            }
        }
    }
}

impl<T: Transport> Shared<T> {
    /// The owner word this client puts on chunks it releases.
    fn releasing(&self) -> u64 {
        layout::releasing(self.nodes[0].id.0, self.client)
    }
}

impl<T: Transport> Allocator<T> {
    /// Opens every node's pool (formatting the ones nobody formatted yet), takes a client id
    /// and a slot in the first node's client table, and starts this client's heartbeat there.
    pub fn new(transport: Arc<T>, options: AllocatorOptions) -> Result<Self> {
        if options.lease < Duration::from_millis(4) {
            return Err(AllocError::BadOptions(format!(
                "a client lease of {:?} is too short (at least 4 ms)",
                options.lease
            )));
        }
        let mut net = Net { ep: transport.endpoint()?, ops: 0 };
        let token = formatting_token();
        let mut nodes = Vec::new();
        for info in transport.nodes() {
            let geo = pool::open_or_format(&mut net, *info, options.chunk_size, token)?;
            nodes.push(NodeState { id: info.id, geo });
        }
        let first = nodes.first().ok_or_else(|| AllocError::BadOptions("the transport has no memory nodes".into()))?;
        // Client ids come from the first node's counter: unique across the cluster, never 0.
        let client = net.faa(at(first.id, layout::header::NEXT_CLIENT), 1)? + 1;
        if client > layout::MAX_CLIENT_ID {
            return Err(AllocError::BadPool {
                node: first.id,
                reason: "2^31 client ids handed out: restart the memory node for a fresh pool".into(),
            });
        }
        if let Placement::Node(id) = options.placement {
            if !nodes.iter().any(|n| n.id == id) {
                return Err(AllocError::InvalidAddress {
                    addr: GlobalAddr::new(id, 0).expect("offset 0"),
                    reason: format!("placement names {id}, which is not in this cluster"),
                });
            }
        }
        let slot = pool::register_client(&mut net, first.id, client, options.lease)?;
        let beat_word = pool::client_word(first.id, slot, client::BEAT);
        let heartbeat = match Heartbeat::start(Arc::clone(&transport), beat_word, options.lease / 4) {
            Ok(h) => h,
            Err(e) => {
                let _ = net.cas(pool::client_word(first.id, slot, client::ID), client, 0);
                return Err(e.into());
            }
        };
        let max_size = nodes.iter().map(|n| n.geo.chunk_count * n.geo.chunk_size).max().unwrap_or(0);
        let shared = Shared {
            max_size,
            transport,
            nodes,
            client,
            slot,
            heartbeat: Mutex::new(Some(heartbeat)),
            options,
            next_arena: AtomicU16::new(0),
            orphans: Mutex::default(),
        };
        Ok(Allocator { shared: Arc::new(shared) })
    }

    /// For tests of dead clients: stops this client's heartbeat without freeing its slot, as
    /// if its process had been killed (its allocations go on working).
    #[doc(hidden)]
    pub fn stop_heartbeat(&self) {
        if let Some(h) = self.shared.heartbeat.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.stop();
        }
    }

    /// The client table as it is now: the first step of [`Allocator::reclaim_dead_clients`].
    pub fn client_snapshot(&self) -> Result<ClientSnapshot> {
        let mut net = Net { ep: self.shared.transport.endpoint()?, ops: 0 };
        let first = self.shared.nodes[0].id;
        let clients = pool::read_clients(&mut net, first)?;
        let issued = net.read_u64(at(first, layout::header::NEXT_CLIENT))?;
        Ok(ClientSnapshot { taken: Instant::now(), clients, issued })
    }

    /// Returns the chunks of dead clients to the pools, on every node. A client is dead when
    /// it holds no slot in the client table (it exited, or is older than the table), or when
    /// its heartbeat has not moved since `before` was taken and `before` is at least two of
    /// its leases old; its slot is then freed too. This client, and clients given their id
    /// after `before` was taken, are alive. (A client takes its id, then its slot, at once:
    /// one found between the two is stalled, so let `before` age two leases, as
    /// [`Allocator::reclaim_dead_clients_now`] does.)
    ///
    /// Everything a dead client allocated is freed, including blocks that live clients still
    /// use: a structure meant to outlive its allocating process must be allocated by one that
    /// stays. A client stalled for longer than two leases is taken for dead (its memory is
    /// then reused under it): keep leases generous. [`Allocator::reclaim_dead_clients_now`]
    /// takes the snapshot and waits itself.
    pub fn reclaim_dead_clients(&self, before: &ClientSnapshot) -> Result<Reclaimed> {
        let mut net = Net { ep: self.shared.transport.endpoint()?, ops: 0 };
        let first = self.shared.nodes[0].id;
        let now = pool::read_clients(&mut net, first)?;
        let age = before.taken.elapsed();
        let stale = |c: &pool::ClientSlot| {
            c.id != self.shared.client
                && !c.lease.is_zero()
                && age >= c.lease * 2
                && before.clients.iter().any(|b| b.slot == c.slot && b.id == c.id && b.beat == c.beat)
        };
        let mut reclaimed = Reclaimed::default();
        for c in now.iter().filter(|c| stale(c)) {
            if net.cas(pool::client_word(first, c.slot, client::ID), c.id, 0)? == c.id {
                reclaimed.clients.push(c.id);
            }
        }
        // Alive: the clients holding a slot now (but the stale ones), this one, and those given
        // an id after `before` (a client takes its id, then its slot).
        let newer = before.issued + 1..=net.read_u64(at(first, layout::header::NEXT_CLIENT))?;
        let live: std::collections::HashSet<u64> = now
            .iter()
            .filter(|c| !reclaimed.clients.contains(&c.id))
            .map(|c| c.id)
            .chain([self.shared.client])
            .chain(newer)
            .collect();
        for node in &self.shared.nodes {
            let chunks = self.release_chunks_of_dead(&mut net, node, &live)?;
            if chunks > 0 {
                reclaimed.chunks.push((node.id, chunks));
            }
        }
        if !reclaimed.clients.is_empty() || !reclaimed.chunks.is_empty() {
            tracing::info!("reclaimed dead clients {:?}: chunks {:?}", reclaimed.clients, reclaimed.chunks);
        }
        Ok(reclaimed)
    }

    /// [`Allocator::reclaim_dead_clients`] with a snapshot taken now and a wait of two of the
    /// longest lease among the clients in it (a few seconds with the default leases).
    pub fn reclaim_dead_clients_now(&self) -> Result<Reclaimed> {
        let before = self.client_snapshot()?;
        let longest = before.clients.iter().map(|c| c.lease).max().unwrap_or_default();
        std::thread::sleep(longest * 2);
        self.reclaim_dead_clients(&before)
    }

    /// Releases every chunk of `node` whose owner's client is not in `live`: its owner word is
    /// CASed to this client's [`layout::releasing`] (so a racing reclaimer or a late free of a
    /// large block loses), then the chunk is released with the continuations that still name
    /// it. Chunks whose bit is set with no owner are released too. The number released.
    fn release_chunks_of_dead(
        &self,
        net: &mut Net<T::Endpoint>,
        node: &NodeState,
        live: &std::collections::HashSet<u64>,
    ) -> Result<u64> {
        let geo = node.geo;
        let table = self.shared.nodes[0].id.0;
        let mut released = 0;
        let mut bitmap = Bitmap::new(&geo, 0);
        bitmap.refresh(net, node.id, &geo)?; // what the releases' CASes expect
        // Descriptors in pieces of 2048 (64 KiB), one READ each.
        const PIECE: u64 = 2048;
        let mut first = 0;
        while first < geo.chunk_count {
            let count = PIECE.min(geo.chunk_count - first);
            let raw = read_descriptors(net, node.id, &geo, first..first + count)?;
            for (i, &(owner, class)) in raw.iter().enumerate() {
                let chunk = first + i as u64;
                if owner == 0 && bitmap.is_set(chunk) {
                    // Claimed by nobody: no client leaves this, but a fuzzy snapshot of a pool
                    // (read bitmap first) taken while the chunk was released can.
                    if net.cas(pool::desc_word(node.id, &geo, chunk, desc::OWNER), 0, self.shared.releasing())? == 0 {
                        bitmap.release(net, node.id, &geo, chunk, &[])?;
                        released += 1;
                    }
                    continue;
                }
                let (owner_table, id) = layout::owner_client(owner);
                // Owners registered in another cluster's table cannot be judged from ours;
                // continuations go with their head.
                if owner == 0 || layout::is_continuation(owner) || owner_table != table || live.contains(&id) {
                    continue;
                }
                if net.cas(pool::desc_word(node.id, &geo, chunk, desc::OWNER), owner, self.shared.releasing())? != owner
                {
                    continue; // changed meanwhile: not ours to release
                }
                // A head (its class is written before its continuations are taken): the chunks
                // after it that still name it.
                let span =
                    if class & layout::LARGE != 0 { (class & !layout::LARGE).min(geo.chunk_count - chunk) } else { 1 };
                let mut rest: Vec<std::ops::Range<u64>> = Vec::new();
                if span > 1 {
                    let cont = layout::continuation(node.id.0, chunk);
                    for (c, (o, _)) in (chunk + 1..).zip(read_descriptors(net, node.id, &geo, chunk + 1..chunk + span)?)
                    {
                        match rest.last_mut() {
                            _ if o != cont => {}
                            Some(run) if run.end == c => run.end += 1,
                            _ => rest.push(c..c + 1),
                        }
                    }
                }
                bitmap.release(net, node.id, &geo, chunk, &rest)?;
                released += 1 + rest.iter().map(|r| r.end - r.start).sum::<u64>();
            }
            first += count;
        }
        Ok(released)
    }

    /// A thread's allocator: its own endpoint, arenas and bitmap caches. Up to 65535 per client.
    pub fn thread(&self) -> Result<ThreadAlloc<T>> {
        // Never wraps: an id handed out twice would give two arenas the same chunks.
        let taken = self.shared.next_arena.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
        let arena = taken
            .ok()
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| AllocError::Limit { what: "thread allocators per Allocator", limit: u16::MAX as u64 })?;
        let nodes = self
            .shared
            .nodes
            .iter()
            .map(|n| NodeArena::new(&n.geo, (self.shared.client as usize).wrapping_mul(7) + arena as usize))
            .collect();
        let inner = Inner {
            net: Net { ep: self.shared.transport.endpoint()?, ops: 0 },
            owner: layout::owner(self.shared.nodes[0].id.0, self.shared.client, arena),
            corrupt: Vec::new(),
            nodes,
            next_node: arena as usize,
            preferred: 0,
        };
        Ok(ThreadAlloc { shared: Arc::clone(&self.shared), inner: RefCell::new(inner) })
    }

    /// This client's id (the owner recorded in the chunks it claims, with the arena).
    pub fn client_id(&self) -> u64 {
        self.shared.client
    }

    /// The chunk size of `node`'s pool.
    pub fn chunk_size(&self, node: NodeId) -> Option<u64> {
        self.shared.nodes.iter().find(|n| n.id == node).map(|n| n.geo.chunk_size)
    }
}

/// Refuses a block whose chunk's owner word says it is not a live allocation's start.
fn check_owner(owner: u64, addr: GlobalAddr) -> Result<()> {
    let invalid = |reason: &str| Err(AllocError::InvalidAddress { addr, reason: reason.to_owned() });
    if owner == 0 {
        return invalid("its chunk is free: never allocated, or already freed");
    }
    if layout::is_continuation(owner) {
        return invalid("inside a large allocation, not at its start");
    }
    if layout::is_releasing(owner) {
        return Err(AllocError::DoubleFree { addr }); // another free of it is under way
    }
    Ok(())
}

fn formatting_token() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    ((nanos ^ (std::process::id() as u64) << 32) & ((1 << 48) - 1)) | 1
}

/// Chunk index -> value, hashed by one multiplication: the keys are small integers, so
/// SipHash's protection against chosen keys buys nothing and costs a third of a free.
type ChunkMap<V> = HashMap<u64, V, BuildHasherDefault<ChunkHasher>>;

#[derive(Default)]
struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The client table at one moment (see [`Allocator::reclaim_dead_clients`]).
#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    taken: Instant,
    clients: Vec<pool::ClientSlot>,
    /// Client ids up to this had been handed out when it was taken: a later one may not have
    /// registered its slot yet, and is alive.
    issued: u64,
}

impl ClientSnapshot {
    /// The ids of the clients holding a slot.
    pub fn client_ids(&self) -> Vec<u64> {
        self.clients.iter().map(|c| c.id).collect()
    }

    /// The heartbeat counter of client `id`, if it holds a slot.
    pub fn beat(&self, id: u64) -> Option<u64> {
        self.clients.iter().find(|c| c.id == id).map(|c| c.beat)
    }
}

/// What [`Allocator::reclaim_dead_clients`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Clients found dead (their slots freed).
    pub clients: Vec<u64>,
    /// Chunks returned to each node's pool.
    pub chunks: Vec<(NodeId, u64)>,
}

/// One chunk this arena owns, carved into blocks of one size class.
struct OwnedChunk {
    block: u64,
    blocks: u64,
    bump: u64,
    free: Vec<u32>,
    allocated: Vec<u64>,
    live: u64,
    /// Its remote free list was found corrupt: no block is handed out from it any more and it
    /// is never released (see [`AllocError::CorruptFreeList`]).
    quarantined: bool,
}

impl OwnedChunk {
    fn new(block: u64, chunk_size: u64) -> Self {
        let blocks = chunk_size / block;
        OwnedChunk {
            block,
            blocks,
            bump: 0,
            free: Vec::new(),
            allocated: vec![0; blocks.div_ceil(64) as usize],
            live: 0,
            quarantined: false,
        }
    }

    #[inline]
    fn has_free(&self) -> bool {
        !self.quarantined && (!self.free.is_empty() || self.bump < self.blocks)
    }

    /// Whether the chunk can go back to the pool: no live block, not quarantined.
    #[inline]
    fn releasable(&self) -> bool {
        self.live == 0 && !self.quarantined
    }

    /// Pops a free block: the free list first (warm memory), else the bump pointer.
    #[inline(always)]
    fn take(&mut self) -> Option<u64> {
        if self.quarantined {
            return None;
        }
        let b = match self.free.pop() {
            Some(b) => b as u64,
            None if self.bump < self.blocks => {
                self.bump += 1;
                self.bump - 1
            }
            None => return None,
        };
        self.allocated[(b / 64) as usize] |= 1 << (b % 64);
        self.live += 1;
        Some(b)
    }

    /// Marks block `b` allocated again after [`OwnedChunk::give_back`] (undoes it).
    fn retake(&mut self, b: u64) {
        self.free.retain(|&f| f as u64 != b);
        self.allocated[(b / 64) as usize] |= 1 << (b % 64);
        self.live += 1;
    }

    /// Marks block `b` free; false if it was not allocated (a double free).
    #[inline(always)]
    fn give_back(&mut self, b: u64) -> bool {
        let (word, bit) = ((b / 64) as usize, 1u64 << (b % 64));
        if self.allocated[word] & bit == 0 {
            return false;
        }
        self.allocated[word] &= !bit;
        self.free.push(b as u32);
        self.live -= 1;
        true
    }
}

/// A thread's state on one node.
struct NodeArena {
    bitmap: Bitmap,
    /// Per size class: the chunk allocations come from.
    current: Vec<Option<u64>>,
    chunks: ChunkTable<OwnedChunk>,
    /// Large allocations of this arena: first chunk -> span.
    large: ChunkMap<u64>,
    /// Chunks this arena holds (small and large), for strict quotas.
    held: u64,
}

impl NodeArena {
    fn new(geo: &Geometry, start: usize) -> Self {
        let classes = layout::class_index(geo.max_small()) + 1;
        NodeArena {
            bitmap: Bitmap::new(geo, start),
            current: vec![None; classes],
            chunks: ChunkTable::default(),
            large: ChunkMap::default(),
            held: 0,
        }
    }
}

struct Inner<E> {
    net: Net<E>,
    owner: u64,
    /// Corrupt remote free lists found on the refill path, reported by the next `flush`.
    corrupt: Vec<AllocError>,
    nodes: Vec<NodeArena>,
    next_node: usize,
    preferred: usize,
}

/// One thread's allocator: alloc and free with no network operation on the fast path.
/// Not `Sync`; create one per thread with [`Allocator::thread`].
pub struct ThreadAlloc<T: Transport> {
    shared: Arc<Shared<T>>,
    inner: RefCell<Inner<T::Endpoint>>,
}

/// Outcome of trying one node.
enum Attempt {
    Done(GlobalAddr),
    Full(String),
}

impl<T: Transport> ThreadAlloc<T> {
    /// Allocates `layout.size()` bytes aligned to `layout.align()` on the node the placement
    /// picks (and, in stealing mode, on another one when that node is full).
    pub fn alloc(&self, layout: std::alloc::Layout) -> Result<GlobalAddr> {
        let (size, align) = (layout.size() as u64, layout.align() as u64);
        if size == 0 {
            return Err(AllocError::ZeroSize);
        }
        let chunk_size = self.shared.nodes[0].geo.chunk_size;
        if align > chunk_size {
            return Err(AllocError::BadAlignment { align, chunk_size });
        }
        if size > self.shared.max_size {
            return Err(AllocError::TooLarge { size, max: self.shared.max_size });
        }
        let inner = &mut *self.inner.borrow_mut();
        let n = self.shared.nodes.len();
        let first = match self.shared.options.placement {
            Placement::Node(id) => self.node_index(id).expect("checked in Allocator::new"),
            Placement::RoundRobin => {
                inner.next_node = if inner.next_node + 1 >= n { 0 } else { inner.next_node + 1 };
                inner.next_node
            }
            Placement::LeastLoaded => {
                let class = layout::class_for(size, align);
                if !self.has_local_block(inner, inner.preferred, class) {
                    inner.preferred = self.least_loaded(inner)?;
                }
                inner.preferred
            }
        };
        match self.alloc_on(inner, first, size, align)? {
            Attempt::Done(addr) => Ok(addr),
            Attempt::Full(reason) => self.alloc_elsewhere(inner, first, size, align, reason),
        }
    }

    /// [`ThreadAlloc::alloc`] when node `first` is full (`reason`): with stealing, the other
    /// nodes in turn; else, or when they are full too, `OutOfMemory`.
    #[cold]
    fn alloc_elsewhere(
        &self,
        inner: &mut Inner<T::Endpoint>,
        first: usize,
        size: u64,
        align: u64,
        reason: String,
    ) -> Result<GlobalAddr> {
        let n = self.shared.nodes.len();
        let stealing = self.shared.options.mode == Mode::Stealing;
        if stealing {
            for k in 1..n {
                if let Attempt::Done(addr) = self.alloc_on(inner, (first + k) % n, size, align)? {
                    return Ok(addr);
                }
            }
        }
        let reason = if stealing && n > 1 { format!("{reason}, and so are the other nodes") } else { reason };
        Err(AllocError::OutOfMemory { node: self.shared.nodes[first].id, reason })
    }

    /// Like [`ThreadAlloc::alloc`], with the block's bytes set to zero (WRITEs of zeros, 64 KiB
    /// each, in one batch per 32 of them) before it is returned: for lock words, barrier words
    /// and structures that start zeroed. Plain `alloc` does not zero: a block holds whatever its
    /// last user left.
    pub fn alloc_zeroed(&self, layout: std::alloc::Layout) -> Result<GlobalAddr> {
        let addr = self.alloc(layout)?;
        const PIECE: usize = 64 << 10;
        let zeros = vec![0u8; PIECE.min(layout.size())];
        let zeroed = self.with_endpoint(|ep| -> rdmem_core::Result<()> {
            let mut done = 0;
            while done < layout.size() {
                let mut batch = ep.batch();
                while done < layout.size() && batch.len() < 32 {
                    let n = PIECE.min(layout.size() - done);
                    let at = addr.checked_add(done as u64).expect("inside the block");
                    batch.write(at, &zeros[..n]);
                    done += n;
                }
                batch.submit()?;
            }
            Ok(())
        });
        if let Err(e) = zeroed {
            let _ = self.free(addr);
            return Err(e.into());
        }
        self.inner.borrow_mut().net.ops += layout.size().div_ceil(PIECE) as u64;
        Ok(addr)
    }

    /// Frees a block from any thread or client of this cluster. Own blocks are freed locally;
    /// others go to their chunk's remote free list (one READ, one WRITE, one or more CAS).
    pub fn free(&self, addr: GlobalAddr) -> Result<()> {
        let invalid = |reason: &str| AllocError::InvalidAddress { addr, reason: reason.to_owned() };
        let (idx, _, chunk, rel) = self.locate(addr)?;
        let inner = &mut *self.inner.borrow_mut();
        let arena = &mut inner.nodes[idx];
        // Our own small block: no network unless the chunk becomes empty.
        if let Some(owned) = arena.chunks.get_mut(chunk) {
            // Blocks are powers of two: shifts, not divisions.
            let shift = owned.block.trailing_zeros();
            let b = rel >> shift;
            if b << shift != rel || b >= owned.blocks {
                return Err(invalid("not the start of a block"));
            }
            if b >= owned.bump {
                return Err(invalid("a block of this thread's chunk that was never allocated"));
            }
            if !owned.give_back(b) {
                return Err(AllocError::DoubleFree { addr });
            }
            if owned.releasable() && arena.current[layout::class_index(owned.block)] != Some(chunk) {
                self.release_chunk(inner, idx, chunk)?;
            }
            return Ok(());
        }
        self.free_elsewhere(inner, idx, chunk, rel, addr)
    }

    /// Where `addr` is: its node's index and geometry, its chunk, and its offset in the chunk.
    #[inline]
    fn locate(&self, addr: GlobalAddr) -> Result<(usize, &Geometry, u64, u64)> {
        let invalid = |reason: &str| AllocError::InvalidAddress { addr, reason: reason.to_owned() };
        let idx = self.node_index(addr.node()).ok_or_else(|| invalid("no such memory node in this cluster"))?;
        let geo = &self.shared.nodes[idx].geo;
        let chunk = geo.chunk_of(addr.offset()).ok_or_else(|| invalid("outside the pool's data area"))?;
        Ok((idx, geo, chunk, addr.offset() - geo.chunk_offset(chunk)))
    }

    /// Takes over the allocation at `addr` from the client that made it, as a job restored from
    /// a checkpoint does with memory its earlier (now dead) processes allocated: the owner word
    /// of every chunk it spans becomes this thread's, so reclaiming dead clients leaves it
    /// alone, and it is reclaimable again once this client is gone. A large allocation is then
    /// this thread's to free like its own; for a small block the whole chunk holding it is
    /// taken over (its blocks freed later go to its remote free list; the chunk returns to the
    /// pool when this client is reclaimed). Returns the chunks taken over (0: already this
    /// thread's). An address that is not the start of a live allocation is an error.
    pub fn adopt(&self, addr: GlobalAddr) -> Result<u64> {
        let invalid = |reason: &str| AllocError::InvalidAddress { addr, reason: reason.to_owned() };
        let (idx, geo, chunk, rel) = self.locate(addr)?;
        let inner = &mut *self.inner.borrow_mut();
        let (owner, class) = pool::read_descriptor(&mut inner.net, addr.node(), geo, chunk)?;
        let mine = inner.owner;
        check_owner(owner, addr)?;
        let span = match class {
            c if c & layout::LARGE != 0 && rel == 0 => c & !layout::LARGE,
            c if c & layout::LARGE != 0 || c == layout::CONTINUATION => {
                return Err(invalid("inside a large allocation, not at its start"));
            }
            _ => 1,
        };
        if owner == mine {
            return Ok(0);
        }
        // The continuations of a large allocation name its first chunk, and follow it.
        let old = inner.net.cas(pool::desc_word(addr.node(), geo, chunk, desc::OWNER), owner, mine)?;
        if old != owner && old != mine {
            return Err(invalid("its owner changed while it was taken over (freed, or taken by another)"));
        }
        if class & layout::LARGE != 0 {
            let arena = &mut inner.nodes[idx];
            arena.large.insert(chunk, span);
            arena.held += span;
        }
        Ok(span)
    }

    /// [`ThreadAlloc::free`]'s slow path: a block not in this thread's small chunks (a large
    /// allocation, or another thread's or client's block, pushed on its chunk's remote free
    /// list).
    #[cold]
    fn free_elsewhere(
        &self,
        inner: &mut Inner<T::Endpoint>,
        idx: usize,
        chunk: u64,
        rel: u64,
        addr: GlobalAddr,
    ) -> Result<()> {
        let invalid = |reason: &str| AllocError::InvalidAddress { addr, reason: reason.to_owned() };
        let geo = self.shared.nodes[idx].geo;
        let arena = &mut inner.nodes[idx];
        // Our own large block: release it by CAS on its owner word. The word is 0 if another
        // thread freed it already (a double free), or someone else's if the chunks were freed
        // and claimed again since (our entry is stale: go by the descriptor below).
        if rel == 0 {
            if let Some(span) = arena.large.remove(&chunk) {
                arena.held -= span;
                let owner = inner.owner;
                match self.free_large(inner, idx, chunk, owner, span, addr) {
                    Err(AllocError::DoubleFree { .. }) if self.owner_of(inner, idx, chunk)? != 0 => {}
                    done => return done,
                }
            }
        }
        // Someone else's block, or a large one: the descriptor says which.
        let (owner, class) = pool::read_descriptor(&mut inner.net, addr.node(), &geo, chunk)?;
        check_owner(owner, addr)?;
        if class & layout::LARGE != 0 {
            if rel != 0 {
                return Err(invalid("inside a large allocation, not at its start"));
            }
            return self.free_large(inner, idx, chunk, owner, class & !layout::LARGE, addr);
        }
        if class == layout::CONTINUATION || class == 0 || rel % class != 0 {
            return Err(invalid("not the start of a block"));
        }
        // Push on the chunk's remote free list: read the head and the block's mark (one
        // doorbell); a block marked as on a remote free list already is a double free. Then
        // link the block to the head and mark it (one WRITE), and CAS the head.
        let head_addr = pool::desc_word(addr.node(), &geo, chunk, desc::REMOTE_FREE);
        let mark_addr = addr.checked_add(8).ok_or_else(|| invalid("at the end of the address space"))?;
        let (mut head, mut seen) = ([0u8; 8], [0u8; 8]);
        let mut batch = inner.net.ep.batch();
        batch.read(head_addr, &mut head).read(mark_addr, &mut seen);
        batch.submit()?;
        inner.net.ops += 2;
        let mark = layout::freed_mark(addr.to_raw(), owner);
        if u64::from_le_bytes(seen) == mark {
            return Err(AllocError::DoubleFree { addr });
        }
        let mut head = u64::from_le_bytes(head);
        loop {
            let mut link = [0u8; 16];
            link[..8].copy_from_slice(&head.to_le_bytes());
            link[8..].copy_from_slice(&mark.to_le_bytes());
            inner.net.write(addr, &link)?;
            let old = inner.net.cas(head_addr, head, addr.to_raw())?;
            if old == head {
                return Ok(());
            }
            head = old;
        }
    }

    /// Takes back blocks other threads and clients freed into this arena's chunks, and returns
    /// every chunk with no live block to the pool. Usage then reflects only live blocks.
    /// Also adopts the chunks of this client's dropped thread allocators that still had live
    /// blocks, so their later frees are taken back too.
    ///
    /// A remote free list found corrupt (a block freed twice through it, which the freeing
    /// side could not see) is an error naming the block, [`AllocError::CorruptFreeList`],
    /// returned after the other chunks were flushed; its chunk is quarantined. Such a list
    /// found on the allocation path is logged there and reported by the next `flush`.
    pub fn flush(&self) -> Result<()> {
        let inner = &mut *self.inner.borrow_mut();
        let orphans = std::mem::take(&mut *self.shared.orphans.lock().unwrap_or_else(|p| p.into_inner()));
        for (idx, chunk, owned) in orphans {
            inner.nodes[idx].chunks.insert(chunk, owned);
            inner.nodes[idx].held += 1;
        }
        for idx in 0..inner.nodes.len() {
            let chunks: Vec<u64> = inner.nodes[idx].chunks.keys().collect();
            for chunk in chunks {
                match self.reclaim_remote(inner, idx, chunk) {
                    Err(e @ AllocError::CorruptFreeList { .. }) => inner.corrupt.push(e),
                    other => other?,
                }
                if inner.nodes[idx].chunks[chunk].releasable() {
                    self.release_chunk(inner, idx, chunk)?;
                }
            }
        }
        let mut corrupt = std::mem::take(&mut inner.corrupt).into_iter();
        match corrupt.next() {
            None => Ok(()),
            Some(first) => {
                for more in corrupt {
                    tracing::error!("{more}");
                }
                Err(first)
            }
        }
    }

    /// Usage of every node: its chunk bitmap, counted (one READ per node, a bit per chunk).
    pub fn usage(&self) -> Result<Vec<NodeUsage>> {
        let inner = &mut *self.inner.borrow_mut();
        self.shared.nodes.iter().map(|n| pool::usage(&mut inner.net, n.id, &n.geo)).collect()
    }

    /// Network operations this thread allocator has issued so far.
    pub fn network_ops(&self) -> u64 {
        self.inner.borrow().net.ops
    }

    /// Runs `f` with this thread's endpoint, to read and write allocated memory.
    pub fn with_endpoint<R>(&self, f: impl FnOnce(&mut T::Endpoint) -> R) -> R {
        f(&mut self.inner.borrow_mut().net.ep)
    }

    /// The named root `name` on `node` ([`crate::roots`]): where programs publish and find
    /// the addresses of shared structures. Takes a slot in the node's root table the first
    /// time a name is used (a slot stays with its name for the pool's life; to look a name up
    /// without taking one, [`ThreadAlloc::find_root`]).
    pub fn root(&self, node: NodeId, name: &str) -> Result<Root> {
        self.open_root(node, name, true).map(|r| r.expect("a claimed slot"))
    }

    /// The named root `name` on `node` if some client opened it already, without taking a slot
    /// for it (a mistyped name costs nothing): `None` when it has none.
    pub fn find_root(&self, node: NodeId, name: &str) -> Result<Option<Root>> {
        self.open_root(node, name, false)
    }

    fn open_root(&self, node: NodeId, name: &str, claim: bool) -> Result<Option<Root>> {
        if self.node_index(node).is_none() {
            return Err(AllocError::BadRoot {
                name: name.into(),
                reason: format!("no memory node {node} in this cluster"),
            });
        }
        self.with_endpoint(|ep| Root::open(ep, node, name, claim))
    }

    /// The allocator this thread allocator belongs to.
    pub fn allocator(&self) -> Allocator<T> {
        Allocator { shared: Arc::clone(&self.shared) }
    }

    fn node_index(&self, id: NodeId) -> Option<usize> {
        self.shared.nodes.iter().position(|n| n.id == id)
    }

    fn has_local_block(&self, inner: &Inner<T::Endpoint>, idx: usize, class: u64) -> bool {
        let arena = &inner.nodes[idx];
        class <= self.shared.nodes[idx].geo.max_small()
            && arena.current[layout::class_index(class)].is_some_and(|c| arena.chunks[c].has_free())
    }

    /// The node with the smallest share of used chunks (one bitmap READ per node).
    fn least_loaded(&self, inner: &mut Inner<T::Endpoint>) -> Result<usize> {
        let mut best = (f64::MAX, 0);
        for (i, n) in self.shared.nodes.iter().enumerate() {
            let u = pool::usage(&mut inner.net, n.id, &n.geo)?;
            let share = u.chunks_used as f64 / u.chunks_total.max(1) as f64;
            if share < best.0 {
                best = (share, i);
            }
        }
        Ok(best.1)
    }

    fn quota_left(&self, inner: &Inner<T::Endpoint>, idx: usize, span: u64) -> Option<String> {
        match self.shared.options.mode {
            Mode::Strict { chunks_per_node: Some(limit) } if inner.nodes[idx].held + span > limit => {
                Some(format!("this arena's quota of {limit} chunks is used up"))
            }
            _ => None,
        }
    }

    #[inline(always)]
    fn alloc_on(&self, inner: &mut Inner<T::Endpoint>, idx: usize, size: u64, align: u64) -> Result<Attempt> {
        let node = &self.shared.nodes[idx];
        let geo = &node.geo;
        let class = layout::class_for(size, align);
        if class > geo.max_small() {
            return self.alloc_large(inner, idx, size.div_ceil(geo.chunk_size));
        }
        // Fast path: the current chunk has a block.
        let arena = &mut inner.nodes[idx];
        if let Some(Some(chunk)) = arena.current.get(layout::class_index(class)) {
            if let Some(b) = arena.chunks.get_mut(*chunk).and_then(OwnedChunk::take) {
                return Ok(Attempt::Done(at(node.id, geo.chunk_offset(*chunk) + b * class)));
            }
        }
        self.refill(inner, idx, class)
    }

    /// Slow path: another owned chunk of this class with free blocks (after taking back its
    /// remote frees), else a new chunk.
    #[cold]
    fn refill(&self, inner: &mut Inner<T::Endpoint>, idx: usize, class: u64) -> Result<Attempt> {
        let node = &self.shared.nodes[idx];
        let geo = node.geo;
        let ci = layout::class_index(class);
        let mine: Vec<u64> = inner.nodes[idx].chunks.iter().filter(|(_, c)| c.block == class).map(|(k, _)| k).collect();
        for &chunk in &mine {
            if !inner.nodes[idx].chunks[chunk].has_free() {
                match self.reclaim_remote(inner, idx, chunk) {
                    Err(e @ AllocError::CorruptFreeList { .. }) => {
                        tracing::warn!("{e} (reported by the next flush)");
                        inner.corrupt.push(e);
                    }
                    other => other?,
                }
            }
        }
        let chunk = match mine.into_iter().find(|&c| inner.nodes[idx].chunks[c].has_free()) {
            Some(chunk) => chunk,
            None => {
                if let Some(reason) = self.quota_left(inner, idx, 1) {
                    return Ok(Attempt::Full(reason));
                }
                let (arena, owner) = (&mut inner.nodes[idx], inner.owner);
                let Some(chunk) = arena.bitmap.claim(&mut inner.net, node.id, &geo, 1, owner, class)? else {
                    return Ok(Attempt::Full(format!("all {} chunks are in use", geo.chunk_count)));
                };
                let arena = &mut inner.nodes[idx];
                arena.chunks.insert(chunk, OwnedChunk::new(class, geo.chunk_size));
                arena.held += 1;
                chunk
            }
        };
        let arena = &mut inner.nodes[idx];
        arena.current[ci] = Some(chunk);
        let b = arena.chunks.get_mut(chunk).and_then(OwnedChunk::take).expect("chunk with a free block");
        Ok(Attempt::Done(at(node.id, geo.chunk_offset(chunk) + b * class)))
    }

    fn alloc_large(&self, inner: &mut Inner<T::Endpoint>, idx: usize, span: u64) -> Result<Attempt> {
        let node = &self.shared.nodes[idx];
        let geo = node.geo;
        if span > geo.chunk_count {
            return Ok(Attempt::Full(format!("{span} chunks are more than the pool's {}", geo.chunk_count)));
        }
        if let Some(reason) = self.quota_left(inner, idx, span) {
            return Ok(Attempt::Full(reason));
        }
        let owner = inner.owner;
        let claimed =
            inner.nodes[idx].bitmap.claim(&mut inner.net, node.id, &geo, span, owner, layout::LARGE | span)?;
        let Some(first) = claimed else {
            return Ok(Attempt::Full(format!("no run of {span} free chunks")));
        };
        let arena = &mut inner.nodes[idx];
        arena.large.insert(first, span);
        arena.held += span;
        Ok(Attempt::Done(at(node.id, geo.chunk_offset(first))))
    }

    /// Frees a large allocation: CAS its owner word to this client's [`layout::releasing`] (a
    /// second free fails that CAS), then release the chunks.
    fn free_large(
        &self,
        inner: &mut Inner<T::Endpoint>,
        idx: usize,
        first: u64,
        owner: u64,
        span: u64,
        addr: GlobalAddr,
    ) -> Result<()> {
        let node = &self.shared.nodes[idx];
        let geo = node.geo;
        let old = inner.net.cas(pool::desc_word(node.id, &geo, first, desc::OWNER), owner, self.shared.releasing())?;
        // Either way it is no longer ours to free.
        let arena = &mut inner.nodes[idx];
        if arena.large.remove(&first).is_some() {
            arena.held -= span;
        }
        if old != owner {
            return Err(AllocError::DoubleFree { addr });
        }
        let rest = first + 1..first + span;
        inner.nodes[idx].bitmap.release(&mut inner.net, node.id, &geo, first, std::slice::from_ref(&rest))
    }

    fn owner_of(&self, inner: &mut Inner<T::Endpoint>, idx: usize, chunk: u64) -> Result<u64> {
        let node = &self.shared.nodes[idx];
        Ok(pool::read_descriptor(&mut inner.net, node.id, &node.geo, chunk)?.0)
    }

    /// Takes the chunk's remote free list (one READ; if not empty, a CAS, one READ per block
    /// and one batch clearing the blocks' freed marks) and marks its blocks free.
    ///
    /// The walk is bounded: it stops at the first link that is not a live block of the chunk
    /// (a block freed twice links to itself or to a block already taken back) and at most
    /// after as many blocks as the chunk holds. The chunk is then quarantined and the result
    /// is [`AllocError::CorruptFreeList`] naming the block; what was taken back before the bad
    /// link stays free.
    fn reclaim_remote(&self, inner: &mut Inner<T::Endpoint>, idx: usize, chunk: u64) -> Result<()> {
        let node = &self.shared.nodes[idx];
        let geo = node.geo;
        if inner.nodes[idx].chunks.get(chunk).is_some_and(|c| c.quarantined) {
            return Ok(());
        }
        let head_addr = pool::desc_word(node.id, &geo, chunk, desc::REMOTE_FREE);
        let mut head = inner.net.read_u64(head_addr)?;
        while head != 0 {
            let old = inner.net.cas(head_addr, head, 0)?;
            if old == head {
                break;
            }
            head = old;
        }
        let base = geo.chunk_offset(chunk);
        let (block_size, blocks) = {
            let owned = &inner.nodes[idx].chunks[chunk];
            (owned.block, owned.blocks)
        };
        let mut taken: Vec<u64> = Vec::new();
        let mut bad: Option<(GlobalAddr, &str)> = None;
        while head != 0 {
            let block = GlobalAddr::from_raw(head);
            if taken.len() as u64 == blocks {
                bad = Some((block, "past as many blocks as the chunk holds (the list loops)"));
                break;
            }
            let rel = block.offset().wrapping_sub(base);
            if block.node() != node.id || rel >= geo.chunk_size || rel % block_size != 0 {
                bad = Some((block, "which is not a block of this chunk"));
                break;
            }
            let next = match inner.net.read_u64(block) {
                Ok(next) => next,
                Err(e) => {
                    self.undo_reclaim(inner, idx, chunk, &taken);
                    return Err(e);
                }
            };
            let owned = inner.nodes[idx].chunks.get_mut(chunk).expect("owned chunk");
            if !owned.give_back(rel / block_size) {
                bad = Some((block, "which is not a live block (freed twice, or never allocated)"));
                break;
            }
            taken.push(rel / block_size);
            head = next;
        }
        // The blocks taken back lose their freed mark before they can be handed out again
        // (else a later, legitimate remote free of one would look like a double free).
        let zero = [0u8; 8];
        for part in taken.chunks(64) {
            let mut batch = inner.net.ep.batch();
            for &b in part {
                batch.write(at(node.id, base + b * block_size + 8), &zero);
            }
            if let Err(e) = batch.submit() {
                self.undo_reclaim(inner, idx, chunk, &taken);
                return Err(e.into());
            }
            inner.net.ops += part.len() as u64;
        }
        match bad {
            None => Ok(()),
            Some((block, reason)) => {
                inner.nodes[idx].chunks.get_mut(chunk).expect("owned chunk").quarantined = true;
                Err(AllocError::CorruptFreeList { node: node.id, chunk, block, reason: reason.to_owned() })
            }
        }
    }

    /// After a failed reclaim: the blocks taken back may still carry their freed mark, so they
    /// are kept out of use (allocated again, never handed out: a leak, not a corruption).
    fn undo_reclaim(&self, inner: &mut Inner<T::Endpoint>, idx: usize, chunk: u64, taken: &[u64]) {
        let owned = inner.nodes[idx].chunks.get_mut(chunk).expect("owned chunk");
        for &b in taken {
            owned.retake(b);
        }
    }

    /// Returns an empty chunk to the pool: clear its bit, then its descriptor.
    fn release_chunk(&self, inner: &mut Inner<T::Endpoint>, idx: usize, chunk: u64) -> Result<()> {
        let node = &self.shared.nodes[idx];
        let geo = node.geo;
        inner.nodes[idx].bitmap.release(&mut inner.net, node.id, &geo, chunk, &[])?;
        let arena = &mut inner.nodes[idx];
        if let Some(owned) = arena.chunks.remove(chunk) {
            let ci = layout::class_index(owned.block);
            if arena.current[ci] == Some(chunk) {
                arena.current[ci] = None;
            }
        }
        arena.held -= 1;
        Ok(())
    }
}

impl<T: Transport> Drop for ThreadAlloc<T> {
    /// Gives empty chunks back (after taking back remote frees) and leaves the others to the
    /// client's next `flush` on any thread. A failure is logged.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("thread allocator could not give its empty chunks back: {e}");
        }
        let inner = self.inner.get_mut();
        let mut orphans = self.shared.orphans.lock().unwrap_or_else(|p| p.into_inner());
        for (idx, arena) in inner.nodes.iter_mut().enumerate() {
            orphans.extend(arena.chunks.drain().map(|(chunk, owned)| (idx, chunk, owned)));
        }
    }
}
