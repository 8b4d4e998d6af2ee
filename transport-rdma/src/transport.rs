//! The RDMA [`Transport`]: per-thread endpoints of RC queue pairs to every memory node.
//!
//! One [`RdmaTransport`] per process holds the device and protection domain. Each
//! [`RdmaEndpoint`] (one per thread) owns one completion queue, one queue pair per memory node,
//! and registered staging memory for copied transfers and atomics' results. Nothing on the data
//! path is shared between threads, locked or allocated.
//!
//! # The data path ([`Endpoint::execute`])
//! 1. Validate every operation (node, range, alignment, length) before posting anything.
//! 2. Cut the batch into rounds that fit the staging memory and each send queue.
//! 3. Per node, post the round's requests as one linked list with one `ibv_post_send` (one
//!    doorbell), only the last one signaled. Writes of unregistered memory up to the queue pair's
//!    inline limit go inline; other unregistered memory is copied through staging.
//! 4. Poll the completion queue (`ibv_poll_cq` directly, into a preallocated array) until every
//!    node's signaled request completed. On RC, its completion means every earlier request of
//!    that queue pair completed too.
//! 5. Copy staged READ data and atomics' old values out.
//!
//! A failed completion marks that node's queue pair broken (it is in the error state) and is
//! reported as [`Error::Completion`] naming the operation and the remote address; the queue pair
//! flushes the rest. A node that dies shows up as "retry counter exceeded" within seconds.

use std::net::{TcpStream, ToSocketAddrs};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    atomic_t, ibv_poll_cq, ibv_post_send, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wr_opcode, rdma_t,
};
use rdmem_core::{ClusterConfig, Endpoint, Error, LocalBuffer, NodeId, NodeInfo, Op, Result, Transport};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionQueue, GenericCompletionQueue, WorkCompletionStatus,
};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{ExtendedQueuePair, QueuePair};
use smallvec::SmallVec;

use crate::device::{Device, DeviceSelection};
use crate::error::RdmaError;
use crate::memory::{PageSize, Region};
use crate::queue_pair::{self, QpLimits};
use crate::wire::{self, Hello, Reply};

/// The longest single transfer (the verbs limit for one scatter/gather entry is 2^31 bytes).
const MAX_TRANSFER: u64 = 1 << 31;
/// Send queue depth per queue pair; a round never posts more to one node.
const SEND_DEPTH: u32 = 256;
/// Staging memory an endpoint starts with; it grows (once) for larger copied transfers.
const STAGING_BYTES: usize = 256 * 1024;
/// Completions taken per `ibv_poll_cq` call.
const POLL_BATCH: usize = 16;
/// A round whose completions have not all arrived after this long fails (the device reports a
/// dead peer much sooner, through its retry counter; this only turns a lost completion into an
/// error instead of a hang).
const COMPLETION_DEADLINE: Duration = Duration::from_secs(60);
/// Handshake socket timeouts.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of an [`RdmaTransport`].
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Memory nodes as `host:port`, in order.
    pub memnodes: Vec<String>,
    /// The shared token the memory nodes ask for.
    pub token: String,
    /// Which device, port and GID to use.
    pub device: DeviceSelection,
}

impl RdmaOptions {
    /// Options from a cluster configuration (memory nodes, token, device).
    pub fn from_config(config: &ClusterConfig) -> Result<Self> {
        Ok(RdmaOptions {
            memnodes: config.memnode_addrs()?,
            token: config.resolve_token()?,
            device: DeviceSelection {
                name: config.device.name.clone(),
                port: config.device.port,
                gid_index: config.device.gid_index,
            },
        })
    }
}

struct Shared {
    options: RdmaOptions,
    device: Device,
    pd: Arc<ProtectionDomain>,
    nodes: Vec<NodeInfo>,
}

/// A process's RDMA connection to a cluster of memory nodes. Cheap to share (`Arc` inside).
pub struct RdmaTransport {
    shared: Arc<Shared>,
    /// The endpoint built while learning the nodes, handed out by the first `endpoint()` call.
    first: Mutex<Option<RdmaEndpoint>>,
}

