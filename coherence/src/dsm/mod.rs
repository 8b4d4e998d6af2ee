//! A distributed shared memory in JIAJIA's line: shared allocations, cached pages, locks and
//! barriers with scope consistency, every remote access one-sided.
//!
//! ```
//! use std::sync::Arc;
//! use rdmem_coherence::dsm::{Dsm, DsmOptions};
//! use rdmem_core::LoopbackTransport;
//!
//! // Over RDMA: Dsm::join(DsmOptions::from_env()?), rank and size from rdmem-run, mpirun or srun.
//! let transport = Arc::new(LoopbackTransport::new(&[16 << 20]));
//! let dsm = Dsm::join_with(transport, DsmOptions::new(0, 1))?;
//! let counts = dsm.alloc(8 * 64)?;               // collective: every rank gets the same address
//! dsm.lock(0)?;
//! let n: u64 = dsm.get(counts)?;
//! dsm.set(counts, &(n + 1))?;
//! dsm.unlock(0)?;                                // the write reaches the next holder of lock 0
//! dsm.barrier()?;                                // ...and everyone after the barrier
//! dsm.leave()?;
//! # Ok::<(), rdmem_coherence::dsm::DsmError>(())
//! ```
//!
//! # Consistency (scope consistency, home-based)
//! Each memory node is the home of its pages. A process reads and writes pages in its
//! [`PageCache`]; the first write to a page makes a twin. Writes become visible to others at
//! synchronization only.
//!
//! **The scope rule.** A write belongs to the scope of every lock the *writing thread* holds
//! when it writes (a thread's held locks are its own: another thread of the process holding
//! lock M does not put this thread's writes in M's scope). A write made while the thread holds
//! no lock belongs to no lock's scope. Every write, in a scope or not, belongs to the current
//! barrier interval.
//! - **unlock(L)** by the last local holder (the remote release) writes the byte diffs of the
//!   pages in L's scope home, appends write notices for exactly those pages to L's notice ring,
//!   then releases L. A local handover to another thread of the process sends nothing: that
//!   thread shares the cache, and L's scope carries over to the remote release.
//! - **lock(L)** reads L's notices since this process last held L and invalidates exactly those
//!   pages (all pages if the ring wrapped past what it saw).
//! - **barrier()** writes every dirty page's diff home, appends notices for everything written
//!   home since the last barrier to the barrier ring, waits for everyone, then invalidates the
//!   pages others noticed.
//!
//! So a write made under L is seen by the next holder of L (in any process, by any thread),
//! everything written before a barrier is seen by everyone after it, and processes writing
//! disjoint bytes of one page never overwrite each other (diffs carry only changed bytes). A
//! write made outside any lock is not published by an unlock, not even one of its own thread:
//! it goes out at the next barrier. Accesses outside any lock or barrier interval see the
//! process's own writes and whatever it last fetched, as in JIAJIA.
//!
//! # Rules
//! - `alloc` is collective: every rank calls it with the same sizes in the same order (the
//!   first to arrive allocates; the others check the size and share it).
//! - `barrier` is collective: one call per rank (one thread of it) per round.
//! - `lock`/`unlock` work from any thread, but a lock is held by the thread that took it: that
//!   thread unlocks it (another gets [`DsmError::NotHolder`]); threads of one process hand it to
//!   each other without network round trips.
//! - Threads of one process share the cache, so they see each other's writes at once.
//!
//! # Checkpoints
//! JIAJIA's availability wish: a job whose processes or memory nodes die goes on from its last
//! checkpoint instead of from the start.
//! - [`Dsm::checkpoint`] (collective, no lock held) writes everything home at a barrier, then
//!   rank 0 has every memory node (started with `rdmem-memnode --checkpoint-dir DIR`) snapshot
//!   its pool with one sequence number while the others wait without writing: a consistent cut.
//!   It returns the number on every rank. A program keeps its own progress (the iteration it
//!   is at) in shared memory, written before the checkpoint.
//! - After a crash: restart every memory node with `--restore DIR --restore-seq N` (the same
//!   `N` on all of them) and start every rank again with [`DsmOptions::resume`]. Joining then
//!   checks that this is the job (name and size), that every node holds checkpoint `N`, and
//!   that the job's old processes are gone (its heartbeat stands still for two leases), and
//!   waits for all ranks. The program makes its allocations again in the same order and gets
//!   the same addresses with their contents ([`Dsm::resumed_from`] says it resumed; the
//!   allocations its rank made before are taken over from its dead allocator, so reclaiming
//!   dead clients leaves them alone).
//! - Limits: `checkpoint` refuses a thread that holds a lock (another thread of the process
//!   holding one is not seen: it would stay taken until its lease runs out after a resume);
//!   nodes restored from different checkpoints, or a job that never checkpointed, are
//!   refused with [`DsmError::Resume`]; the SOR example shows the whole cycle
//!   (`--checkpoint-every K`, `--resume`).

pub mod launch;
pub mod layout;

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rdmem_allocator::{AllocError, Allocator, AllocatorOptions, Placement, Root};
use rdmem_core::heartbeat::{Heartbeat, beats_within};
use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};

use self::launch::{LaunchError, Rank};
use crate::sync::{CohortLock, DEFAULT_LEASE, RemoteLock};
use crate::sync::{LockError, RemoteBarrier};
use rdmem_cache::{CacheOptions, CacheStats, Home, Homes, PAGE_SIZE, PageCache, PageId};

/// Why a DSM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DsmError {
    /// A remote operation failed.
    #[error(transparent)]
    Transport(#[from] rdmem_core::Error),
    /// The allocator failed (out of memory, ...).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A lock operation failed (lease lost, ...).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Rank and size could not be read from the environment.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// An address outside every allocation.
    #[error("shared address {addr:#x} is outside every allocation ({reason})")]
    BadAddress {
        /// The address.
        addr: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// `alloc` of zero bytes, or of more than one allocation can hold.
    #[error("cannot allocate {bytes} bytes of shared memory: an allocation holds 1 to {max} bytes")]
    BadSize {
        /// Bytes asked for.
        bytes: u64,
        /// The most one allocation holds.
        max: u64,
    },
    /// A lock id beyond the table.
    #[error("lock id {id} is out of range: the DSM has {count} locks")]
    LockId {
        /// The id.
        id: u64,
        /// Locks in the table.
        count: u64,
    },
    /// `unlock` by a thread that does not hold the lock.
    #[error("unlock({id}) by a thread that does not hold lock {id}")]
    NotHolder {
        /// The lock id.
        id: u64,
    },
    /// `lock` by a thread that holds the lock already (waiting would deadlock).
    #[error("lock({id}) by a thread that already holds lock {id}: unlock it first")]
    AlreadyHeld {
        /// The lock id.
        id: u64,
    },
    /// Ranks called `alloc` with different sizes at the same point.
    #[error(
        "allocation #{index}: this rank asked for {ours} bytes, another for {theirs}; alloc is collective (same sizes, same order on every rank)"
    )]
    AllocMismatch {
        /// The allocation's number.
        index: u64,
        /// This rank's size.
        ours: u64,
        /// The size that was allocated.
        theirs: u64,
    },
    /// More allocations than the log holds.
    #[error("too many shared allocations: the DSM holds at most {max}")]
    TooManyAllocations {
        /// The limit.
        max: u64,
    },
    /// The options (or the environment they came from) cannot work: a rank outside the size,
    /// a lease too short, more memory nodes than the DSM spreads over, a malformed variable.
    #[error("{0}")]
    BadOptions(String),
    /// The memory nodes are in use by another live job (another name or size, or all its ranks
    /// joined), or the job's shared state is not what this rank expects.
    #[error("{0}")]
    JobConflict(String),
    /// A checkpoint could not be taken (rank 0 says why; the other ranks get this).
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// [`DsmOptions::resume`] found nothing to resume, or a job it must not resume: the
    /// message says which.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// Other ranks did not do their part in time (one died, or they disagree on the job).
    #[error("{what} after {waited:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
    },
}

