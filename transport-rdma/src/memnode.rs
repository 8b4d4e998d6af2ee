//! The memory node: a registered pool that clients reach with one-sided verbs only.
//!
//! [`Memnode::start`] maps a pool per tenant (huge pages by default; the default tenant's, and
//! one per [`TenantConfig`]), registers each as a memory region of its tenant's own protection
//! domain, and listens for clients with RDMA-CM ([`crate::cm`]), and for control requests
//! (checkpoints, a tenant's clients, evictions, [`crate::wire`]) on TCP, both on the same
//! address and port. Each client queue pair is one RDMA-CM connection whose connect request
//! carries a MAC made with its tenant's token ([`crate::cm_auth`]: version, tenant, MAC, clock
//! and replay are checked first, and only then is a queue pair created with access to the
//! pool); the token itself never crosses the wire. Each connection gets a remote key of its own,
//! a memory window bound to its queue pair ([`crate::window`]; the regions themselves then give
//! no remote access), or on devices without windows (or with
//! [`MemnodeConfig::memory_windows`] off) its pool's region key. After that the node's CPU does
//! nothing for that client: one thread reads the connection manager's events, and when a client
//! disconnects (or its process dies: the kernel disconnects it, or it is evicted) its window is
//! deallocated, revoking its key, and its queue pair is destroyed. A client that dies never
//! disturbs the others, and no client, with a token or without, can stop the node or keep
//! others out (see [`Memnode::serve`]).
//!
//! The node knows nothing of what lives in its pool: the pool starts zeroed (or restored from a
//! snapshot) and the layers above (the allocator) format it with one-sided operations.
//!
//! # Checkpoints
//! With [`MemnodeConfig::checkpoint`], the node writes snapshots of its pool to a directory
//! ([`rdmem_checkpoint`]: full or incremental, atomic, checksummed per block) when a client asks
//! over a control connection ([`crate::control::checkpoint`], `rdmem-pools checkpoint`), and
//! every [`CheckpointConfig::every`] if set. This is the node CPU's one duty besides accepting
//! clients, and it runs on its own thread: the data path never waits for it. A snapshot is a
//! consistent cut only while no client writes (the DSM asks right after a barrier); a periodic
//! one of a busy pool is fuzzy. With [`MemnodeConfig::restore`], [`Memnode::start`] loads a
//! snapshot into the registered pool before any client can connect.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use rdmem_checkpoint::{Checkpointer, Report, Take};

use rustix::event::{PollFd, PollFlags, Timespec};

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{ExtendedQueuePair, QueuePair};

use rdmem_core::Refusal;

use crate::cm::{self, CmId, EventChannel, IdKey};
use crate::cm_auth::{self, Verifier};
use crate::device::{Device, DeviceSelection};
use crate::error::RdmaError;
use crate::memory::{PageSize, Region};
use crate::queue_pair;
use crate::window::{Window, WindowSupport};
use crate::wire::{self, Answer, Checkpointed, ClientEntry, Op, Opening, Request};

/// How a memory node is set up.
#[derive(Debug, Clone)]
pub struct MemnodeConfig {
    /// Where to listen for clients.
    pub listen: SocketAddr,
    /// The default tenant's pool size in bytes, a whole number of `page_size` pages; 0: no
    /// default tenant (then `tenants` names at least one).
    pub pool_size: u64,
    /// Register the pool even when it is larger than the free memory (the OOM killer may then
    /// end other processes).
    pub force_pool_size: bool,
    /// Pages backing the pool.
    pub page_size: PageSize,
    /// The RDMA device.
    pub device: DeviceSelection,
    /// The token the default tenant's clients must prove they hold: at least
    /// [`cm_auth::MIN_TOKEN`] bytes, or empty (no authentication, `--insecure-no-token`).
    pub token: String,
    /// More tenants (`--tenant NAME:SIZE:TOKEN_FILE`), each with a pool, protection domain and
    /// memory region of its own: a client of one cannot reach another's memory, and the device
    /// enforces it.
    pub tenants: Vec<TenantConfig>,
    /// Give each client connection a memory window of its own (revoked when it ends), where
    /// the device has them. `false` (`--no-memory-windows`): every client of a tenant gets its
    /// pool's region key, which is never revoked (for devices whose windows misbehave, and to
    /// measure what windows cost).
    pub memory_windows: bool,
    /// The most client connections (established or in progress) one tenant may hold at once;
    /// past it, connect requests are refused as busy, so no tenant can take all the device's
    /// queue pairs and windows from the others.
    pub max_clients_per_tenant: usize,
    /// This node's id, the node part of its global addresses.
    pub node_id: u16,
    /// Where and how often to write snapshots of the pool (`None`: checkpoint requests are
    /// refused).
    pub checkpoint: Option<CheckpointConfig>,
    /// A snapshot to load into the pool before serving.
    pub restore: Option<RestoreConfig>,
}

/// A tenant of a memory node: a pool of its own, reached with its own token.
#[derive(Clone)]
pub struct TenantConfig {
    /// Its name, which clients give ([`crate::RdmaOptions::tenant`]); not secret.
    pub name: String,
    /// Its pool's size in bytes, a whole number of the node's pages.
    pub pool_size: u64,
    /// Its token, at least [`cm_auth::MIN_TOKEN`] bytes.
    pub token: String,
}

impl std::fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantConfig").field("name", &self.name).field("pool_size", &self.pool_size).finish()
    }
}

impl std::str::FromStr for TenantConfig {
    type Err = String;

    /// `NAME:SIZE:TOKEN_FILE` (the size with an optional K, M or G suffix; the token is the
    /// file's content without its trailing newline).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(name), Some(size), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("tenant {s:?}: give NAME:SIZE:TOKEN_FILE, e.g. alice:1G:/etc/rdmem/alice.token"));
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("tenant name {name:?}: use letters, digits, '-', '_' and '.'"));
        }
        let pool_size = rdmem_core::config::parse_size(size).map_err(|e| format!("tenant {name}: {e}"))?;
        let token = rdmem_core::config::resolve_token(None, Some(std::path::Path::new(file)))
            .map_err(|e| format!("tenant {name}: {e}"))?;
        cm_auth::check_token(token.as_bytes()).map_err(|e| format!("tenant {name} ({file}): {e}"))?;
        Ok(TenantConfig { name: name.to_owned(), pool_size, token })
    }
}