impl RdmaTransport {
    /// Opens the device, connects to every memory node once (to learn node ids and pool sizes;
    /// that connection becomes the first endpoint), and checks the nodes are distinct.
    pub fn connect(options: RdmaOptions) -> Result<Self> {
        if options.memnodes.is_empty() {
            return Err(Error::Config("no memory nodes given".into()));
        }
        let device = Device::open(&options.device).map_err(RdmaError::from)?;
        let pd = device.context().alloc_pd().map_err(|e| RdmaError::verbs("ibv_alloc_pd", e))?;
        let mut shared = Shared { options, device, pd, nodes: Vec::new() };
        let (cq, conns) = connect_all(&shared)?;
        for (i, conn) in conns.iter().enumerate() {
            if let Some(dup) = conns[..i].iter().find(|c| c.node.id == conn.node.id) {
                return Err(Error::Config(format!(
                    "memory nodes {} and {} both say they are {}; give each its own --node-id",
                    dup.peer, conn.peer, conn.node.id
                )));
            }
        }
        shared.nodes = conns.iter().map(|c| c.node).collect();
        let shared = Arc::new(shared);
        let first = RdmaEndpoint::with_connections(Arc::clone(&shared), cq, conns)?;
        Ok(RdmaTransport { shared, first: Mutex::new(Some(first)) })
    }

    /// Connects with the configuration from `RDMEM_CONFIG`/the environment.
    pub fn from_env() -> Result<Self> {
        Self::connect(RdmaOptions::from_config(&ClusterConfig::load(None)?)?)
    }

    /// The device in use.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }
}

impl Transport for RdmaTransport {
    type Endpoint = RdmaEndpoint;

    fn endpoint(&self) -> Result<RdmaEndpoint> {
        if let Some(first) = self.first.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Ok(first);
        }
        let (cq, conns) = connect_all(&self.shared)?;
        for (conn, known) in conns.iter().zip(&self.shared.nodes) {
            if conn.node != *known {
                return Err(Error::Connect {
                    peer: conn.peer.clone(),
                    reason: format!("the node changed: it was {known:?}, it is now {:?} (restarted?)", conn.node),
                });
            }
        }
        RdmaEndpoint::with_connections(Arc::clone(&self.shared), cq, conns)
    }

    fn nodes(&self) -> &[NodeInfo] {
        &self.shared.nodes
    }
}

/// One queue pair to one memory node.
struct Connection {
    node: NodeInfo,
    peer: String,
    pool_base: u64,
    rkey: u32,
    qp: ExtendedQueuePair,
    limits: QpLimits,
    broken: bool,
    /// Open for the life of the queue pair: the node drops its queue pair when this closes, and
    /// this end sees EOF when the node's process dies (non-blocking, peeked while waiting).
    control: TcpStream,
}

fn connect_all(shared: &Shared) -> Result<(Arc<BasicCompletionQueue>, Vec<Connection>)> {
    let mut builder = shared.device.context().create_cq_builder();
    builder.setup_cqe(SEND_DEPTH * shared.options.memnodes.len() as u32 + 16);
    let cq = builder.build().map_err(|e| RdmaError::verbs("ibv_create_cq", e))?;
    let generic = GenericCompletionQueue::from(Arc::clone(&cq));
    let conns =
        shared.options.memnodes.iter().map(|peer| connect_one(shared, &generic, peer)).collect::<Result<_>>()?;
    Ok((cq, conns))
}

/// Creates a queue pair, does the handshake with the node at `peer`, and connects the pair.
fn connect_one(shared: &Shared, cq: &GenericCompletionQueue, peer: &str) -> Result<Connection> {
    let fail = |reason: String| Error::Connect { peer: peer.to_owned(), reason };
    let (mut qp, limits) = queue_pair::create(&shared.device, &shared.pd, cq, SEND_DEPTH)?;
    let psn = queue_pair::random_psn(qp.qp_number());
    let addr = peer
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| fail("resolves to no address".into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)
        .map_err(|e| fail(format!("{e} (is rdmem-memnode running there?)")))?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| fail(e.to_string()))?;
    let hello = Hello {
        version: wire::VERSION,
        token: shared.options.token.as_bytes().to_vec(),
        qp: queue_pair::local_info(&shared.device, &qp, psn),
    };
    hello.write_to(&mut stream).map_err(|e| fail(format!("handshake: {e}")))?;
    let welcome = match Reply::read_from(&mut stream).map_err(|e| fail(format!("handshake: {e}")))? {
        Reply::Welcome(w) => w,
        Reply::Refused(reason) => return Err(Error::Refused { peer: peer.to_owned(), reason }),
    };
    queue_pair::connect(&shared.device, &mut qp, &limits, psn, &welcome.qp, AccessFlags::LocalWrite)?;
    // From now on the socket is only watched: closed means the node is gone (see wait_round).
    stream.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
    Ok(Connection {
        node: NodeInfo { id: NodeId(welcome.node_id), pool_size: welcome.pool_size },
        peer: peer.to_owned(),
        pool_base: welcome.pool_base,
        rkey: welcome.rkey,
        qp,
        limits,
        broken: false,
        control: stream,
    })
}