/// `Result` with [`DsmError`].
pub type Result<T, E = DsmError> = std::result::Result<T, E>;

/// An address in shared memory: allocation number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedAddr(pub u64);

impl SharedAddr {
    /// The address `bytes` further on.
    pub fn byte_add(self, bytes: u64) -> SharedAddr {
        SharedAddr(self.0 + bytes)
    }
}

impl std::fmt::Display for SharedAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shared#{}+{:#x}", self.0 >> layout::ALLOC_SHIFT, self.0 & ((1 << layout::ALLOC_SHIFT) - 1))
    }
}

/// How to join.
#[derive(Debug, Clone)]
pub struct DsmOptions {
    /// This process's rank, `0..size`.
    pub rank: u32,
    /// Processes in the job.
    pub size: u32,
    /// The job's name: all ranks must agree ("default"; [`DsmOptions::from_env`] reads
    /// `RDMEM_JOB`).
    pub job: String,
    /// The page cache.
    pub cache: CacheOptions,
    /// Lock leases.
    pub lease: Duration,
    /// Local handovers of a lock in a row before it is released remotely.
    pub max_handovers: u32,
    /// How long `barrier()` (and `join`'s barrier) waits for the other ranks before it fails
    /// with a timeout naming how many arrived (from `RDMEM_BARRIER_TIMEOUT`, in seconds).
    pub barrier_timeout: Duration,
    /// Resume the job from its last checkpoint ([`Dsm::checkpoint`]) instead of starting it:
    /// the memory nodes were restored from it (`rdmem-memnode --restore DIR --restore-seq N`)
    /// and the job's earlier processes are gone. Every rank must resume (from `RDMEM_RESUME`:
    /// `1` or `true`): a rank started without it on the restored nodes finds a dead job there
    /// and takes the nodes over, reclaiming the job's memory (the snapshots on disk stay). A
    /// resume that failed half way leaves ranks counted in: restore the nodes again before
    /// the next try. See "Checkpoints" in the module docs.
    pub resume: bool,
}

impl DsmOptions {
    /// Options for `rank` of `size`, with defaults.
    pub fn new(rank: u32, size: u32) -> Self {
        DsmOptions {
            rank,
            size,
            job: "default".into(),
            cache: CacheOptions::default(),
            lease: DEFAULT_LEASE,
            max_handovers: 16,
            barrier_timeout: crate::sync::DEFAULT_BARRIER_TIMEOUT,
            resume: false,
        }
    }

    /// Rank and size from the environment ([`Rank::from_env`]: rdmem-run, mpirun, srun), the job
    /// name from `RDMEM_JOB`, the cache size from `RDMEM_CACHE_BYTES`, the barrier timeout
    /// from `RDMEM_BARRIER_TIMEOUT` (seconds), whether to resume from `RDMEM_RESUME`.
    pub fn from_env() -> Result<Self> {
        let rank = Rank::from_env()?;
        let mut options = DsmOptions::new(rank.rank, rank.size);
        if let Some(job) = std::env::var("RDMEM_JOB").ok().filter(|j| !j.is_empty()) {
            options.job = job;
        }
        if let Ok(secs) = std::env::var("RDMEM_BARRIER_TIMEOUT") {
            options.barrier_timeout = secs
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| {
                    DsmError::BadOptions(format!("RDMEM_BARRIER_TIMEOUT={secs} is not a positive number of seconds"))
                })?;
        }
        if let Ok(resume) = std::env::var("RDMEM_RESUME") {
            options.resume = match resume.as_str() {
                "1" | "true" => true,
                "" | "0" | "false" => false,
                other => return Err(DsmError::BadOptions(format!("RDMEM_RESUME={other} is not 1, true, 0 or false"))),
            };
        }
        if let Ok(bytes) = std::env::var("RDMEM_CACHE_BYTES") {
            options.cache.capacity_bytes = bytes
                .parse()
                .map_err(|_| DsmError::BadOptions(format!("RDMEM_CACHE_BYTES={bytes} is not a number of bytes")))?;
        }
        Ok(options)
    }
}

/// One allocation, as every rank sees it.
#[derive(Debug, Clone)]
struct Allocation {
    bytes: u64,
    bases: Vec<GlobalAddr>,
    /// The rank that allocated it (and frees it at leave: its own blocks).
    owner: u32,
}

/// Maps pages to homes through the allocations this process knows: one slot per allocation
/// number, set once when the allocation is made or learned, so lookups take no lock.
struct Directory {
    allocs: Vec<OnceLock<Allocation>>,
}

impl Directory {
    fn get(&self, index: usize) -> Option<&Allocation> {
        self.allocs.get(index).and_then(OnceLock::get)
    }
}

impl Homes for Directory {
    fn home(&self, page: PageId) -> rdmem_core::Result<Home> {
        let shift = layout::ALLOC_SHIFT - PAGE_SIZE.trailing_zeros();
        let (index, in_alloc) = ((page >> shift) as usize, page & ((1 << shift) - 1));
        let bad = |reason: String| rdmem_core::Error::Config(format!("page {page:#x}: {reason}"));
        let a = self.get(index).ok_or_else(|| bad(format!("allocation #{index} does not exist")))?;
        let pages = a.bytes.div_ceil(PAGE_SIZE as u64);
        if in_alloc >= pages {
            return Err(bad(format!("beyond the end of allocation #{index} ({} bytes)", a.bytes)));
        }
        let (node, offset, left) = layout::place(in_alloc, a.bases.len() as u64);
        let addr = a.bases[node].checked_add(offset).expect("inside the allocation");
        Ok(Home { addr, run: left.min((pages - in_alloc) as u32) })
    }
}

/// What a DSM lock carries from holder to holder (the state of its [`CohortLock`]).
#[derive(Default)]
struct LockScope {
    /// The notice ring position this process has applied (or written) up to.
    seen: u64,
    /// Pages written under the lock by earlier local holders since the remote hold was taken:
    /// noticed at the remote release.
    pages: HashSet<PageId>,
}

/// The allocator root (on the first memory node) that holds the address of the DSM's control
/// block.
pub const CONTROL_ROOT: &str = "rdmem-dsm/control";
/// The allocator root on every memory node whose word holds the sequence number of the DSM
/// checkpoint the node's state belongs to (so a resume finds nodes restored from different
/// checkpoints).
pub const CHECKPOINT_ROOT: &str = "rdmem-dsm/checkpoint";

/// The round word of checkpoints ([`layout::CHECKPOINT_ROUNDS`]): rounds done above this bit,
/// rank 0's beat while it works below it, bit 0 set when the last round failed.
const ROUND_SHIFT: u32 = 32;
/// Set in a node's checkpoint stamp once the job has moved on from that checkpoint: a snapshot
/// of the node taken later holds it, and a resume refuses it.
const STAMP_MOVED_ON: u64 = 1 << 63;

/// Numbers [`Dsm`] instances, so a thread's held locks name the DSM they belong to.
static NEXT_DSM_ID: AtomicU64 = AtomicU64::new(1);