/// Snapshots of the pool ([`rdmem_checkpoint`]).
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    /// The directory (created if need be).
    pub dir: PathBuf,
    /// Also take a (fuzzy) snapshot this often.
    pub every: Option<Duration>,
    /// Block size: the unit of change of incremental snapshots (a power of two, at least 4 KiB;
    /// [`rdmem_checkpoint::DEFAULT_BLOCK_SIZE`] is a good default).
    pub block_size: usize,
}

/// Which snapshot to start from.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The directory holding it.
    pub dir: PathBuf,
    /// Its sequence number (`None`: the newest that is whole; a damaged newer one is skipped
    /// with a warning that names the file and block).
    pub seq: Option<u64>,
}

/// What a memory node serves to one tenant, as it logs it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDescriptor {
    /// The tenant ([`cm_auth::DEFAULT_TENANT`] for the node's default pool).
    pub tenant: String,
    /// Node id.
    pub node_id: u16,
    /// Device name.
    pub device: String,
    /// Pool base address in the node's address space.
    pub base: u64,
    /// Pool size in bytes.
    pub size: u64,
    /// The memory region's remote key. With memory windows ([`Memnode::windows`]) it gives no
    /// remote access: each client connection gets a window's key of its own instead.
    pub rkey: u32,
    /// Pages actually backing the pool.
    pub page_size: PageSize,
    /// Listening address (RDMA-CM and TCP).
    pub listen: SocketAddr,
}

struct State {
    config: MemnodeConfig,
    device: Device,
    /// In the [`Verifier`]'s order: [`Verified::tenant`](cm_auth::Verified::tenant) indexes it.
    tenants: Vec<Tenant>,
    /// The default tenant's index (`None`: the node has none).
    default_tenant: Option<usize>,
    /// Memory windows per connection, or the regions' keys.
    windows: WindowSupport,
    cq: GenericCompletionQueue,
    clients: AtomicUsize,
    checkpointer: Option<Mutex<Checkpointer>>,
    /// The newest snapshot's sequence number in the checkpoint directory.
    newest: AtomicU64,
}

/// A tenant's pool: its own protection domain and memory region.
struct Tenant {
    name: String,
    // The region is deregistered before its protection domain is freed (field order).
    pool: Region,
    pd: Arc<ProtectionDomain>,
}

/// A running memory node. Dropping it stops accepting and disconnects its clients.
pub struct Memnode {
    state: Arc<State>,
    listener: TcpListener,
    /// Checks connect and control requests (only the serving thread uses it).
    verifier: Mutex<Verifier>,
    /// The RDMA-CM listener and its events (connect requests and every client's connection).
    cm_listener: CmId,
    cm_events: EventChannel,
    descriptors: Vec<PoolDescriptor>,
}