/// Registered local memory of an [`RdmaEndpoint`].
pub struct RdmaBuffer {
    region: Region,
    len: usize,
}

impl Deref for RdmaBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.region.as_slice()[..self.len]
    }
}

impl DerefMut for RdmaBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.region.as_mut_slice()[..self.len]
    }
}

impl LocalBuffer for RdmaBuffer {
    fn key(&self) -> u32 {
        self.region.lkey()
    }
}

/// Where an operation's local side lives for the round it is posted in.
#[derive(Clone, Copy)]
enum LocalSide {
    /// Nothing to post (zero-length transfer).
    Skip,
    /// Bytes sent inline with the request.
    Inline,
    /// User memory registered with `lkey`.
    Registered { addr: u64, lkey: u32 },
    /// Staging memory at this offset.
    Staged { offset: usize },
}

/// One thread's queue pairs to every memory node. See the module docs for the data path.
pub struct RdmaEndpoint {
    // Queue pairs go before the completion queue they use (fields drop in order).
    conns: Vec<Connection>,
    cq: Arc<BasicCompletionQueue>,
    staging: Region,
    shared: Arc<Shared>,
    /// Per operation of the current round: where its local side is. Reused, never shrunk.
    sides: Vec<LocalSide>,
    /// Per connection: the wr_id of its last (signaled) request this round, if any.
    last_wr: Vec<Option<u64>>,
    /// Per connection: requests planned into the current round.
    round_counts: Vec<u32>,
    wcs: Box<[ibv_wc; POLL_BATCH]>,
}

impl RdmaEndpoint {
    fn with_connections(shared: Arc<Shared>, cq: Arc<BasicCompletionQueue>, conns: Vec<Connection>) -> Result<Self> {
        let staging = Region::new(&shared.pd, STAGING_BYTES, PageSize::Normal, AccessFlags::LocalWrite)
            .map_err(RdmaError::from)?;
        let n = conns.len();
        Ok(RdmaEndpoint {
            conns,
            cq,
            staging,
            shared,
            sides: Vec::with_capacity(64),
            last_wr: vec![None; n],
            round_counts: vec![0; n],
            // SAFETY: ibv_wc is a plain C struct of integers; all-zero is a valid value.
            wcs: Box::new(unsafe { std::mem::zeroed() }),
        })
    }

    fn conn_index(&self, node: NodeId) -> usize {
        // validate() already checked the node exists; few nodes, so a scan is cheapest.
        self.conns.iter().position(|c| c.node.id == node).expect("validated node")
    }

    /// Staging bytes operation `op` needs (8-aligned), given the queue pair's inline limit.
    fn staging_need(op: &Op<'_>, max_inline: u32) -> usize {
        match op {
            Op::Read { key: None, local, .. } => local.len().next_multiple_of(8),
            Op::Write { key: None, local, .. } if local.len() > max_inline as usize => local.len().next_multiple_of(8),
            Op::CompareSwap { .. } | Op::FetchAdd { .. } => 8,
            _ => 0,
        }
    }

    /// Replaces the staging memory with a bigger one (a transfer larger than it was copied).
    fn grow_staging(&mut self, need: usize) -> Result<()> {
        let len = need.next_power_of_two().max(STAGING_BYTES);
        let page = if len >= PageSize::Huge2M.bytes() { PageSize::Huge2M } else { PageSize::Normal };
        self.staging = Region::new(&self.shared.pd, len, page, AccessFlags::LocalWrite).map_err(RdmaError::from)?;
        Ok(())
    }