/// A DSM lock the current thread holds, and the pages it wrote while holding it.
struct Held {
    dsm: u64,
    lock: u64,
    pages: HashSet<PageId>,
}

thread_local! {
    /// The DSM locks this thread holds, in the order it took them.
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
}

/// The barrier as this process sees it: its handle on the counter and epoch words, and the
/// barrier ring position it has applied up to.
struct BarrierState {
    barrier: RemoteBarrier,
    seen: u64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A process's membership in a DSM job. Share it between threads (`&Dsm` or `Arc<Dsm>`).
pub struct Dsm<T: Transport> {
    /// This instance's number (see [`Held`]).
    id: u64,
    transport: Arc<T>,
    rank: u32,
    size: u32,
    options: DsmOptions,
    control: GlobalAddr,
    /// The allocator root the control block is published under, and the value published.
    root: Root,
    published: GlobalAddr,
    /// One allocator per memory node (placement on that node).
    allocators: Vec<Allocator<T>>,
    cache: PageCache<<T::Endpoint as Endpoint>::Buffer>,
    directory: Directory,
    /// Endpoints not in use: each call takes one (threads get their own queue pairs).
    endpoints: Mutex<Vec<T::Endpoint>>,
    /// The locks: one cohort each (local handover), with its scope.
    locks: Vec<CohortLock<LockScope>>,
    barrier: Mutex<BarrierState>,
    /// Collective allocations made so far by this rank.
    next_alloc: AtomicU64,
    left: AtomicBool,
    /// This rank's beat of the job's heartbeat word (stopped at leave).
    heartbeat: Mutex<Option<Heartbeat>>,
    /// Per memory node, the word (a named root, [`CHECKPOINT_ROOT`]) holding the sequence
    /// number of the checkpoint its state belongs to.
    stamps: Vec<GlobalAddr>,
    /// The checkpoint this process resumed the job from.
    resumed_from: Option<u64>,
}

#[cfg(feature = "rdma")]
impl Dsm<rdmem_transport_rdma::RdmaTransport> {
    /// Joins over RDMA, with the memory nodes of the cluster configuration
    /// ([`rdmem_core::ClusterConfig::load`]: `RDMEM_MEMNODES`, `RDMEM_TOKEN`, ...).
    pub fn join(options: DsmOptions) -> Result<Self> {
        let config = rdmem_core::ClusterConfig::load(None)?;
        let rdma = rdmem_transport_rdma::RdmaOptions::from_config(&config)?;
        let transport = rdmem_transport_rdma::RdmaTransport::connect(rdma)?;
        Dsm::join_with(Arc::new(transport), options)
    }
}

impl<T: Transport> Dsm<T> {
    /// Joins the job over `transport`: finds or creates the control block, checks the job,
    /// and waits at a barrier until every rank joined.
    pub fn join_with(transport: Arc<T>, options: DsmOptions) -> Result<Self> {
        if options.size == 0 || options.rank >= options.size {
            return Err(DsmError::BadOptions(format!("rank {} of size {} is not a rank", options.rank, options.size)));
        }
        if options.lease < Duration::from_millis(4) {
            return Err(DsmError::BadOptions(format!("a lease of {:?} is too short (at least 4 ms)", options.lease)));
        }
        let nodes: Vec<NodeId> = transport.nodes().iter().map(|n| n.id).collect();
        if nodes.len() > layout::MAX_NODES {
            return Err(DsmError::BadOptions(format!(
                "{} memory nodes; the DSM spreads over {} at most",
                nodes.len(),
                layout::MAX_NODES
            )));
        }
        let allocators = nodes
            .iter()
            .map(|&id| {
                let opts = AllocatorOptions {
                    placement: Placement::Node(id),
                    lease: options.lease,
                    ..AllocatorOptions::default()
                };
                Allocator::new(transport.clone(), opts)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut ep = transport.endpoint()?;
        let cache = PageCache::new(&mut ep, CacheOptions { stripe_pages: layout::STRIPE_PAGES, ..options.cache })?;
        let first = allocators[0].thread()?;
        let root = first.root(nodes[0], CONTROL_ROOT)?;
        let stamps = nodes.iter().map(|&id| Ok(first.root(id, CHECKPOINT_ROOT)?.word())).collect::<Result<Vec<_>>>()?;
        let (control, published, resumed_from) = if options.resume {
            let (control, published, seq) = Self::resume_control(&mut ep, &root, &stamps, &options)?;
            (control, published, Some(seq))
        } else {
            let (control, published) = Self::find_control(&mut ep, &allocators[0], &root, &options)?;
            (control, published, None)
        };
        // The job's heartbeat: every rank beats it, so a later job can tell this one is alive.
        let heartbeat = Heartbeat::start(
            Arc::clone(&transport),
            control.checked_add(layout::HEARTBEAT).expect("control block"),
            options.lease / 4,
        )?;
        let locks = (0..layout::LOCK_COUNT)
            .map(|id| -> Result<_> {
                let remote = RemoteLock::new(
                    control.checked_add(layout::lock_at(id)).expect("lock"),
                    options.rank + 1,
                    options.lease,
                )?;
                Ok(CohortLock::with_state(remote, options.max_handovers, LockScope::default()))
            })
            .collect::<Result<Vec<_>>>()?;
        let dsm = Dsm {
            id: NEXT_DSM_ID.fetch_add(1, Ordering::Relaxed),
            transport,
            rank: options.rank,
            size: options.size,
            control,
            root,
            published,
            allocators,
            cache,
            directory: Directory { allocs: (0..layout::ALLOC_COUNT).map(|_| OnceLock::new()).collect() },
            endpoints: Mutex::new(vec![ep]),
            locks,
            barrier: Mutex::new(BarrierState {
                barrier: {
                    let mut b = RemoteBarrier::new(
                        control.checked_add(layout::BARRIER_COUNTER).expect("control block"),
                        control.checked_add(layout::BARRIER_EPOCH).expect("control block"),
                        options.size as u64,
                    )?;
                    b.set_timeout(Some(options.barrier_timeout));
                    b
                },
                seen: 0,
            }),
            next_alloc: AtomicU64::new(0),
            left: AtomicBool::new(false),
            heartbeat: Mutex::new(Some(heartbeat)),
            stamps,
            resumed_from,
            options,
        };
        if resumed_from.is_some() {
            // Everyone joined before the checkpoint; the barrier goes on from its saved round,
            // and the rank that made the control block takes it over from its dead allocator.
            dsm.with_ep(|ep| -> Result<()> {
                let mut b = locked(&dsm.barrier);
                b.barrier.resume(ep)?;
                b.seen = ep.read_u64(dsm.at(layout::BARRIER_END))?;
                if ep.read_u64(dsm.at(layout::CREATOR))? == dsm.rank as u64 + 1 {
                    first.adopt(control)?;
                }
                dsm.adopt_allocations(ep)
            })?;
            tracing::info!(
                "rank {} resumed job {:?} from checkpoint {}",
                dsm.rank,
                dsm.options.job,
                resumed_from.unwrap_or(0)
            );
            dsm.barrier()?;
            return Ok(dsm);
        }
        let joined = dsm.with_ep(|ep| ep.faa(dsm.at(layout::JOINED), 1))?;
        if joined >= dsm.size as u64 {
            return Err(DsmError::JobConflict(format!(
                "{} ranks joined a job of size {}: another job of the same name is joining these memory nodes at the same time (use another name, RDMEM_JOB)",
                joined + 1,
                dsm.size
            )));
        }
        dsm.barrier()?;
        Ok(dsm)
    }

    /// The control block, published under the allocator's named root [`CONTROL_ROOT`] on the
    /// first node: made by whichever rank finds the root empty first (a rank that loses the
    /// race frees its own block and joins the winner's), and checked against this job. A block
    /// that is full (every rank joined) or belongs to another job is checked for life: if its
    /// heartbeat stays put for two leases, its job is dead, and the one rank that clears the
    /// root takes the memory nodes over (frees the dead clients' memory) before a fresh block
    /// is made; if it beats, that is an error naming the live job.
    fn find_control(
        ep: &mut T::Endpoint,
        allocator: &Allocator<T>,
        root: &Root,
        options: &DsmOptions,
    ) -> Result<(GlobalAddr, GlobalAddr)> {
        let job = layout::job_hash(&options.job);
        loop {
            let Some(value) = root.get(ep)? else {
                let (made, instance) = Self::create_control(ep, allocator, job, options)?;
                let value = published(made, instance);
                if root.compare_exchange(ep, None, Some(value))?.is_ok() {
                    return Ok((made, value));
                }
                // Another rank published first: join its block.
                let alloc = allocator.thread()?;
                alloc.free(made)?;
                alloc.flush()?;
                continue;
            };
            let control = GlobalAddr::from_raw(value.to_raw() & !TAG_MASK);
            let header = read_words(ep, control, 8)?;
            let instance = header[(layout::INSTANCE / 8) as usize];
            let (magic, their_job, size, joined) = (header[0], header[1], header[2], header[3]);
            let their_lease = Duration::from_millis(header[(layout::LEASE_MS / 8) as usize]);
            let trouble = if magic != layout::MAGIC || published(control, instance) != value {
                // Its memory was reclaimed and reused: nothing of that job is left.
                None
            } else if their_job != job {
                Some(format!("another DSM job (not {:?}) is running on these memory nodes", options.job))
            } else if size != options.size as u64 {
                Some(format!(
                    "a job named {:?} of {size} ranks (not {}) is running on these memory nodes",
                    options.job, options.size
                ))
            } else if joined >= size {
                Some(format!(
                    "a job named {:?} whose {size} ranks all joined is running on these memory nodes",
                    options.job
                ))
            } else {
                return Ok((control, value)); // a job forming: join it
            };
            let snapshot = allocator.client_snapshot()?;
            if let Some(trouble) = &trouble {
                // Two of that job's leases: its ranks beat every quarter of one.
                let window = if their_lease.is_zero() { options.lease } else { their_lease } * 2;
                let alive = beats_within(ep, control.checked_add(layout::HEARTBEAT).expect("control block"), window)?;
                // Meanwhile another rank may have taken over and made a new block, even at the
                // same address: then look again.
                let now = read_words(ep, control, 8)?;
                if root.get(ep)? != Some(value) || now[(layout::INSTANCE / 8) as usize] != instance {
                    continue;
                }
                if alive {
                    return Err(DsmError::JobConflict(format!(
                        "{trouble} (its heartbeat is live): wait for it to leave, or use another job name (RDMEM_JOB)"
                    )));
                }
            }
            // Dead (or gone): take over, unless another rank is doing it already. Clearing the
            // root first means exactly one rank reclaims; ranks that come meanwhile make and
            // publish a fresh block (they are alive, so the reclaim leaves their memory alone).
            if root.compare_exchange(ep, Some(value), None)?.is_err() {
                continue;
            }
            let reclaimed = allocator.reclaim_dead_clients(&snapshot)?;
            tracing::warn!(
                "the DSM control block at {control} belonged to a dead job ({}); taking the memory nodes over \
                 (reclaimed dead clients {:?}: chunks {:?})",
                trouble.as_deref().unwrap_or("its block was reclaimed"),
                reclaimed.clients,
                reclaimed.chunks
            );
        }
    }

    /// At a resume: takes over every allocation this rank made before the checkpoint from its
    /// earlier process's dead allocator, so that reclaiming dead clients leaves them alone (even
    /// before the program makes them again) and this rank frees them at leave.
    fn adopt_allocations(&self, ep: &mut T::Endpoint) -> Result<()> {
        let per = (layout::ALLOC_BYTES / 8) as usize;
        let entries = read_words(ep, self.at(layout::ALLOCS), layout::ALLOC_COUNT as usize * per)?;
        let threads: Vec<_> = self.allocators.iter().map(|a| a.thread()).collect::<Result<_, _>>()?;
        for e in entries.chunks_exact(per) {
            // state, bytes, stripe pages, node count, rank, then the bases.
            if e[0] != layout::ALLOC_READY || e[4] != self.rank as u64 {
                continue;
            }
            let nodes = (e[3] as usize).min(threads.len()).min(per - 5);
            for (thread, &base) in threads.iter().zip(&e[5..5 + nodes]) {
                thread.adopt(GlobalAddr::from_raw(base))?;
            }
        }
        Ok(())
    }

    /// The control block of the job to resume ([`DsmOptions::resume`]): this job's, with a
    /// checkpoint, every node restored from that checkpoint, and its processes gone (its
    /// heartbeat still for two leases; resuming ranks beat only once all of them are in).
    /// Counts this rank in and waits for the others. Returns the block, its root value and the
    /// checkpoint's sequence number.
    fn resume_control(
        ep: &mut T::Endpoint,
        root: &Root,
        stamps: &[GlobalAddr],
        options: &DsmOptions,
    ) -> Result<(GlobalAddr, GlobalAddr, u64)> {
        let cannot = |why: String| DsmError::Resume(why);
        let Some(value) = root.get(ep)? else {
            return Err(cannot(
                "no DSM job on these memory nodes (restore them from the job's checkpoint with \
                 rdmem-memnode --restore DIR --restore-seq N)"
                    .into(),
            ));
        };
        let control = GlobalAddr::from_raw(value.to_raw() & !TAG_MASK);
        let header = read_words(ep, control, 16)?;
        let word = |offset: u64| header[(offset / 8) as usize];
        if word(0) != layout::MAGIC || published(control, word(layout::INSTANCE)) != value {
            return Err(cannot("the DSM control block on these memory nodes is gone".into()));
        }
        if word(layout::JOB) != layout::job_hash(&options.job) {
            return Err(cannot(format!("the job on these memory nodes is not named {:?}", options.job)));
        }
        if word(layout::SIZE) != options.size as u64 {
            return Err(cannot(format!(
                "the job on these memory nodes has {} ranks, not {}",
                word(layout::SIZE),
                options.size
            )));
        }
        let seq = word(layout::CHECKPOINT_SEQ);
        if seq == 0 {
            return Err(cannot("the job on these memory nodes never took a checkpoint".into()));
        }
        for (node, &stamp) in stamps.iter().enumerate() {
            let theirs = ep.read_u64(stamp)?;
            if theirs == seq | STAMP_MOVED_ON {
                return Err(cannot(format!(
                    "memory node {node} holds a snapshot taken after checkpoint {seq}, while the job ran (a \
                     periodic one?): restore every node with --restore-seq {seq}"
                )));
            }
            if theirs != seq {
                return Err(cannot(format!(
                    "memory node {node} holds checkpoint {theirs}, the job's control block checkpoint {seq}: \
                     restore every node with --restore-seq {seq}"
                )));
            }
        }
        let at = |offset: u64| control.checked_add(offset).expect("control block");
        let lease = Duration::from_millis(word(layout::LEASE_MS)).max(options.lease);
        if beats_within(ep, at(layout::HEARTBEAT), lease * 2)? {
            return Err(cannot(format!(
                "the job {:?} on these memory nodes is running (its heartbeat moves): resume only a job whose \
                 processes are gone",
                options.job
            )));
        }
        let n = ep.faa(at(layout::RESUMED), 1)?;
        if n >= options.size as u64 {
            return Err(cannot(format!("{} ranks resumed a job of {}", n + 1, options.size)));
        }
        let size = options.size as u64;
        wait_for_word(
            ep,
            at(layout::RESUMED),
            options.barrier_timeout,
            |n| n >= size,
            || "resume: not every rank resumed (each must run with resume set)".into(),
        )?;
        Ok((control, value, seq))
    }

    /// Allocates and formats a fresh control block (not published yet); returns it and its
    /// instance number.
    fn create_control(
        ep: &mut T::Endpoint,
        allocator: &Allocator<T>,
        job: u64,
        options: &DsmOptions,
    ) -> Result<(GlobalAddr, u64)> {
        let control = allocator
            .thread()?
            .alloc(std::alloc::Layout::from_size_align(layout::CONTROL_BYTES as usize, 4096).expect("layout"))?;
        write_zeros(ep, control, layout::CONTROL_BYTES)?;
        write_words(ep, control, &[layout::MAGIC, job, options.size as u64])?;
        ep.write_u64(control.checked_add(layout::CREATOR).expect("control block"), options.rank as u64 + 1)?;
        let lease_ms = u64::try_from(options.lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let instance = instance_id();
        write_words(ep, control.checked_add(layout::LEASE_MS).expect("control block"), &[lease_ms, instance])?;
        Ok((control, instance))
    }

    fn at(&self, offset: u64) -> GlobalAddr {
        self.control.checked_add(offset).expect("inside the control block")
    }

    /// Runs `f` with an endpoint of this process (taken from the pool, or made; dropped when
    /// `f` fails).
    fn with_ep<R, E: From<rdmem_core::Error>>(&self, f: impl FnOnce(&mut T::Endpoint) -> Result<R, E>) -> Result<R, E> {
        let taken = locked(&self.endpoints).pop();
        let mut ep = match taken {
            Some(ep) => ep,
            None => self.transport.endpoint()?,
        };
        let result = f(&mut ep);
        // An endpoint whose operation failed may have a broken connection: make a fresh one
        // next time rather than hand that on.
        if result.is_ok() {
            locked(&self.endpoints).push(ep);
        }
        result
    }

    /// This process's rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Processes in the job.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The page cache's counters.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Allocates `bytes` of zeroed shared memory, its pages striped over the memory nodes.
    /// Collective: every rank calls it with the same sizes in the same order and gets the same
    /// address.
    pub fn alloc(&self, bytes: u64) -> Result<SharedAddr> {
        if bytes == 0 || bytes > 1 << layout::ALLOC_SHIFT {
            return Err(DsmError::BadSize { bytes, max: 1 << layout::ALLOC_SHIFT });
        }
        let index = self.next_alloc.fetch_add(1, Ordering::SeqCst);
        if index >= layout::ALLOC_COUNT {
            return Err(DsmError::TooManyAllocations { max: layout::ALLOC_COUNT });
        }
        let entry = self.at(layout::alloc_at(index));
        let word = |i: u64| entry.checked_add(8 * i).expect("entry");
        let nodes = self.allocators.len();
        let allocation = self.with_ep(|ep| -> Result<Allocation> {
            if ep.cas(entry, 0, layout::ALLOC_CLAIMED)? == 0 {
                // First here: allocate on every node, zero, publish.
                let share = layout::per_node_bytes(bytes, nodes as u64);
                let layout = std::alloc::Layout::from_size_align(share as usize, 4096).expect("layout");
                let bases = self.allocators.iter().map(|a| a.thread()?.alloc(layout)).collect::<Result<Vec<_>, _>>()?;
                for &base in &bases {
                    write_zeros(ep, base, share)?;
                }
                let mut fields = vec![bytes, layout::STRIPE_PAGES, nodes as u64, self.rank as u64];
                fields.extend(bases.iter().map(|b| b.to_raw()));
                write_words(ep, word(1), &fields)?;
                ep.write_u64(word(0), layout::ALLOC_READY)?;
                return Ok(Allocation { bytes, bases, owner: self.rank });
            }
            wait_for_word(
                ep,
                word(0),
                self.options.barrier_timeout,
                |w| w == layout::ALLOC_READY,
                || format!("allocation #{index}: the rank making it has not finished (it died?)"),
            )?;
            let fields = read_words(ep, word(1), 4 + nodes)?;
            if fields[0] != bytes {
                return Err(DsmError::AllocMismatch { index, ours: bytes, theirs: fields[0] });
            }
            let bases: Vec<GlobalAddr> = fields[4..].iter().map(|&raw| GlobalAddr::from_raw(raw)).collect();
            Ok(Allocation { bytes, bases, owner: fields[3] as u32 })
        })?;
        // Each rank makes or learns allocation `index` once (next_alloc hands each index out once).
        let _ = self.directory.allocs[index as usize].set(allocation);
        Ok(SharedAddr(index << layout::ALLOC_SHIFT))
    }

    fn check_range(&self, addr: SharedAddr, len: usize) -> Result<()> {
        let index = (addr.0 >> layout::ALLOC_SHIFT) as usize;
        let offset = addr.0 & ((1 << layout::ALLOC_SHIFT) - 1);
        let Some(a) = self.directory.get(index) else {
            return Err(DsmError::BadAddress { addr: addr.0, reason: format!("no allocation #{index}") });
        };
        if offset + len as u64 > a.bytes {
            return Err(DsmError::BadAddress {
                addr: addr.0,
                reason: format!("{len} bytes at offset {offset} run past the allocation's {} bytes", a.bytes),
            });
        }
        Ok(())
    }

    /// Reads `dst.len()` bytes at `addr`. A read within one cached page takes no endpoint and
    /// no process-wide lock (only its cache shard's).
    pub fn read(&self, addr: SharedAddr, dst: &mut [u8]) -> Result<()> {
        self.check_range(addr, dst.len())?;
        if self.cache.read_if_cached(addr.0, dst) {
            return Ok(());
        }
        self.with_ep(|ep| Ok(self.cache.read(ep, &self.directory, addr.0, dst)?))
    }

    /// Writes `src` at `addr` (within one cached page: no endpoint, no process-wide lock). It
    /// is published by this thread's unlock of a lock it holds now
    /// (to that lock's next holders), and by the next barrier (to everyone); see the module
    /// docs' scope rule.
    pub fn write(&self, addr: SharedAddr, src: &[u8]) -> Result<()> {
        self.check_range(addr, src.len())?;
        // In the scopes first: a write that fails halfway is still noticed (an extra notice
        // costs one invalidation; a missing one, a stale read).
        self.note_in_scopes(addr, src.len());
        if self.cache.write_if_cached(addr.0, src) {
            return Ok(());
        }
        self.with_ep(|ep| Ok(self.cache.write(ep, &self.directory, addr.0, src)?))
    }

    /// Puts the pages of `len` bytes at `addr` in the scope of every lock this thread holds.
    fn note_in_scopes(&self, addr: SharedAddr, len: usize) {
        if len == 0 {
            return;
        }
        let (first, last) = (addr.0 / PAGE_SIZE as u64, (addr.0 + len as u64 - 1) / PAGE_SIZE as u64);
        HELD.with(|held| {
            for h in held.borrow_mut().iter_mut().filter(|h| h.dsm == self.id) {
                h.pages.extend(first..=last);
            }
        });
    }

    /// True when this thread holds lock `id` of this DSM.
    fn thread_holds(&self, id: u64) -> bool {
        HELD.with(|held| held.borrow().iter().any(|h| h.dsm == self.id && h.lock == id))
    }

    /// Removes lock `id` from this thread's held locks; the pages written under it.
    fn thread_releases(&self, id: u64) -> HashSet<PageId> {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            match held.iter().position(|h| h.dsm == self.id && h.lock == id) {
                Some(i) => held.remove(i).pages,
                None => HashSet::new(),
            }
        })
    }

    /// Reads a plain-old-data value at `addr`.
    pub fn get<V: bytemuck::Pod>(&self, addr: SharedAddr) -> Result<V> {
        let mut value = V::zeroed();
        self.read(addr, bytemuck::bytes_of_mut(&mut value))?;
        Ok(value)
    }

    /// Writes a plain-old-data value at `addr`.
    pub fn set<V: bytemuck::Pod>(&self, addr: SharedAddr, value: &V) -> Result<()> {
        self.write(addr, bytemuck::bytes_of(value))
    }

    /// Reads `dst.len()` values at `addr`.
    pub fn read_slice<V: bytemuck::Pod>(&self, addr: SharedAddr, dst: &mut [V]) -> Result<()> {
        self.read(addr, bytemuck::cast_slice_mut(dst))
    }

    /// Writes the values of `src` at `addr`.
    pub fn write_slice<V: bytemuck::Pod>(&self, addr: SharedAddr, src: &[V]) -> Result<()> {
        self.write(addr, bytemuck::cast_slice(src))
    }

    fn cohort(&self, id: u64) -> Result<&CohortLock<LockScope>> {
        self.locks.get(id as usize).ok_or_else(|| DsmError::LockId { id, count: layout::LOCK_COUNT })
    }

    /// Acquires lock `id` for this thread: threads of this process queue locally; the process
    /// takes the remote lock and then invalidates the pages other holders wrote under it.
    /// A thread that holds `id` already gets [`DsmError::AlreadyHeld`] (locks do not nest on
    /// themselves); holding several different locks at once is fine. Release it with
    /// [`Dsm::unlock`] from the same thread, or use [`Dsm::guard`].
    pub fn lock(&self, id: u64) -> Result<()> {
        let cohort = self.cohort(id)?;
        if self.thread_holds(id) {
            return Err(DsmError::AlreadyHeld { id });
        }
        let base = cohort.remote().word();
        self.with_ep(|ep| {
            cohort.acquire_with(ep, |ep, scope| -> Result<()> {
                // The notices: head, then the ring, in one READ.
                let words = read_words(ep, base.checked_add(8).expect("lock"), 1 + layout::LOCK_RING as usize)?;
                let head = words[0];
                self.apply_notices(ep, scope.seen, head, layout::LOCK_RING, |pos| {
                    words[1 + (pos % layout::LOCK_RING) as usize]
                })?;
                scope.seen = head;
                Ok(())
            })
        })?;
        HELD.with(|held| held.borrow_mut().push(Held { dsm: self.id, lock: id, pages: HashSet::new() }));
        Ok(())
    }

    /// Acquires lock `id` for this thread, as [`Dsm::lock`], and returns a guard that releases
    /// it with a fallible [`DsmGuard::unlock`] (dropping it unlocks and logs a failure).
    pub fn guard(&self, id: u64) -> Result<DsmGuard<'_, T>> {
        self.lock(id)?;
        Ok(DsmGuard { dsm: self, id, released: false, _not_send: std::marker::PhantomData })
    }