impl Memnode {
    /// Checks the pool size (a whole number of pages, that fits the free memory unless
    /// `force_pool_size`), opens the device, maps and registers the pool, binds the listening
    /// socket.
    pub fn start(config: MemnodeConfig) -> Result<Self, RdmaError> {
        let page = config.page_size.bytes() as u64;
        let mut wanted: Vec<(&str, u64, &str)> = Vec::new();
        if config.pool_size != 0 {
            wanted.push((cm_auth::DEFAULT_TENANT, config.pool_size, &config.token));
        }
        wanted.extend(config.tenants.iter().map(|t| (t.name.as_str(), t.pool_size, t.token.as_str())));
        if wanted.is_empty() {
            return Err(RdmaError::Config("no pool to serve: give a pool size, or a tenant".into()));
        }
        for (i, (name, _, _)) in wanted.iter().enumerate() {
            if wanted[..i].iter().any(|(other, _, _)| other == name) {
                return Err(RdmaError::Config(format!("tenant {name:?} is given twice")));
            }
        }
        for &(name, size, _) in &wanted {
            if size == 0 || size % page != 0 {
                return Err(RdmaError::Config(format!(
                    "tenant {name}: pool size {size} bytes is not a whole number of {:?} pages ({page} bytes): give \
                     a multiple, e.g. {} bytes",
                    config.page_size,
                    size.div_ceil(page).max(1).saturating_mul(page)
                )));
            }
        }
        let default_tenant = wanted.iter().position(|(name, _, _)| *name == cm_auth::DEFAULT_TENANT);
        if default_tenant.is_none() && (config.checkpoint.is_some() || config.restore.is_some()) {
            return Err(RdmaError::Config(
                "checkpoints and restores are of the default tenant's pool, and this node has none: give a pool \
                 size and a token too"
                    .into(),
            ));
        }
        if !config.force_pool_size {
            let total = wanted.iter().try_fold(0u64, |sum, w| sum.checked_add(w.1));
            let total =
                total.ok_or_else(|| RdmaError::Config("the tenants' pools add up to more than 2^64 bytes".into()))?;
            crate::memory::check_fits(total, config.page_size)?;
        }
        let verifier =
            Verifier::new(&wanted.iter().map(|&(name, _, token)| (name, token.as_bytes())).collect::<Vec<_>>())
                .map_err(RdmaError::Config)?;
        let device = Device::open(&config.device)?;
        let mut tenants = Vec::with_capacity(wanted.len());
        let mut windows = None;
        for &(name, size, _) in &wanted {
            let pd = device.context().alloc_pd().map_err(|e| RdmaError::verbs("ibv_alloc_pd", e))?;
            let windows = *windows.get_or_insert_with(|| {
                if config.memory_windows {
                    WindowSupport::probe(&pd)
                } else {
                    tracing::warn!(
                        "--no-memory-windows: every client of a tenant gets its pool's own remote key, which a client \
                         keeps after it disconnects or is evicted"
                    );
                    WindowSupport::RegionKey
                }
            });
            let len = usize::try_from(size).map_err(|_| RdmaError::verbs("pool size", "too large"))?;
            let pool = Region::new(&pd, len, config.page_size, windows.region_access())?;
            tenants.push(Tenant { name: name.to_owned(), pool, pd });
        }
        let windows = windows.expect("at least one tenant");
        let restored = match (&config.restore, default_tenant) {
            (Some(r), Some(d)) => Some(restore(r, tenants[d].pool.as_mut_slice())?),
            _ => None,
        };
        let checkpointer = match (&config.checkpoint, default_tenant) {
            (Some(c), Some(d)) => Some(Mutex::new(Checkpointer::open(
                &c.dir,
                tenants[d].pool.len() as u64,
                c.block_size,
                restored.as_ref(),
            )?)),
            _ => None,
        };
        // The node posts only memory window binds, one at a time, each waited for.
        let mut builder = device.context().create_cq_builder();
        builder.setup_cqe(16);
        let cq = GenericCompletionQueue::from(builder.build().map_err(|e| RdmaError::verbs("ibv_create_cq", e))?);
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| RdmaError::io(format!("cannot listen on {}", config.listen), e))?;
        let listen = listener.local_addr().map_err(|e| RdmaError::io("local address", e))?;
        // RDMA-CM listens on the same address and port (its port space is its own).
        let cm_events = EventChannel::new()?;
        let mut cm_listener = CmId::new(&cm_events)?;
        let cm_listen = device.routable(listen);
        cm_listener.bind(cm_listen).map_err(|e| {
            RdmaError::Config(format!(
                "RDMA-CM cannot listen on {cm_listen} ({e}): give --listen the address of a netdev under an RDMA \
                 device (e.g. rxe0's), or 0.0.0.0"
            ))
        })?;
        cm_listener.listen(CM_BACKLOG)?;
        let descriptors = tenants
            .iter()
            .map(|t| PoolDescriptor {
                tenant: t.name.clone(),
                node_id: config.node_id,
                device: device.name().to_owned(),
                base: t.pool.addr(),
                size: t.pool.len() as u64,
                rkey: t.pool.rkey(),
                page_size: t.pool.page_size(),
                listen,
            })
            .collect();
        let newest = AtomicU64::new(checkpointer.as_ref().map_or(0, |c| c.lock().expect("new").newest()));
        let state = Arc::new(State {
            config,
            device,
            tenants,
            default_tenant,
            windows,
            cq,
            clients: AtomicUsize::new(0),
            checkpointer,
            newest,
        });
        Ok(Memnode { state, listener, verifier: Mutex::new(verifier), cm_listener, cm_events, descriptors })
    }

    /// What this node serves: the default tenant's pool, or the first tenant's when it has no
    /// default tenant.
    pub fn descriptor(&self) -> &PoolDescriptor {
        &self.descriptors[self.state.default_tenant.unwrap_or(0)]
    }

    /// Every tenant's pool, the default tenant's first.
    pub fn descriptors(&self) -> &[PoolDescriptor] {
        &self.descriptors
    }

    /// Whether each client connection gets a memory window of its own (revoked when it ends),
    /// or the pools' own keys (devices without type-2 windows).
    pub fn windows(&self) -> WindowSupport {
        self.state.windows
    }

    /// Clients connected right now.
    pub fn clients(&self) -> usize {
        self.state.clients.load(Ordering::SeqCst)
    }

    /// Writes a snapshot of the pool now (one at a time: a second call waits for the first).
    /// Fails if the node has no [`MemnodeConfig::checkpoint`].
    pub fn checkpoint(&self, take: Take) -> Result<Report, RdmaError> {
        let Some(cp) = &self.state.checkpointer else {
            return Err(RdmaError::Config(
                "this memory node takes no checkpoints: start it with --checkpoint-dir".into(),
            ));
        };
        let mut cp = cp.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The newest a client is told of ([`Op::Newest`]) counts the snapshot being written, so
        // a collective checkpoint picks a number above it. (`take` goes on as it is: a snapshot
        // asked for by number is pinned, one without is not; the number is the same, picked
        // under the lock.)
        self.state.newest.fetch_max(take.seq.unwrap_or(cp.newest().saturating_add(1)), Ordering::SeqCst);
        let pool = &self.state.tenants[self.state.default_tenant.expect("a checkpointer has a default tenant")].pool;
        let report = cp.checkpoint(pool.as_slice(), take)?;
        tracing::info!(
            "checkpoint {} ({}{}): {} bytes written ({} blocks of data, {} of zeros) to {} in {:.3} s",
            report.seq,
            if report.parent.is_some() { "incremental" } else { "full" },
            report.parent.map(|p| format!(" on {p}")).unwrap_or_default(),
            report.bytes,
            report.data_blocks,
            report.zero_blocks,
            report.file.display(),
            report.duration.as_secs_f64()
        );
        Ok(report)
    }

    /// Serves until `stop` becomes true (checked at least every 50 ms), from one thread that
    /// polls the RDMA-CM event channel, the control listener and the control requests in
    /// progress. No thread per client, so no client (and no number of them) can make the node
    /// run out of threads or stop serving the others:
    /// - a connect request is checked ([`cm_auth`]) before anything is created for it, and
    ///   refused with its reason (wrong token, version, unknown tenant, clock, replay);
    /// - a connection must be established within [`HANDSHAKE_DEADLINE`] of its request, and at
    ///   most [`MAX_PENDING`] are in progress: past that the oldest is dropped for the newest,
    ///   so half-open connections cannot keep a real client out;
    /// - a control request must be complete within [`HANDSHAKE_DEADLINE`] of its accept (one
    ///   byte every few seconds does not hold a slot any longer), and at most [`MAX_PENDING`]
    ///   are in progress, likewise;
    /// - when accept runs out of file descriptors (EMFILE, ENFILE) or memory, the oldest
    ///   control request is dropped to make room, or accepting pauses for [`ACCEPT_BACKOFF`];
    /// - a tenant holds at most [`MemnodeConfig::max_clients_per_tenant`] connections;
    /// - warnings about misbehaving peers are rate-limited (one a second per kind, source
    ///   address and reason, with a count of those suppressed).
    ///
    /// Checkpoints (asked for, or every [`CheckpointConfig::every`]) are taken on a thread of
    /// their own, one at a time, each answered when it is on disk.
    ///
    /// Only a failure of the listening socket or of the connection manager itself ends it with
    /// an error.
    pub fn serve(&self, stop: &AtomicBool) -> Result<(), RdmaError> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(MAX_QUEUED_CHECKPOINTS);
        std::thread::scope(|scope| {
            if self.state.checkpointer.is_some() {
                scope.spawn(|| self.take_checkpoints(queue, stop));
            }
            let served = self.serve_clients(stop, &jobs);
            drop(jobs); // the checkpoint thread ends after the one in progress
            served
        })
    }

    /// The checkpoint thread: requests in order, and the periodic ones.
    fn take_checkpoints(&self, queue: mpsc::Receiver<Job>, stop: &AtomicBool) {
        let every = self.state.config.checkpoint.as_ref().and_then(|c| c.every);
        let mut next = every.map(|e| Instant::now() + e);
        loop {
            let wait = next.map_or(POLL_INTERVAL, |t| t.saturating_duration_since(Instant::now()).min(POLL_INTERVAL));
            match queue.recv_timeout(wait) {
                Ok(job) => self.answer(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if next.is_some_and(|t| t <= Instant::now()) {
                if let Err(e) = self.checkpoint(Take::default()) {
                    tracing::error!("periodic checkpoint failed: {e}");
                }
                next = every.map(|e| Instant::now() + e);
            }
        }
    }

    /// Takes a requested checkpoint and answers it (a peer that has gone only misses the
    /// answer).
    fn answer(&self, mut job: Job) {
        // A requester that has gone (closed, or died while its request waited) gets no
        // snapshot: a DSM job that gave up on it may be writing again.
        if job.stream.set_nonblocking(true).is_err() || wire::peer_closed(&job.stream) {
            tracing::warn!("checkpoint asked for by {} not taken: it has gone", job.peer);
            return;
        }
        let answer = match self.checkpoint(job.take) {
            Ok(r) => Answer::Checkpointed(Checkpointed {
                node_id: self.state.config.node_id,
                seq: r.seq,
                parent: r.parent,
                full: r.parent.is_none(),
                data_blocks: r.data_blocks,
                zero_blocks: r.zero_blocks,
                bytes: r.bytes,
                scanned: r.scanned,
                micros: r.duration.as_micros() as u64,
            }),
            Err(e) => {
                tracing::warn!("checkpoint asked for by {} failed: {e}", job.peer);
                Answer::Refused(Refusal::Other(format!("checkpoint failed: {e}")))
            }
        };
        let sent = job
            .stream
            .set_nonblocking(false)
            .and_then(|()| job.stream.set_write_timeout(Some(HANDSHAKE_DEADLINE)))
            .and_then(|()| answer.write_to(&mut job.stream));
        if let Err(e) = sent {
            tracing::warn!("cannot answer {}'s checkpoint request: {e}", job.peer);
        }
    }

    fn serve_clients(&self, stop: &AtomicBool, jobs: &mpsc::SyncSender<Job>) -> Result<(), RdmaError> {
        self.listener.set_nonblocking(true).map_err(|e| RdmaError::io("listener", e))?;
        let mut verifier = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut clients = Clients::default();
        let mut warnings = RateLimited::default();
        let mut accept_paused_until: Option<Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            // Control requests past their deadline are dropped (the peer only sees the close).
            while pending.front().is_some_and(|p| p.deadline <= now) {
                let p = pending.pop_front().expect("non-empty");
                warnings.warn(Warning::Deadline, || {
                    format!("control request from {} not complete within {HANDSHAKE_DEADLINE:?}; closed", p.peer)
                });
            }
            clients.drop_late(now, &mut warnings);
            if accept_paused_until.is_some_and(|t| t <= now) {
                accept_paused_until = None;
            }
            let accepting = accept_paused_until.is_none();
            let timeout =
                pending.front().map_or(POLL_INTERVAL, |p| p.deadline.saturating_duration_since(now).min(POLL_INTERVAL));
            let (cm_ready, listener_ready, pending_ready) = {
                let mut fds = Vec::with_capacity(2 + pending.len());
                fds.push(PollFd::new(&self.cm_events, PollFlags::IN));
                fds.push(PollFd::new(&self.listener, if accepting { PollFlags::IN } else { PollFlags::empty() }));
                fds.extend(pending.iter().map(|p| PollFd::new(&p.stream, PollFlags::IN)));
                let ts = Timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
                match rustix::event::poll(&mut fds, Some(&ts)) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(RdmaError::io("poll", e.into())),
                }
                let flags: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
                (flags[0], accepting && flags[1], flags[2..].to_vec())
            };
            if cm_ready {
                self.cm_events(&mut verifier, &mut clients, &mut warnings)?;
            }
            // Control requests that have bytes to read: complete ones are answered or queued.
            let readable: Vec<usize> = pending_ready.iter().enumerate().filter(|&(_, &r)| r).map(|(i, _)| i).collect();
            for &i in readable.iter().rev() {
                match pending[i].read_more() {
                    Progress::NeedMore => {}
                    Progress::Closed => {
                        pending.remove(i);
                    }
                    Progress::Done(Opening::Request(request)) => {
                        let p = pending.remove(i).expect("index in range");
                        if let Some(job) = self.control(p, request, &mut verifier, &mut clients, &mut warnings) {
                            // Only a node with a checkpointer queues jobs: its thread is there.
                            if let Err(mpsc::TrySendError::Full(mut job)) = jobs.try_send(job) {
                                let refusal = Refusal::Busy(format!(
                                    "{MAX_QUEUED_CHECKPOINTS} checkpoint requests are waiting already"
                                ));
                                let (ip, code) = (Some(job.peer.ip()), wire::refusal_code(&refusal));
                                warnings.warn_from(Warning::Refused, ip, code, || {
                                    format!("refused {}'s request: {refusal}", job.peer)
                                });
                                let _ = Answer::Refused(refusal).write_to(&mut job.stream);
                            }
                        }
                    }
                    Progress::Done(Opening::Legacy) => {
                        let mut p = pending.remove(i).expect("index in range");
                        warnings.warn_from(Warning::Refused, Some(p.peer.ip()), 0, || {
                            format!("refused {}: {}", p.peer, wire::LEGACY_REFUSAL)
                        });
                        let _ = std::io::Write::write_all(&mut p.stream, &Opening::legacy_refusal());
                    }
                    Progress::Bad(e) => {
                        let p = pending.remove(i).expect("index in range");
                        warnings.warn_from(Warning::Garbage, Some(p.peer.ip()), 0, || {
                            format!("control request from {} failed: {e}", p.peer)
                        });
                    }
                }
            }
            if listener_ready {
                self.accept_all(&mut pending, &mut warnings, &mut accept_paused_until)?;
            }
        }
        Ok(())
    }

    /// Handles every event waiting on the RDMA-CM channel: connect requests are checked and
    /// accepted or rejected, established connections counted, ended ones destroyed.
    fn cm_events(
        &self,
        verifier: &mut Verifier,
        clients: &mut Clients,
        warnings: &mut RateLimited,
    ) -> Result<(), RdmaError> {
        while let Some(event) = self.cm_events.next()? {
            match event.kind {
                cm::CONNECT_REQUEST => {
                    // SAFETY: a CONNECT_REQUEST just read from this channel, adopted once.
                    let id = unsafe { self.cm_events.adopt(&event) };
                    if let Some(client) = self.admit(id, &event, verifier, clients, warnings) {
                        clients.add(event.id, client, warnings);
                    }
                }
                cm::ESTABLISHED => {
                    if let Some(client) = clients.established(event.id) {
                        let now = self.state.clients.fetch_add(1, Ordering::SeqCst) + 1;
                        tracing::info!(
                            "client {} of tenant {} connected (client id {}, key {}; {now} connected)",
                            client.peer,
                            self.state.tenants[client.tenant].name,
                            client.qp.qp_number(),
                            client.window.as_ref().map_or("the pool's".to_owned(), |w| format!("{:#x}", w.rkey())),
                        );
                    }
                }
                cm::DEVICE_REMOVAL if event.id == self.cm_listener.key() => {
                    return Err(RdmaError::verbs("RDMA-CM", "the device was removed"));
                }
                cm::DISCONNECTED | cm::CONNECT_ERROR | cm::UNREACHABLE | cm::REJECTED | cm::DEVICE_REMOVAL => {
                    if let Some(client) = clients.remove(event.id) {
                        if client.established {
                            let now = self.left(&client);
                            tracing::info!(
                                "client {} left (client id {}: {}its queue pair destroyed; {now} connected)",
                                client.peer,
                                client.qp.qp_number(),
                                if client.window.is_some() { "its key revoked, " } else { "" }
                            );
                        } else {
                            warnings.warn(Warning::Deadline, || {
                                format!("connection from {} failed before it was established ({event:?})", client.peer)
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Accepts every connection waiting on the listener into `pending`.
    fn accept_all(
        &self,
        pending: &mut VecDeque<Pending>,
        warnings: &mut RateLimited,
        paused_until: &mut Option<Instant>,
    ) -> Result<(), RdmaError> {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    // A requester whose machine vanishes (no FIN) is dropped within DEAD_PEER_BOUND.
                    let _ = crate::wire::keep_alive(&stream);
                    if pending.len() >= MAX_PENDING {
                        let oldest = pending.pop_front().expect("full");
                        warnings.warn(Warning::Crowded, || {
                            format!(
                                "{MAX_PENDING} control requests in progress; dropped the oldest, from {}",
                                oldest.peer
                            )
                        });
                    }
                    pending.push_back(Pending {
                        stream,
                        peer,
                        buf: Vec::new(),
                        deadline: Instant::now() + HANDSHAKE_DEADLINE,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if out_of_resources(&e) => {
                    // Room for the next one: drop the oldest control request, or pause accepting.
                    match pending.pop_front() {
                        Some(oldest) => warnings.warn(Warning::Resources, || {
                            format!("accept failed ({e}); dropped the oldest control request, from {}", oldest.peer)
                        }),
                        None => {
                            warnings.warn(Warning::Resources, || {
                                format!("accept failed ({e}); pausing accepts for {ACCEPT_BACKOFF:?}")
                            });
                            *paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                            return Ok(());
                        }
                    }
                }
                // Errors of one connection (it was reset before we took it, ...): skip it.
                Err(e) if is_per_connection(&e) => {}
                Err(e) => return Err(RdmaError::io("accepting clients", e)),
            }
        }
    }

    /// Counts `client` out of the connected ones if it was established; how many are left.
    fn left(&self, client: &Client) -> usize {
        if client.established {
            self.state.clients.fetch_sub(1, Ordering::SeqCst) - 1
        } else {
            self.state.clients.load(Ordering::SeqCst)
        }
    }

    /// Checks a complete control request: answered at once (the newest snapshot, the tenant's
    /// clients, an eviction), a job for the checkpoint thread, or refused. A tenant's token
    /// lists and evicts that tenant's clients only.
    fn control(
        &self,
        mut p: Pending,
        request: Result<Request, u16>,
        verifier: &mut Verifier,
        clients: &mut Clients,
        warnings: &mut RateLimited,
    ) -> Option<Job> {
        let peer = p.peer;
        let refusal = match request {
            Err(version) => Refusal::Other(format!(
                "protocol version {version} is not supported; this memory node speaks version {}",
                wire::VERSION
            )),
            // The address the request was sent to: its MAC covers it.
            Ok(r) => match p.stream.local_addr().map_err(|_| Refusal::Malformed).and_then(|at| {
                verifier.verify_control(&r.auth, at, &r.op.to_bytes(), SystemTime::now()).map_err(Refusal::from)
            }) {
                Err(refusal) => refusal,
                Ok(v) => match r.op {
                    Op::Clients { after } => {
                        let list = clients.of_tenant(v.tenant, after);
                        let _ = Answer::Clients(list).write_to(&mut p.stream);
                        return None;
                    }
                    Op::Evict { client } => match clients.evict(client, v.tenant) {
                        Some(gone) => {
                            let now = self.left(&gone);
                            tracing::info!(
                                "evicted client {client} ({}) of tenant {} at {peer}'s request: {}its queue pair \
                                 destroyed; {now} connected",
                                gone.peer,
                                self.state.tenants[v.tenant].name,
                                if self.state.windows == WindowSupport::Windows { "its key revoked, " } else { "" }
                            );
                            drop(gone);
                            let _ = Answer::Evicted { client }.write_to(&mut p.stream);
                            return None;
                        }
                        None => Refusal::Other(format!(
                            "no client {client} of tenant {} is connected",
                            self.state.tenants[v.tenant].name
                        )),
                    },
                    _ if self.state.checkpointer.is_none() => {
                        Refusal::Other("this memory node takes no checkpoints: start it with --checkpoint-dir".into())
                    }
                    _ if Some(v.tenant) != self.state.default_tenant => Refusal::Other(format!(
                        "checkpoints are of the default tenant's pool only, not tenant {}'s",
                        self.state.tenants[v.tenant].name
                    )),
                    Op::Checkpoint { seq, full } => {
                        return Some(Job { stream: p.stream, peer, take: Take { seq, full } });
                    }
                    Op::Newest => {
                        // Answered at once, even while a checkpoint is being written (a reply
                        // this small does not block on a fresh connection).
                        let seq = self.state.newest.load(Ordering::SeqCst);
                        let _ = Answer::Newest { node_id: self.state.config.node_id, seq }.write_to(&mut p.stream);
                        return None;
                    }
                },
            },
        };
        warnings.warn_from(Warning::Refused, Some(peer.ip()), wire::refusal_code(&refusal), || {
            format!("refused {peer}'s request: {refusal}")
        });
        let _ = Answer::Refused(refusal).write_to(&mut p.stream);
        None
    }

    /// Checks a connect request and, when it passes, creates a queue pair connected as the CM
    /// negotiated and accepts with the pool's descriptor and the MAC over the request's nonce;
    /// a refusal (or failure) is rejected with its reason and logged.
    fn admit(
        &self,
        mut id: CmId,
        event: &cm::Event,
        verifier: &mut Verifier,
        clients: &Clients,
        warnings: &mut RateLimited,
    ) -> Option<Client> {
        let state = &self.state;
        let source = id.peer_addr();
        let peer = source.map_or_else(|| "an unknown peer".to_owned(), |a| a.to_string());
        let source = source.map(|a| a.ip());
        // The address the request was sent to: its MAC covers it.
        let at = id.local_addr().ok_or(cm_auth::Refusal::Malformed);
        let verified = match at.and_then(|at| verifier.verify(event.private_data(), at, SystemTime::now())) {
            Ok(verified) => verified,
            Err(refusal) => {
                let code = refusal.code();
                warnings.warn_from(Warning::Refused, source, code, || format!("refused {peer}: {refusal}"));
                let _ = id.reject(&refusal.to_reject());
                return None;
            }
        };
        let tenant = &state.tenants[verified.tenant];
        if clients.count(verified.tenant) >= state.config.max_clients_per_tenant {
            warnings.warn_from(Warning::Crowded, source, 0, || {
                format!(
                    "refused {peer}: tenant {} holds {} connections, the most it may (--max-clients-per-tenant)",
                    tenant.name, state.config.max_clients_per_tenant
                )
            });
            let _ = id.reject(&cm_auth::Refusal::Busy.to_reject());
            return None;
        }
        let result = (|| {
            let windows = state.windows == WindowSupport::Windows;
            let (mut qp, limits) = queue_pair::create(&state.device, &tenant.pd, &state.cq, 1, windows)?;
            let access = AccessFlags::LocalWrite
                | AccessFlags::RemoteRead
                | AccessFlags::RemoteWrite
                | AccessFlags::RemoteAtomic;
            queue_pair::connect(&state.device, &mut qp, &limits, &id.negotiated()?, access)?;
            // A key of the connection's own, bound to its queue pair, or the pool's.
            let (window, rkey) = match state.windows {
                WindowSupport::Windows => {
                    let mut window = Window::alloc(&tenant.pd)?;
                    let rkey = window.bind(&mut qp, &state.cq, &tenant.pool)?;
                    (Some(window), rkey)
                }
                WindowSupport::RegionKey => (None, tenant.pool.rkey()),
            };
            let accept = cm_auth::Accept {
                node: state.config.node_id,
                base: tenant.pool.addr(),
                size: tenant.pool.len() as u64,
                rkey,
                page: tenant.pool.page_size().bytes().trailing_zeros() as u8,
            };
            let private = accept.to_bytes(verifier.token(verified.tenant), &verified.nonce);
            id.accept(qp.qp_number(), limits.read_atomic_depth, &private)?;
            Ok::<_, RdmaError>((window, qp))
        })();
        match result {
            Ok((window, qp)) => Some(Client {
                window,
                qp,
                id,
                peer,
                tenant: verified.tenant,
                established: false,
                since: Instant::now(),
            }),
            Err(e) => {
                warnings.warn_from(Warning::Refused, source, 0xff, || format!("cannot take {peer}: {e}"));
                let _ = id.reject(&cm_auth::Refusal::Busy.to_reject());
                None
            }
        }
    }
}

/// Checkpoint requests waiting for the checkpoint thread at most; past them, requests are
/// refused (each would hold a socket and cost a read of the whole pool).
pub const MAX_QUEUED_CHECKPOINTS: usize = 16;
/// How long a client has to establish its connection from its connect request, and a control
/// request to arrive whole from its connection's accept.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections (and, apart, control requests) in progress at most; past it, the oldest is
/// dropped for the newest.
pub const MAX_PENDING: usize = 256;
/// The RDMA-CM listener's backlog of connect requests not yet read.
const CM_BACKLOG: i32 = 1024;
/// How long accepting pauses when it runs out of descriptors and no control request can be
/// dropped.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The longest the serve loop sleeps in poll (how quickly it sees `stop`).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A control connection whose request is still coming.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
}

/// A checkpoint asked for over a control connection, waiting for the checkpoint thread.
struct Job {
    stream: TcpStream,
    peer: SocketAddr,
    take: Take,
}

/// What reading a control request's socket gave.
enum Progress {
    NeedMore,
    Closed,
    Done(Opening),
    Bad(std::io::Error),
}

impl Pending {
    /// Reads what is there (non-blocking) and parses the Hello once it is all in.
    fn read_more(&mut self) -> Progress {
        let mut chunk = [0u8; 2048];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Progress::Closed,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > 2 * wire::MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Closed,
            }
        }
        match Opening::read_from(&mut self.buf.as_slice()) {
            Ok(opening) => Progress::Done(opening),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && self.buf.len() <= wire::MAX_REQUEST => {
                Progress::NeedMore
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Progress::Bad(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "more bytes than a control request holds",
            )),
            Err(e) => Progress::Bad(e),
        }
    }
}

/// A client's connection: its window and queue pair live as long as its RDMA-CM connection
/// (the window is deallocated first, which revokes its key, then the queue pair is destroyed,
/// then the id, which disconnects).
struct Client {
    /// Its memory window (`None` on devices without them).
    window: Option<Window>,
    qp: ExtendedQueuePair,
    /// Held: destroying it ends the connection.
    id: CmId,
    peer: String,
    /// Its tenant's index.
    tenant: usize,
    established: bool,
    /// When its connect request came.
    since: Instant,
}

/// The node's client connections, by their RDMA-CM id.
#[derive(Default)]
struct Clients {
    by_id: HashMap<IdKey, Client>,
    /// Connections accepted and not yet established.
    in_progress: usize,
    /// Connections (established or not) per tenant.
    per_tenant: HashMap<usize, usize>,
}

impl Clients {
    /// Adds an accepted connection; past [`MAX_PENDING`] in progress, the oldest is dropped.
    fn add(&mut self, key: IdKey, client: Client, warnings: &mut RateLimited) {
        if self.in_progress >= MAX_PENDING {
            let oldest =
                self.by_id.iter().filter(|(_, c)| !c.established).min_by_key(|(_, c)| c.since).map(|(k, _)| *k);
            if let Some(old) = oldest.and_then(|k| self.remove(k)) {
                warnings.warn(Warning::Crowded, || {
                    format!("{MAX_PENDING} connections in progress; dropped the oldest, from {}", old.peer)
                });
            }
        }
        self.in_progress += 1;
        *self.per_tenant.entry(client.tenant).or_default() += 1;
        self.by_id.insert(key, client);
    }

    /// Tenant `tenant`'s connections (established or not).
    fn count(&self, tenant: usize) -> usize {
        self.per_tenant.get(&tenant).copied().unwrap_or(0)
    }

    /// Marks a connection established; `None` if it is not ours or was already.
    fn established(&mut self, key: IdKey) -> Option<&Client> {
        let client = self.by_id.get_mut(&key).filter(|c| !c.established)?;
        client.established = true;
        self.in_progress -= 1;
        Some(client)
    }

    fn remove(&mut self, key: IdKey) -> Option<Client> {
        let client = self.by_id.remove(&key)?;
        if !client.established {
            self.in_progress -= 1;
        }
        if let Some(n) = self.per_tenant.get_mut(&client.tenant) {
            *n -= 1;
        }
        Some(client)
    }

    /// Tenant `tenant`'s clients (established or not) with ids above `after`, by id, at most
    /// [`wire::CLIENTS_PER_ANSWER`].
    fn of_tenant(&self, tenant: usize, after: u32) -> Vec<ClientEntry> {
        let mut list: Vec<ClientEntry> = self
            .by_id
            .values()
            .filter(|c| c.tenant == tenant && c.qp.qp_number() > after)
            .map(|c| ClientEntry { id: c.qp.qp_number(), peer: c.peer.clone(), established: c.established })
            .collect();
        list.sort_by_key(|c| c.id);
        list.truncate(wire::CLIENTS_PER_ANSWER);
        list
    }

    /// Ends tenant `tenant`'s client `id` (its queue pair number on this node): disconnects it
    /// and hands it back to be dropped (which revokes its key). `None` if it has no such
    /// client.
    fn evict(&mut self, id: u32, tenant: usize) -> Option<Client> {
        let key = self.by_id.iter().find(|(_, c)| c.tenant == tenant && c.qp.qp_number() == id).map(|(k, _)| *k)?;
        let mut client = self.remove(key)?;
        // The window goes first: from here on its key opens nothing, even before the client
        // hears of the disconnect.
        client.window = None;
        client.id.disconnect();
        Some(client)
    }

    /// Drops the connections not established within [`HANDSHAKE_DEADLINE`] of their request.
    fn drop_late(&mut self, now: Instant, warnings: &mut RateLimited) {
        if self.in_progress == 0 {
            return;
        }
        let late: Vec<IdKey> = self
            .by_id
            .iter()
            .filter(|(_, c)| !c.established && now.duration_since(c.since) >= HANDSHAKE_DEADLINE)
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            if let Some(c) = self.remove(key) {
                warnings.warn(Warning::Deadline, || {
                    format!("connection from {} not established within {HANDSHAKE_DEADLINE:?}; dropped", c.peer)
                });
            }
        }
    }
}

/// accept(2) failed for want of descriptors or memory: the node is at a limit, not broken.
fn out_of_resources(e: &std::io::Error) -> bool {
    let raw = e.raw_os_error().map(rustix::io::Errno::from_raw_os_error);
    matches!(
        raw,
        Some(
            rustix::io::Errno::MFILE | rustix::io::Errno::NFILE | rustix::io::Errno::NOBUFS | rustix::io::Errno::NOMEM
        )
    )
}

/// accept(2) failed because of that one connection (see accept(2), "Error handling").
fn is_per_connection(e: &std::io::Error) -> bool {
    let raw = e.raw_os_error().map(rustix::io::Errno::from_raw_os_error);
    matches!(
        raw,
        Some(
            rustix::io::Errno::CONNABORTED
                | rustix::io::Errno::PROTO
                | rustix::io::Errno::PERM
                | rustix::io::Errno::NETDOWN
                | rustix::io::Errno::NOPROTOOPT
                | rustix::io::Errno::HOSTDOWN
                | rustix::io::Errno::NONET
                | rustix::io::Errno::HOSTUNREACH
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::NETUNREACH
                | rustix::io::Errno::TIMEDOUT
        )
    )
}

/// Kinds of warnings about peers, each rate-limited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Warning {
    Deadline,
    Crowded,
    Resources,
    Garbage,
    Refused,
}

/// How often one kind of warning, for one source and reason, is logged at most.
const WARNING_INTERVAL: Duration = Duration::from_secs(1);
/// Sources and reasons remembered at most; past them, warnings of a kind share one limit.
const WARNING_SOURCES: usize = 4096;

/// The part of an address a warning is limited by: an IPv4 address whole, an IPv6 address's
/// /64 (one host may hold all of one).
fn source_prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)))
        }
        other => other,
    }
}