    /// Plans ops[start..] into one round that fits the staging memory and every send queue;
    /// returns its end. Fills `self.sides`.
    fn plan_round(&mut self, ops: &[Op<'_>], start: usize) -> Result<usize> {
        self.sides.clear();
        self.round_counts.iter_mut().for_each(|n| *n = 0);
        let mut used = 0usize;
        let mut end = start;
        while end < ops.len() {
            let op = &ops[end];
            let conn = self.conn_index(op.remote().node());
            let limits = self.conns[conn].limits;
            let need = Self::staging_need(op, limits.max_inline);
            if end == start && need > self.staging.len() {
                self.grow_staging(need)?;
            }
            if used + need > self.staging.len() || self.round_counts[conn] >= limits.send_depth {
                break;
            }
            let side = match op {
                Op::Read { .. } | Op::Write { .. } if op.is_empty() => LocalSide::Skip,
                Op::Read { local, key: Some(lkey), .. } => {
                    LocalSide::Registered { addr: local.as_ptr() as u64, lkey: *lkey }
                }
                Op::Write { local, key: Some(lkey), .. } => {
                    LocalSide::Registered { addr: local.as_ptr() as u64, lkey: *lkey }
                }
                Op::Write { key: None, .. } if need == 0 => LocalSide::Inline,
                _ => LocalSide::Staged { offset: used },
            };
            if !matches!(side, LocalSide::Skip) {
                self.round_counts[conn] += 1;
            }
            self.sides.push(side);
            used += need;
            end += 1;
        }
        Ok(end)
    }
}

impl Endpoint for RdmaEndpoint {
    type Buffer = RdmaBuffer;

    fn buffer(&mut self, len: usize) -> Result<RdmaBuffer> {
        let page = if len >= PageSize::Huge2M.bytes() { PageSize::Huge2M } else { PageSize::Normal };
        let region =
            Region::new(&self.shared.pd, len.max(1), page, AccessFlags::LocalWrite).map_err(RdmaError::from)?;
        Ok(RdmaBuffer { region, len })
    }

    fn nodes(&self) -> &[NodeInfo] {
        &self.shared.nodes
    }