    /// Invalidates the pages noticed at ring positions `from..to` (all pages when the ring has
    /// been overwritten past `from`), except this rank's own.
    fn apply_notices(
        &self,
        ep: &mut T::Endpoint,
        from: u64,
        to: u64,
        ring: u64,
        slot: impl Fn(u64) -> u64,
    ) -> Result<()> {
        if to.saturating_sub(from) > ring {
            return Ok(self.cache.invalidate_all(ep, &self.directory)?);
        }
        let pages = (from..to).filter_map(|pos| layout::parse_notice(slot(pos))).filter(|&(rank, _)| rank != self.rank);
        Ok(self.cache.invalidate(ep, &self.directory, pages.map(|(_, page)| page))?)
    }

    /// Releases lock `id`: hands it to a waiting thread of this process (nothing is sent), or
    /// releases it remotely: writes the diffs of the pages written under it home, appends write
    /// notices for them to its ring, then releases the remote word. If this fails, the pages
    /// stay in the lock's scope and the lock stays held by the process (remotely), so the next
    /// local holder's unlock tries again.
    pub fn unlock(&self, id: u64) -> Result<()> {
        let cohort = self.cohort(id)?;
        if !self.thread_holds(id) || !cohort.held_by_me() {
            return Err(DsmError::NotHolder { id });
        }
        let written = self.thread_releases(id);
        cohort.with_state_mut(|scope| scope.pages.extend(written))?;
        let base = cohort.remote().word();
        self.with_ep(|ep| {
            cohort.release_with(ep, |ep, scope| -> Result<()> {
                let mut pages: Vec<PageId> = scope.pages.iter().copied().collect();
                pages.sort_unstable();
                self.cache.flush_pages(ep, &self.directory, &pages)?;
                if !pages.is_empty() {
                    let head = scope.seen;
                    append_ring(ep, base.checked_add(16).expect("ring"), layout::LOCK_RING, head, self.rank, &pages)?;
                    let new_head = head + pages.len() as u64;
                    ep.write_u64(base.checked_add(8).expect("head"), new_head)?;
                    scope.seen = new_head;
                    scope.pages.clear();
                }
                Ok(())
            })
        })?;
        Ok(())
    }