/// Who a warning is about and why: a kind, the peer's address (`None`: not known, or the
/// shared limit) and a reason (a refusal's code; 0 for the others).
type WarningKey = (Warning, Option<IpAddr>, u8);

/// At most one warning a second per kind, source and reason: a flood from one peer does not
/// hide another's, and a flood of one reason does not hide another. The others are counted,
/// and the count is logged with the next one of the same key. At most [`WARNING_SOURCES`] keys
/// are remembered (those quiet for a second are forgotten first, their counts carried to the
/// kind's shared key), so a flood from many addresses costs bounded memory.
#[derive(Default)]
struct RateLimited {
    /// Per key: when it was last logged, and how many were suppressed since.
    keys: HashMap<WarningKey, (Option<Instant>, u64)>,
    /// When quiet keys were last forgotten.
    swept: Option<Instant>,
}

impl RateLimited {
    /// A warning not about one peer and reason.
    fn warn(&mut self, kind: Warning, message: impl FnOnce() -> String) {
        let _ = self.warn_from(kind, None, 0, message);
    }

    /// A warning about `source`, for `reason`; true if it was logged (not suppressed).
    fn warn_from(
        &mut self,
        kind: Warning,
        source: Option<IpAddr>,
        reason: u8,
        message: impl FnOnce() -> String,
    ) -> bool {
        self.warn_at(Instant::now(), (kind, source.map(source_prefix), reason), message)
    }