    fn execute(&mut self, ops: &mut [Op<'_>]) -> Result<()> {
        // Refuse the whole batch before posting anything: bad arguments, or a broken node.
        for op in ops.iter() {
            op.validate(&self.shared.nodes, MAX_TRANSFER)?;
            let conn = &self.conns[self.conn_index(op.remote().node())];
            if conn.broken {
                return Err(Error::Broken { node: conn.node.id });
            }
        }
        let mut start = 0;
        while start < ops.len() {
            let end = self.plan_round(ops, start)?;
            self.run_round(&mut ops[start..end])?;
            start = end;
        }
        Ok(())
    }
}

impl RdmaEndpoint {
    /// Posts one planned round (one doorbell per node), waits for it, copies results out.
    fn run_round(&mut self, ops: &mut [Op<'_>]) -> Result<()> {
        self.last_wr.iter_mut().for_each(|w| *w = None);
        // Stage outgoing copies first.
        let staging_addr = self.staging.addr();
        for (op, side) in ops.iter().zip(&self.sides) {
            if let (Op::Write { local, .. }, LocalSide::Staged { offset }) = (op, side) {
                self.staging.as_mut_slice()[*offset..*offset + local.len()].copy_from_slice(local);
            }
        }
        let staging_lkey = self.staging.lkey();
        let mut post_error = None;
        for c in 0..self.conns.len() {
            let node = self.conns[c].node.id;
            let Some(last) = (0..ops.len())
                .rev()
                .find(|&i| ops[i].remote().node() == node && !matches!(self.sides[i], LocalSide::Skip))
            else {
                continue;
            };
            let conn = &mut self.conns[c];
            let (base, rkey) = (conn.pool_base, conn.rkey);
            // This node's requests as a linked list, on the stack up to 64: one ibv_post_send,
            // one doorbell, and one indirect call for the lot (perftest's way), where the
            // ibv_wr_* API costs four per request.
            let mut wrs: SmallVec<[ibv_send_wr; 64]> = SmallVec::new();
            let mut sges: SmallVec<[ibv_sge; 64]> = SmallVec::new();
            for (i, (op, &side)) in ops.iter().zip(&self.sides).enumerate().take(last + 1) {
                if op.remote().node() != node || matches!(side, LocalSide::Skip) {
                    continue;
                }
                let remote = base + op.remote().offset();
                let (addr, lkey) = match (op, side) {
                    (_, LocalSide::Registered { addr, lkey }) => (addr, lkey),
                    (_, LocalSide::Staged { offset }) => (staging_addr + offset as u64, staging_lkey),
                    // Inline: the device copies the bytes at post time; no key is needed.
                    (Op::Write { local, .. }, LocalSide::Inline) => (local.as_ptr() as u64, 0),
                    _ => unreachable!("only writes go inline; skipped ops are not posted"),
                };
                let mut flags = if i == last { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
                // SAFETY: ibv_send_wr is a plain C struct; all-zero is its "empty" value.
                let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
                wr.wr_id = i as u64;
                wr.num_sge = 1;
                match op {
                    Op::Read { .. } => {
                        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                        wr.wr.rdma = rdma_t { remote_addr: remote, rkey };
                    }
                    Op::Write { .. } => {
                        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                        wr.wr.rdma = rdma_t { remote_addr: remote, rkey };
                        if matches!(side, LocalSide::Inline) {
                            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
                        }
                    }
                    Op::CompareSwap { expected, new, .. } => {
                        wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                        wr.wr.atomic = atomic_t { remote_addr: remote, compare_add: *expected, swap: *new, rkey };
                    }
                    Op::FetchAdd { add, .. } => {
                        wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                        wr.wr.atomic = atomic_t { remote_addr: remote, compare_add: *add, swap: 0, rkey };
                    }
                }
                wr.send_flags = flags;
                wrs.push(wr);
                sges.push(ibv_sge { addr, length: op.len() as u32, lkey });
            }
            // Link them now that neither vector moves any more.
            let (wr_ptr, sge_ptr) = (wrs.as_mut_ptr(), sges.as_mut_ptr());
            for k in 0..wrs.len() {
                // SAFETY: k and k + 1 index the vectors (k + 1 only when in bounds); both stay
                // in place until ibv_post_send returns, which copies the requests.
                unsafe {
                    (*wr_ptr.add(k)).sg_list = sge_ptr.add(k);
                    (*wr_ptr.add(k)).next = if k + 1 < wrs.len() { wr_ptr.add(k + 1) } else { std::ptr::null_mut() };
                }
            }
            let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
            // SAFETY: the queue pair is alive (owned by `conn`); the list is well formed
            // (above); its local memory is registered and borrowed by `ops` or owned by this
            // endpoint until this function returns, after the round's last completion.
            let rc = unsafe { ibv_post_send(conn.qp.qp().as_ptr(), wr_ptr, &mut bad) };
            if rc != 0 {
                // Requests before the bad one may be in flight with nothing signaled: the error
                // state stops the device touching their memory. Other nodes' requests of this
                // round are waited for below before the error is returned.
                queue_pair::set_error(&mut conn.qp);
                conn.broken = true;
                post_error.get_or_insert(Error::Completion {
                    op: ops[last].kind(),
                    addr: ops[last].remote(),
                    status: format!("ibv_post_send failed: {}", std::io::Error::from_raw_os_error(rc)),
                });
                break;
            }
            self.last_wr[c] = Some(last as u64);
        }
        let waited = self.wait_round(ops);
        if let Some(e) = post_error {
            return Err(e);
        }
        waited?;
        // Copy staged results out.
        for (op, side) in ops.iter_mut().zip(&self.sides) {
            let LocalSide::Staged { offset } = *side else { continue };
            let staged = &self.staging.as_slice()[offset..];
            match op {
                Op::Read { local, .. } => local.copy_from_slice(&staged[..local.len()]),
                Op::CompareSwap { old, .. } | Op::FetchAdd { old, .. } => {
                    **old = u64::from_ne_bytes(staged[..8].try_into().expect("8 bytes"));
                }
                Op::Write { .. } => {}
            }
        }
        Ok(())
    }

    /// Polls until every connection's last request of the round completed; reports the first
    /// failed request (a flush caused by an earlier failure is not the cause, so it ranks last).
    fn wait_round(&mut self, ops: &[Op<'_>]) -> Result<()> {
        let mut pending = self.last_wr.iter().filter(|w| w.is_some()).count();
        let mut failure: Option<(u64, u32, u32)> = None; // wr_id, status, vendor error
        let mut spins = 0u32;
        let mut deadline: Option<Instant> = None;
        // SAFETY: the pointer is used only in this function, while `self.cq` (an Arc) keeps the
        // completion queue alive.
        let cq = unsafe { self.cq.cq() };
        while pending > 0 {
            // SAFETY: `cq` is a live completion queue (above) and `self.wcs` has room for
            // POLL_BATCH completions, the most ibv_poll_cq writes.
            let n = unsafe { ibv_poll_cq(cq.as_ptr(), POLL_BATCH as i32, self.wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(RdmaError::verbs("ibv_poll_cq", std::io::Error::from_raw_os_error(-n)).into());
            }
            for wc in &self.wcs[..n as usize] {
                // Completions carry the wr_id (the op index); the connection is found by QP
                // number. Completions of queue pairs not in this round are stale (flushes of
                // an abandoned round) and ignored.
                let Some(c) = self.conns.iter().position(|c| c.qp.qp_number() == wc.qp_num) else { continue };
                if self.round_counts[c] == 0 {
                    continue;
                }
                if wc.status != WorkCompletionStatus::Success as u32 {
                    self.conns[c].broken = true;
                    let flushed = wc.status == WorkCompletionStatus::WorkRequestFlushedError as u32;
                    let better = match failure {
                        None => true,
                        Some((_, s, _)) => s == WorkCompletionStatus::WorkRequestFlushedError as u32 && !flushed,
                    };
                    if better {
                        failure = Some((wc.wr_id, wc.status, wc.vendor_err));
                    }
                }
                if self.last_wr[c] == Some(wc.wr_id) {
                    self.last_wr[c] = None;
                    pending -= 1;
                }
            }
            if n == 0 {
                spins = spins.wrapping_add(1);
                // Every 4096 empty polls (a few ms; a clock read or a syscall costs about 1 us in
                // the VM): is a waited-on node's control socket closed, or the deadline past?
                if spins % 4096 == 0 {
                    if let Some(c) = self.dead_node() {
                        let reason =
                            format!("memory node at {} closed its connection (stopped or died)", self.conns[c].peer);
                        return Err(self.abandon_round(ops, reason));
                    }
                    let now = Instant::now();
                    let limit = *deadline.get_or_insert(now + COMPLETION_DEADLINE);
                    if now > limit {
                        let reason = format!("no completion within {} s", COMPLETION_DEADLINE.as_secs());
                        return Err(self.abandon_round(ops, reason));
                    }
                }
            }
        }
        match failure {
            None => Ok(()),
            Some((wr_id, status, vendor)) => {
                let op = &ops[wr_id as usize];
                Err(Error::Completion {
                    op: op.kind(),
                    addr: op.remote(),
                    status: format!(
                        "{:?} (status {status}, vendor error {vendor:#x})",
                        WorkCompletionStatus::from(status)
                    ),
                })
            }
        }
    }

    /// The first connection still waited on whose control socket is closed.
    fn dead_node(&self) -> Option<usize> {
        let mut byte = [0u8; 1];
        (0..self.conns.len()).find(|&c| {
            self.last_wr[c].is_some()
                && match self.conns[c].control.peek(&mut byte) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::Interrupted,
                }
        })
    }

    /// A round whose completions will not come: move the queue pairs still waited on to the
    /// error state (the device stops touching their memory and flushes them), then fail.
    fn abandon_round(&mut self, ops: &[Op<'_>], reason: String) -> Error {
        let mut first = None;
        for (c, last) in self.last_wr.iter().enumerate() {
            if let Some(wr) = last {
                queue_pair::set_error(&mut self.conns[c].qp);
                self.conns[c].broken = true;
                first.get_or_insert(*wr as usize);
            }
        }
        let op = &ops[first.unwrap_or(0)];
        Error::Completion { op: op.kind(), addr: op.remote(), status: reason }
    }
}