    /// Waits until every rank arrived; writes this process's changes home before, and
    /// invalidates the pages others changed after. One call per rank per round.
    pub fn barrier(&self) -> Result<()> {
        let mut b = locked(&self.barrier);
        self.with_ep(|ep| -> Result<()> {
            self.cache.flush(ep, &self.directory)?;
            let pages = self.cache.take_written();
            if !pages.is_empty() {
                let head = ep.faa(self.at(layout::BARRIER_HEAD), pages.len() as u64)?;
                append_ring(ep, self.at(layout::BARRIER_RING_AT), layout::BARRIER_RING, head, self.rank, &pages)?;
            }
            let barrier_end = self.at(layout::BARRIER_END);
            let mut end = None;
            b.barrier.wait_with(ep, |ep| {
                // Last to arrive: everyone's notices are in; record where they end.
                let head = ep.read_u64(self.at(layout::BARRIER_HEAD))?;
                ep.write_u64(barrier_end, head)?;
                end = Some(head);
                Ok(())
            })?;
            let end = match end {
                Some(end) => end,
                None => ep.read_u64(barrier_end)?,
            };
            let ring = layout::BARRIER_RING;
            if end > b.seen {
                // The ring is read only when it still holds every notice since `seen`.
                let slots = if end - b.seen <= ring {
                    read_words(ep, self.at(layout::BARRIER_RING_AT), ring as usize)?
                } else {
                    Vec::new()
                };
                self.apply_notices(ep, b.seen, end, ring, |pos| slots[(pos % ring) as usize])?;
            }
            b.seen = end;
            Ok(())
        })
    }