    /// [`RateLimited::warn_from`] at `now`.
    fn warn_at(&mut self, now: Instant, key: WarningKey, message: impl FnOnce() -> String) -> bool {
        let (kind, mut key) = (key.0, key);
        if !self.keys.contains_key(&key) && self.keys.len() >= WARNING_SOURCES {
            // At most one sweep a second: a flood from new addresses costs no sweep each.
            if self.swept.is_none_or(|t| now.duration_since(t) >= WARNING_INTERVAL) {
                self.swept = Some(now);
                self.forget_quiet(now);
            }
            if self.keys.len() >= WARNING_SOURCES {
                key = (kind, None, 0);
            }
        }
        let (last, suppressed) = self.keys.entry(key).or_insert((None, 0));
        if last.is_some_and(|t| now.duration_since(t) < WARNING_INTERVAL) {
            *suppressed += 1;
            return false;
        }
        *last = Some(now);
        match std::mem::take(suppressed) {
            0 => tracing::warn!("{}", message()),
            n => tracing::warn!("{} ({n} more like it not shown)", message()),
        }
        true
    }

    /// Forgets the keys quiet for [`WARNING_INTERVAL`], carrying their suppressed counts to
    /// their kind's shared key.
    fn forget_quiet(&mut self, now: Instant) {
        let mut carried: Vec<(Warning, u64)> = Vec::new();
        self.keys.retain(|&(kind, source, _), (last, suppressed)| {
            let quiet = last.is_none_or(|t| now.duration_since(t) >= WARNING_INTERVAL) && source.is_some();
            if quiet && *suppressed > 0 {
                carried.push((kind, *suppressed));
            }
            !quiet
        });
        for (kind, n) in carried {
            self.keys.entry((kind, None, 0)).or_insert((None, 0)).1 += n;
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.keys.len()
    }
}

/// Loads the snapshot `from` names into `pool`, saying what it skipped.
fn restore(from: &RestoreConfig, pool: &mut [u8]) -> Result<rdmem_checkpoint::Restored, RdmaError> {
    let restored = rdmem_checkpoint::restore(&from.dir, pool, from.seq)?;
    for s in &restored.skipped {
        tracing::warn!("snapshot {} skipped: {}", s.seq, s.reason);
    }
    tracing::info!(
        "restored snapshot {} from {} (chain {:?}): {} bytes read in {:.3} s",
        restored.seq,
        from.dir.display(),
        restored.chain,
        restored.bytes_read,
        restored.duration.as_secs_f64()
    );
    Ok(restored)
}

/// Raises this process's soft limit of open files to the hard limit (the node holds a socket
/// per control request, and librdmacm one per client id); logs what it could not do.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("cannot raise the open files limit from {:?}: {e}", limit.current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn warnings_are_limited_per_source_and_reason() {
        let mut w = RateLimited::default();
        let mut logged = 0;
        let mut log = |w: &mut RateLimited, source, reason| {
            logged += w.warn_from(Warning::Refused, source, reason, String::new) as u32;
        };
        // A flood from one source and reason logs once a second...
        for _ in 0..1000 {
            log(&mut w, ip(1), 4);
        }
        // ... and hides neither another source nor another reason of the same source.
        log(&mut w, ip(2), 4);
        log(&mut w, ip(1), 6);
        log(&mut w, None, 0);
        assert_eq!(logged, 4);
        assert_eq!(w.keys[&(Warning::Refused, ip(1), 4)].1, 999, "the rest are counted");
    }

    #[test]
    fn an_ipv6_flood_from_one_prefix_counts_as_one_source() {
        let mut w = RateLimited::default();
        let mut logged = 0;
        for i in 0..1000u128 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | i));
            logged += w.warn_from(Warning::Garbage, Some(ip), 0, String::new) as u32;
        }
        assert_eq!(logged, 1);
        assert_eq!(w.remembered(), 1);
    }

    #[test]
    fn a_flood_from_many_sources_costs_bounded_memory() {
        let mut w = RateLimited::default();
        let start = Instant::now();
        let flood = |w: &mut RateLimited, now: Instant, from: u32| {
            let mut logged = 0u32;
            for i in from..from + WARNING_SOURCES as u32 * 3 {
                let source = Some(IpAddr::from(i.to_be_bytes()));
                logged += w.warn_at(now, (Warning::Garbage, source, 0), String::new) as u32;
            }
            logged
        };
        let logged = flood(&mut w, start, 0);
        assert!(w.remembered() <= WARNING_SOURCES + 1, "{}", w.remembered());
        // The first WARNING_SOURCES sources are logged; the rest (none quiet for a second yet)
        // share the kind's limit: one more line, the others counted there.
        assert_eq!(logged, WARNING_SOURCES as u32 + 1);
        assert_eq!(w.keys[&(Warning::Garbage, None, 0)].1, WARNING_SOURCES as u64 * 2 - 1);
        // A second later the quiet sources are forgotten, and new ones are logged again.
        let logged = flood(&mut w, start + WARNING_INTERVAL, 1 << 20);
        assert!(w.remembered() <= WARNING_SOURCES + 1, "{}", w.remembered());
        // (The shared key keeps its slot: one source fewer, then the shared line with the
        // count carried from the first flood.)
        assert_eq!(logged, WARNING_SOURCES as u32);
        assert_eq!(w.keys[&(Warning::Garbage, None, 0)].1, WARNING_SOURCES as u64 * 2);
    }
}