    /// Checkpoints the job (collective: every rank calls it at the same point, holding no
    /// lock; a thread that holds one gets [`DsmError::Checkpoint`] at once): a barrier writes everything home, then rank 0 has every memory node write a
    /// snapshot of its pool with the same sequence number, one above every node's newest, while
    /// the other ranks wait without touching shared memory, so the snapshots are one consistent
    /// cut. Returns the sequence number on every rank; restore every node with it
    /// (`rdmem-memnode --restore DIR --restore-seq N`) and start the job again with
    /// [`DsmOptions::resume`]. The memory nodes need `--checkpoint-dir`. A failure on rank 0
    /// (a node without one, a disk error, another snapshot taking the number first) is its
    /// error there and [`DsmError::Checkpoint`] on the others; the job goes on either way.
    pub fn checkpoint(&self) -> Result<u64> {
        // A lock held now would be taken in the snapshot (until its lease ran out after a
        // resume): refused before anything collective happens.
        let held = HELD.with(|held| held.borrow().iter().find(|h| h.dsm == self.id).map(|h| h.lock));
        if let Some(id) = held {
            return Err(DsmError::Checkpoint(format!("this thread holds lock {id}: unlock it before checkpointing")));
        }
        let rounds_at = self.at(layout::CHECKPOINT_ROUNDS);
        // Read before the barrier: rank 0 changes it only after everyone has passed it.
        let before = self.with_ep(|ep| Ok::<_, DsmError>(ep.read_u64(rounds_at)?))?;
        self.barrier()?;
        let round = before >> ROUND_SHIFT;
        if self.rank == 0 {
            let taken = self.take_snapshots(rounds_at, round);
            let word = ((round + 1) << ROUND_SHIFT) | u64::from(taken.is_err());
            self.with_ep(|ep| Ok::<_, DsmError>(ep.write_u64(rounds_at, word)?))?;
            return taken;
        }
        // Rank 0 beats the word while the nodes write: wait as long as it moves, however long
        // the snapshots take, and give up only when it stands still for the barrier timeout.
        let (mut seen, mut since) = (before, std::time::Instant::now());
        let mut pause = Duration::from_micros(100);
        loop {
            let word = self.with_ep(|ep| Ok::<_, DsmError>(ep.read_u64(rounds_at)?))?;
            if word >> ROUND_SHIFT > round {
                if word & 1 == 1 {
                    return Err(DsmError::Checkpoint(
                        "rank 0 could not take the snapshots (its error says why)".into(),
                    ));
                }
                return self.with_ep(|ep| Ok::<_, DsmError>(ep.read_u64(self.at(layout::CHECKPOINT_SEQ))?));
            }
            if word != seen {
                (seen, since) = (word, std::time::Instant::now());
            } else if since.elapsed() > self.options.barrier_timeout {
                return Err(DsmError::Timeout {
                    what: "checkpoint: rank 0 stopped working on the memory nodes' snapshots (it died?); \
                           this process must not write shared memory again"
                        .into(),
                    waited: self.options.barrier_timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Rank 0's part of [`Dsm::checkpoint`]: [`Dsm::snapshot_all`], while it beats the round
    /// word (`round`, and a count in the low bits) for the waiting ranks.
    fn take_snapshots(&self, rounds_at: GlobalAddr, round: u64) -> Result<u64> {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let beat = s.spawn(|| -> Result<()> {
                let mut ep = self.transport.endpoint()?;
                let mut count = 0u64;
                while !done.load(Ordering::SeqCst) {
                    count = (count + 1) % (1 << (ROUND_SHIFT - 1));
                    ep.write_u64(rounds_at, (round << ROUND_SHIFT) | (count << 1))?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            });
            let taken = self.snapshot_all();
            done.store(true, Ordering::SeqCst);
            let beaten = beat.join().unwrap_or_else(|_| Err(DsmError::Checkpoint("the beat thread panicked".into())));
            let seq = taken?;
            beaten?;
            Ok(seq)
        })
    }

    /// Picks the number (one above every node's newest), records it in the control block and
    /// on every node (so each snapshot holds it), has every node write its snapshot (again,
    /// with a higher number, if another snapshot took the number first: a node's periodic one),
    /// then marks the stamps as moved on, so that a later snapshot of a node (periodic, or asked
    /// for otherwise) is not taken for this checkpoint at a resume.
    fn snapshot_all(&self) -> Result<u64> {
        let nodes: Vec<NodeId> = self.transport.nodes().iter().map(|n| n.id).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut newest = self.with_ep(|ep| Ok::<_, DsmError>(ep.read_u64(self.at(layout::CHECKPOINT_SEQ))?))?;
            for &node in &nodes {
                newest = newest.max(self.transport.newest_checkpoint(node)?);
            }
            let seq = newest + 1;
            if seq & STAMP_MOVED_ON != 0 {
                return Err(DsmError::Checkpoint(format!("sequence number {seq} is too large")));
            }
            self.with_ep(|ep| -> Result<()> {
                ep.write_u64(self.at(layout::CHECKPOINT_SEQ), seq)?;
                ep.write_u64(self.at(layout::RESUMED), 0)?;
                for &stamp in &self.stamps {
                    ep.write_u64(stamp, seq)?;
                }
                Ok(())
            })?;
            // All nodes at once: each writes its own disk.
            let done: Vec<rdmem_core::Result<rdmem_core::Checkpoint>> = std::thread::scope(|s| {
                let asks: Vec<_> = nodes
                    .iter()
                    .map(|&node| (node, s.spawn(move || self.transport.checkpoint(node, Some(seq), false))))
                    .collect();
                asks.into_iter()
                    .map(|(node, a)| {
                        a.join().unwrap_or_else(|_| {
                            Err(rdmem_core::Error::Checkpoint { node, reason: "the request's thread panicked".into() })
                        })
                    })
                    .collect()
            });
            // From now on the nodes' state moves on from checkpoint `seq`.
            self.with_ep(|ep| -> Result<()> {
                for &stamp in &self.stamps {
                    ep.write_u64(stamp, seq | STAMP_MOVED_ON)?;
                }
                Ok(())
            })?;
            match done.into_iter().find_map(|d| d.err()) {
                None => return Ok(seq),
                // Another snapshot (a node's periodic one) may have taken the number: again.
                Some(rdmem_core::Error::Checkpoint { node, reason }) if attempt < 3 => {
                    tracing::warn!("checkpoint {seq}: node {node}: {reason}; trying again with a new number");
                }
                Some(e) => return Err(e.into()),
            }
        }
    }

    /// The checkpoint this process resumed the job from ([`DsmOptions::resume`]), or `None` for
    /// a job started afresh. A program that checkpoints keeps its own progress (an iteration
    /// count, say) in shared memory and reads it back here.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    /// Leaves the job: writes everything home and waits for all ranks (a barrier). Each rank
    /// then frees the shared memory it allocated itself (its own blocks, so every chunk goes
    /// back to the pools); the rank that made the control block waits for the others to be
    /// done (at most the barrier timeout), then frees it, so the memory nodes can host the
    /// next job.
    pub fn leave(self) -> Result<()> {
        self.barrier()?;
        self.left.store(true, Ordering::SeqCst);
        let threads: Vec<_> = self.allocators.iter().map(|a| a.thread()).collect::<Result<_, _>>()?;
        for a in self.directory.allocs.iter().filter_map(OnceLock::get).filter(|a| a.owner == self.rank) {
            for (i, &base) in a.bases.iter().enumerate() {
                threads[i].free(base)?;
            }
        }
        for t in &threads {
            t.flush()?;
        }
        // No beat may land after LEFT: the creator frees the block once everyone has left.
        if let Some(h) = locked(&self.heartbeat).take() {
            h.stop();
        }
        let creator = self.with_ep(|ep| -> Result<u64> {
            ep.faa(self.at(layout::LEFT), 1)?;
            Ok(ep.read_u64(self.at(layout::CREATOR))?)
        })?;
        if creator == self.rank as u64 + 1 {
            // The others touch the block until their LEFT arrives: wait for it, then free it.
            let size = self.size as u64;
            self.with_ep(|ep| {
                wait_for_word(
                    ep,
                    self.at(layout::LEFT),
                    self.options.barrier_timeout,
                    |n| n >= size,
                    || "leave: not every rank left; the control block stays (a later job takes it over)".into(),
                )
            })?;
            // Unpublished first, so no later job finds the block once its memory is reused.
            self.with_ep(|ep| Ok::<_, DsmError>(self.root.compare_exchange(ep, Some(self.published), None)?))?
                .map_err(|now| {
                    DsmError::JobConflict(format!(
                        "leave: the DSM root holds {now:?}, not this job's control block {}",
                        self.control
                    ))
                })?;
            threads[0].free(self.control)?;
            threads[0].flush()?;
        }
        Ok(())
    }
}

impl<T: Transport> Drop for Dsm<T> {
    fn drop(&mut self) {
        if !self.left.load(Ordering::SeqCst) {
            // Not a clean leave: at least write this process's changes home.
            let flushed = self.with_ep(|ep| Ok::<_, DsmError>(self.cache.flush(ep, &self.directory)?));
            if let Err(e) = flushed {
                tracing::error!("rank {} dropped without leave(); writing its changes home failed: {e}", self.rank);
            }
        }
    }
}

/// Lock `id` held by this thread ([`Dsm::guard`]); release it with [`DsmGuard::unlock`]. It
/// stays on the thread that took the lock (it is not `Send`).
#[must_use = "the lock is held until unlock() (or drop, which cannot report errors)"]
pub struct DsmGuard<'a, T: Transport> {
    dsm: &'a Dsm<T>,
    id: u64,
    released: bool,
    /// The lock belongs to the thread that took it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl<T: Transport> DsmGuard<'_, T> {
    /// The lock's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Releases the lock ([`Dsm::unlock`]): the writes made under it reach its next holder.
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.dsm.unlock(self.id)
    }
}

impl<T: Transport> Drop for DsmGuard<'_, T> {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!("DSM lock {} dropped without unlock(); releasing it", self.id);
            if let Err(e) = self.dsm.unlock(self.id) {
                tracing::error!("releasing the dropped DSM lock {} failed: {e}", self.id);
            }
        }
    }
}

/// The low bits of a published control block's address that carry its instance tag (blocks
/// are 4 KiB aligned).
const TAG_MASK: u64 = 0xfff;

/// Reads the word at `addr` every 200 µs until `done` holds for it; after `limit` without, a
/// [`DsmError::Timeout`] saying `what`.
fn wait_for_word<E: Endpoint>(
    ep: &mut E,
    addr: GlobalAddr,
    limit: Duration,
    done: impl Fn(u64) -> bool,
    what: impl FnOnce() -> String,
) -> Result<()> {
    let started = std::time::Instant::now();
    while !done(ep.read_u64(addr)?) {
        if started.elapsed() > limit {
            return Err(DsmError::Timeout { what: what(), waited: limit });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// What the root holds for the control block at `control` made as `instance`: its address with
/// a tag of the instance in the low 12 bits, so that a block made later at the same address is
/// another value, and a takeover's compare-and-swap cannot unpublish it by mistake.
fn published(control: GlobalAddr, instance: u64) -> GlobalAddr {
    GlobalAddr::from_raw(control.to_raw() | (1 + instance % TAG_MASK))
}

/// A number that tells this control block from any other made at the same address: clock,
/// process id and a counter, mixed.
fn instance_id() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ (std::process::id() as u64) << 40
        ^ COUNT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64's finalizer.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Appends notices for `pages` by `rank` at ring positions `head..` (the last `ring` of them
/// when there are more: readers that far behind invalidate everything anyway).
fn append_ring<E: Endpoint>(
    ep: &mut E,
    ring_at: GlobalAddr,
    ring: u64,
    head: u64,
    rank: u32,
    pages: &[PageId],
) -> rdmem_core::Result<()> {
    let skip = pages.len().saturating_sub(ring as usize);
    let words: Vec<(u64, u64)> =
        pages.iter().enumerate().skip(skip).map(|(i, &p)| (head + i as u64, layout::notice(rank, p))).collect();
    // Contiguous runs of slots (at most two: before and after the wrap), one WRITE each.
    let mut bytes = Vec::with_capacity(words.len() * 8);
    let mut batch_runs: Vec<(u64, usize, usize)> = Vec::new();
    for &(pos, word) in &words {
        let slot = pos % ring;
        match batch_runs.last_mut() {
            Some((start, _, len)) if *start + *len as u64 == slot => *len += 1,
            _ => batch_runs.push((slot, bytes.len(), 1)),
        }
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let mut batch = ep.batch();
    for &(slot, at, len) in &batch_runs {
        batch.write(ring_at.checked_add(slot * 8).expect("ring"), &bytes[at..at + len * 8]);
    }
    batch.submit()
}

/// READs `count` little-endian words at `addr`, in one READ.
fn read_words<E: Endpoint>(ep: &mut E, addr: GlobalAddr, count: usize) -> rdmem_core::Result<Vec<u64>> {
    let mut bytes = vec![0u8; 8 * count];
    ep.read(addr, &mut bytes)?;
    Ok(bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect())
}

/// WRITEs `words` little-endian at `addr`, in one WRITE.
fn write_words<E: Endpoint>(ep: &mut E, addr: GlobalAddr, words: &[u64]) -> rdmem_core::Result<()> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    ep.write(addr, &bytes)
}

/// WRITEs `len` zero bytes at `addr`, 64 KiB per WRITE, in batches.
fn write_zeros<E: Endpoint>(ep: &mut E, addr: GlobalAddr, len: u64) -> rdmem_core::Result<()> {
    const PIECE: u64 = 64 << 10;
    let zeros = vec![0u8; PIECE as usize];
    let mut done = 0;
    while done < len {
        let mut batch = ep.batch();
        while done < len && batch.len() < 32 {
            let n = PIECE.min(len - done);
            batch.write(addr.checked_add(done).expect("inside the pool"), &zeros[..n as usize]);
            done += n;
        }
        batch.submit()?;
    }
    Ok(())
}

impl<T: Transport> Dsm<T> {
    /// For tests of dead jobs: stops this rank's heartbeats (the job's and its allocators')
    /// and forgets it, writing nothing home, as if its process had been killed.
    #[doc(hidden)]
    pub fn abandon(self) {
        if let Some(h) = locked(&self.heartbeat).take() {
            h.stop();
        }
        for a in &self.allocators {
            a.stop_heartbeat();
        }
        std::mem::forget(self);
    }

    /// True when the page of `addr` is in this process's cache.
    pub fn is_cached(&self, addr: SharedAddr) -> bool {
        self.cache.is_cached(addr.0 / PAGE_SIZE as u64)
    }
}
