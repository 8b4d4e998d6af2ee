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
//! A lone operation (a batch of one: `read`, `faa`, `cas`, ...) skips the rounds: it is
//! validated in the same pass that finds its connection, its request is built on the stack,
//! and its completion is checked where it is polled (its own success, alone in the poll). Any
//! other poll (a failure, completions of other requests, a long wait) goes to the round's wait
//! with what was polled, so failures are handled the same way.
//!
//! # Write-behind ([`Endpoint::post_write`])
//! One unsignaled WRITE, posted at once and not waited for: inline when it fits, else copied
//! into a write-behind area of its own. It still holds a send queue slot (and its bytes their
//! place in that area) until a later signaled request of the same queue pair completes, which
//! confirms it (RC completes in order): the next round to that node, or [`Endpoint::flush`]. So
//! rounds leave those slots free, and a write-behind that would find no room flushes first.
//! An unsignaled request that fails still produces a completion; it is kept on its connection
//! and reported by the next operation to that node.
//!
//! # The async face ([`rdmem_core::aio::Submit`], in `transport/aio.rs`)
//! Slots of registered memory owned by the endpoint; each doorbell posts one node's queued
//! requests as one list with only the last signaled; completions are routed back by `wr_id`
//! (slot and generation); the completion queue has a completion channel that an idle driver
//! sleeps on.
//!
//! A failed completion marks that node's queue pair broken (it is in the error state) and is
//! reported as [`Error::Completion`] naming the operation and the remote address; the queue pair
//! flushes the rest. A node that dies shows up as "retry counter exceeded" within seconds.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    atomic_t, ibv_poll_cq, ibv_post_send, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wr_opcode, rdma_t,
};
use rdmem_core::{
    ClusterConfig, Endpoint, Error, GlobalAddr, LocalBuffer, NodeId, NodeInfo, Op, OpKind, Result, Transport, WcStatus,
};
use sideway::ibverbs::AccessFlags;
use std::os::fd::AsRawFd;

use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, GenericCompletionQueue, WorkCompletionStatus,
};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{ExtendedQueuePair, QueuePair};
use smallvec::SmallVec;

use crate::cm::{self, CmId, EventChannel};
use crate::cm_auth;
use crate::device::{Device, DeviceSelection};
use crate::error::RdmaError;
use crate::memory::{PageSize, Region};
use crate::queue_pair::{self, QpLimits};

mod aio;

/// The longest single transfer (the verbs limit for one scatter/gather entry is 2^31 bytes).
const MAX_TRANSFER: u64 = 1 << 31;
/// Send queue depth per queue pair; a round never posts more to one node.
const SEND_DEPTH: u32 = 256;
/// Staging memory an endpoint starts with; it grows (once) for larger copied transfers.
const STAGING_BYTES: usize = 256 * 1024;
/// The write-behind area: copies of posted writes too long to go inline, until confirmed.
/// Longer writes are not posted behind but written and waited for.
const BEHIND_BYTES: usize = 64 * 1024;
/// The wr_id bit of write-behind requests (round requests use their op index); the rest is the
/// write-behind's sequence number on its connection.
const BEHIND_TAG: u64 = 1 << 63;
/// Completions taken per `ibv_poll_cq` call.
const POLL_BATCH: usize = 16;
/// Empty polls between two looks for a stall (a dead node, the deadline) while waiting: a few
/// ms, where a clock read or a syscall costs about 1 us in the VM. A lone operation spins this
/// many before it waits as a round does ([`RdmaEndpoint::wait_single`]).
const STALL_CHECK_POLLS: u32 = 4096;
/// A round whose completions have not all arrived after this long fails (the device reports a
/// dead peer much sooner, through its retry counter; this only turns a lost completion into an
/// error instead of a hang).
const COMPLETION_DEADLINE: Duration = Duration::from_secs(60);
/// How long connection setup with one node may take, from address resolution to established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long RDMA-CM may take to resolve a node's address, and then its route.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of an [`RdmaTransport`]. `Default` gives no memory nodes, an empty token, the
/// default tenant and a device picked automatically: fill in `memnodes` and `token`.
#[derive(Clone, Default)]
pub struct RdmaOptions {
    /// Memory nodes as `host:port`, in order.
    pub memnodes: Vec<String>,
    /// The tenant's token the memory nodes ask for (at least 16 bytes; it never crosses the
    /// wire, only MACs made with it).
    pub token: String,
    /// The tenant whose pools to use on every node (`--tenant` of `rdmem-memnode`); empty:
    /// the nodes' default pools ([`cm_auth::DEFAULT_TENANT`]). Each tenant has its own pools,
    /// protection domains and token: a client of one cannot reach another's memory.
    pub tenant: String,
    /// Which device, port and GID to use.
    pub device: DeviceSelection,
}

impl std::fmt::Debug for RdmaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaOptions")
            .field("memnodes", &self.memnodes)
            .field("tenant", &self.tenant_name())
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl RdmaOptions {
    /// Options for `memnodes` (`host:port`) and `token`, with the device picked as
    /// [`DeviceSelection::from_env`] says (`RDMEM_DEVICE`, `RDMEM_PORT`, `RDMEM_GID_INDEX`, or
    /// automatically) and the tenant `RDMEM_TENANT` names (default: the nodes' default pools).
    pub fn for_memnodes<S: AsRef<str>>(memnodes: &[S], token: &str) -> Result<Self> {
        Ok(RdmaOptions {
            memnodes: memnodes.iter().map(|m| m.as_ref().to_owned()).collect(),
            token: token.to_owned(),
            tenant: std::env::var("RDMEM_TENANT").unwrap_or_default(),
            device: DeviceSelection::from_env().map_err(RdmaError::from)?,
        })
    }

    /// The tenant named in connect and control requests.
    pub fn tenant_name(&self) -> &str {
        if self.tenant.is_empty() { cm_auth::DEFAULT_TENANT } else { &self.tenant }
    }

    /// Options from a cluster configuration (memory nodes, token, device).
    pub fn from_config(config: &ClusterConfig) -> Result<Self> {
        Ok(RdmaOptions {
            memnodes: config.memnode_addrs()?,
            token: config.resolve_token()?,
            tenant: config.tenant.clone().unwrap_or_default(),
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
        cm_auth::check_token(options.token.as_bytes()).map_err(Error::Config)?;
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

    /// The options it was made with (to open another transport like it).
    pub fn options(&self) -> &RdmaOptions {
        &self.shared.options
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

    /// Over a control connection to the node ([`crate::control::checkpoint`]); the node's
    /// refusal is [`Error::Checkpoint`] with its reason.
    fn checkpoint(&self, node: NodeId, seq: Option<u64>, full: bool) -> Result<rdmem_core::Checkpoint> {
        let peer = self.peer_of(node)?;
        let done = crate::control::Control::new(peer, &self.shared.options.token)
            .tenant(self.shared.options.tenant_name())
            .checkpoint(seq, full);
        let done = same_node(node, peer, done.map(|d| (d.node, d)))?;
        Ok(done)
    }

    fn newest_checkpoint(&self, node: NodeId) -> Result<u64> {
        let peer = self.peer_of(node)?;
        let control = crate::control::Control::new(peer, &self.shared.options.token);
        same_node(node, peer, control.tenant(self.shared.options.tenant_name()).newest())
    }
}

/// One queue pair to one memory node.
struct Connection {
    node: NodeInfo,
    peer: String,
    pool_base: u64,
    rkey: u32,
    qp: ExtendedQueuePair,
    /// The queue pair's number, as completions carry it.
    qpn: u32,
    limits: QpLimits,
    broken: bool,
    /// Write-behind requests posted and not yet confirmed (each holds a send queue slot; at
    /// most half the queue).
    behind: u32,
    /// Sequence number of the next write-behind.
    behind_seq: u64,
    /// The remote addresses of the unconfirmed write-behinds, by sequence number modulo the
    /// length, to name one that fails.
    behind_addrs: Vec<GlobalAddr>,
    /// A write-behind's failure, seen while waiting for another node: reported by the next
    /// operation to this node.
    failure: Option<Error>,
    /// The RDMA-CM connection of the queue pair: the node drops its queue pair when this is
    /// destroyed (a disconnect), and this end gets `DISCONNECTED` when the node's process dies
    /// (read, non-blocking, while waiting).
    cm: CmLink,
}

/// A connected RDMA-CM id and its event channel (one per connection, so its events are its
/// own). Drop order: the id, then the channel.
struct CmLink {
    id: CmId,
    channel: EventChannel,
    /// A DISCONNECTED (or another end of the connection) was seen.
    gone: Cell<bool>,
}

impl CmLink {
    /// True once the node has ended the connection (its process died, or it evicted us).
    fn is_gone(&self) -> bool {
        while !self.gone.get() {
            match self.channel.next() {
                Ok(Some(event)) => {
                    if matches!(event.kind, cm::DISCONNECTED | cm::DEVICE_REMOVAL | cm::TIMEWAIT_EXIT) {
                        self.gone.set(true);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("the RDMA-CM event channel failed ({e}): taking the node for gone");
                    self.gone.set(true);
                }
            }
        }
        self.gone.get()
    }
}

impl Drop for CmLink {
    fn drop(&mut self) {
        // The node gets DISCONNECTED and destroys its side (and revokes what it gave).
        self.id.disconnect();
    }
}

/// A completion queue with its completion channel (the async face sleeps on the channel).
struct Cq {
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
}

impl RdmaTransport {
    /// Where node `node` is reached.
    fn peer_of(&self, node: NodeId) -> Result<&str> {
        let i = self.shared.nodes.iter().position(|n| n.id == node).ok_or_else(|| Error::Checkpoint {
            node,
            reason: format!(
                "no such memory node (the nodes are {:?})",
                self.shared.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
            ),
        })?;
        Ok(&self.shared.options.memnodes[i])
    }
}

/// A control answer from the node at `peer`, which must still be `node`; its refusal becomes
/// [`Error::Checkpoint`].
fn same_node<T>(node: NodeId, peer: &str, answer: Result<(NodeId, T)>) -> Result<T> {
    match answer {
        Ok((said, _)) if said != node => Err(Error::Checkpoint {
            node,
            reason: format!("the node at {peer} now says it is {said} (restarted with another --node-id?)"),
        }),
        Ok((_, value)) => Ok(value),
        Err(Error::Refused { refusal, .. }) => Err(Error::Checkpoint { node, reason: refusal.to_string() }),
        Err(e) => Err(e),
    }
}

fn connect_all(shared: &Shared) -> Result<(Cq, Vec<Connection>)> {
    let channel =
        shared.device.context().create_comp_channel().map_err(|e| RdmaError::verbs("ibv_create_comp_channel", e))?;
    // SAFETY: the descriptor is the channel's own and stays open while `channel` lives (this call).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(channel.as_raw_fd()) };
    rustix::io::ioctl_fionbio(fd, true)
        .map_err(|e| RdmaError::verbs("setting the completion channel non-blocking", e))?;
    let mut builder = shared.device.context().create_cq_builder();
    builder.setup_cqe(SEND_DEPTH * shared.options.memnodes.len() as u32 + 16);
    builder.setup_comp_channel(&channel, 0);
    let cq = builder.build().map_err(|e| RdmaError::verbs("ibv_create_cq", e))?;
    let cq = Cq { cq, channel };
    let generic = GenericCompletionQueue::from(Arc::clone(&cq.cq));
    let conns =
        shared.options.memnodes.iter().map(|peer| connect_one(shared, &generic, peer)).collect::<Result<_>>()?;
    Ok((cq, conns))
}

/// Creates a queue pair and connects it to the node at `peer` with RDMA-CM: address and route
/// resolution, a connect request carrying a MAC made with the token ([`cm_auth`]), the node's
/// accept checked for its own MAC, the pair moved to RTS as negotiated, then established.
fn connect_one(shared: &Shared, cq: &GenericCompletionQueue, peer: &str) -> Result<Connection> {
    let fail = |reason: String| Error::Connect { peer: peer.to_owned(), reason };
    let addr = shared.device.routable(cm::resolve(peer).map_err(|e| fail(format!("cannot resolve: {e}")))?);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let channel = EventChannel::new()?;
    let mut id = CmId::new(&channel)?;
    let next = |want: cm::EventKind, what: &str| -> Result<cm::Event> {
        match channel.wait(deadline)? {
            Some(event) if event.kind == want => Ok(event),
            Some(event) => Err(fail(format!("{what}: {event:?}"))),
            None => Err(fail(format!("{what}: no answer within {} s", CONNECT_TIMEOUT.as_secs()))),
        }
    };
    id.resolve_addr(addr, RESOLVE_TIMEOUT)?;
    next(
        cm::ADDR_RESOLVED,
        &format!("cannot resolve {addr} to an RDMA device (is it the address of a netdev under one, e.g. rxe0's?)"),
    )?;
    id.resolve_route(RESOLVE_TIMEOUT)?;
    next(cm::ROUTE_RESOLVED, &format!("no route to {addr}"))?;
    match id.device_name() {
        Some(name) if name == shared.device.name() => {}
        other => {
            return Err(fail(format!(
                "{addr} is reached through device {}, but this transport opened {} (set RDMEM_DEVICE)",
                other.as_deref().unwrap_or("(none)"),
                shared.device.name()
            )));
        }
    }
    let (mut qp, limits) = queue_pair::create(&shared.device, &shared.pd, cq, SEND_DEPTH, false)?;
    let token = shared.options.token.as_bytes();
    let request = cm_auth::Request::new(token, shared.options.tenant_name(), addr, std::time::SystemTime::now())
        .map_err(|e| fail(format!("no randomness for the connect request's nonce: {e}")))?;
    id.connect(qp.qp_number(), limits.read_atomic_depth, &request.bytes)?;
    let answer = match channel.wait(deadline)? {
        Some(event) => event,
        None => {
            return Err(fail(format!("connection setup timed out: no answer within {} s", CONNECT_TIMEOUT.as_secs())));
        }
    };
    let accept = match answer.kind {
        cm::CONNECT_RESPONSE => request.check_accept(token, answer.private_data()).map_err(|refusal| {
            fail(match refusal {
                cm_auth::Refusal::WrongToken => {
                    "its accept does not carry this token's MAC: it is not a memory node holding the token".into()
                }
                other => format!("its accept is not one of ours ({other})"),
            })
        })?,
        cm::REJECTED => {
            return Err(match cm_auth::Refusal::from_reject(answer.private_data(), cm_auth::VERSION) {
                Some(refusal) => Error::Refused { peer: peer.to_owned(), refusal: refusal.into() },
                // IB CM reject reason 8: no listener for the service (the port).
                None if answer.status == 8 => {
                    fail(format!("nothing listens on {addr} (is rdmem-memnode running there?)"))
                }
                None => fail(format!("rejected by the connection manager (reason {})", answer.status)),
            });
        }
        _ if answer.status == -libc::ETIMEDOUT => {
            return Err(fail("connection setup timed out: nothing answered the connect request".into()));
        }
        _ => return Err(fail(format!("connection failed: {answer:?}"))),
    };
    let negotiated = id.negotiated()?;
    queue_pair::connect(&shared.device, &mut qp, &limits, &negotiated, AccessFlags::LocalWrite)?;
    id.establish()?;
    Ok(Connection {
        node: NodeInfo { id: NodeId(accept.node), pool_size: accept.size },
        peer: peer.to_owned(),
        pool_base: accept.base,
        rkey: accept.rkey,
        qpn: qp.qp_number(),
        qp,
        limits,
        broken: false,
        behind: 0,
        behind_seq: 0,
        behind_addrs: vec![GlobalAddr::NULL; (limits.send_depth / 2).max(1) as usize],
        failure: None,
        cm: CmLink { id, channel, gone: Cell::new(false) },
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

impl LocalSide {
    /// Where `op`'s local side goes, given its staging need (from `staging_need`) and the
    /// staging offset it would take.
    #[inline]
    fn of(op: &Op<'_>, need: usize, offset: usize) -> LocalSide {
        match op {
            Op::Read { .. } | Op::Write { .. } if op.is_empty() => LocalSide::Skip,
            Op::Read { local, key: Some(lkey), .. } => {
                LocalSide::Registered { addr: local.as_ptr() as u64, lkey: *lkey }
            }
            Op::Write { local, key: Some(lkey), .. } => {
                LocalSide::Registered { addr: local.as_ptr() as u64, lkey: *lkey }
            }
            Op::Write { key: None, .. } if need == 0 => LocalSide::Inline,
            _ => LocalSide::Staged { offset },
        }
    }
}

/// One thread's queue pairs to every memory node. See the module docs for the data path.
pub struct RdmaEndpoint {
    // Queue pairs go before the completion queue they use (fields drop in order).
    conns: Vec<Connection>,
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    staging: Region,
    /// Copies of write-behind data (see the module docs), used up to `behind_used`.
    behind: Region,
    behind_used: usize,
    shared: Arc<Shared>,
    /// Per operation of the current round: where its local side is. Reused, never shrunk.
    sides: Vec<LocalSide>,
    /// Per connection: the wr_id of its last (signaled) request this round, if any.
    last_wr: Vec<Option<u64>>,
    /// Per connection: requests planned into the current round.
    round_counts: Vec<u32>,
    /// Per connection: the index (in the round) of its last request, set by `plan_round`.
    round_last: Vec<Option<usize>>,
    /// Storage for one node's work requests, reused by every round.
    wr_list: WrList,
    wcs: Box<[ibv_wc; POLL_BATCH]>,
    /// Set by [`RdmaEndpoint::inject_poll_failure`]: the next poll fails.
    poll_fault: bool,
    /// Set by [`RdmaEndpoint::inject_post_failure`]: the next post fails.
    post_fault: bool,
    /// How long a round waits for its completions ([`RdmaEndpoint::set_completion_deadline`]).
    completion_deadline: Duration,
    /// The async face's slots, once opened (after the queue pairs: they drop first, so the
    /// device is done with this memory when it is freed).
    aio: Option<aio::AsyncSlots>,
}

impl RdmaEndpoint {
    fn with_connections(shared: Arc<Shared>, cq: Cq, conns: Vec<Connection>) -> Result<Self> {
        let Cq { cq, channel } = cq;
        let staging = Region::new(&shared.pd, STAGING_BYTES, PageSize::Normal, AccessFlags::LocalWrite)
            .map_err(RdmaError::from)?;
        let behind = Region::new(&shared.pd, BEHIND_BYTES, PageSize::Normal, AccessFlags::LocalWrite)
            .map_err(RdmaError::from)?;
        let n = conns.len();
        Ok(RdmaEndpoint {
            conns,
            cq,
            channel,
            staging,
            behind,
            behind_used: 0,
            shared,
            sides: Vec::with_capacity(64),
            last_wr: vec![None; n],
            round_counts: vec![0; n],
            round_last: vec![None; n],
            wr_list: WrList::default(),
            // SAFETY: ibv_wc is a plain C struct of integers; all-zero is a valid value.
            wcs: Box::new(unsafe { std::mem::zeroed() }),
            poll_fault: false,
            post_fault: false,
            completion_deadline: COMPLETION_DEADLINE,
            aio: None,
        })
    }

    /// For tests of failure handling: the next `ibv_poll_cq` of this endpoint is reported as
    /// failed (EIO), as a device error would be, so the round in flight is abandoned.
    #[doc(hidden)]
    pub fn inject_poll_failure(&mut self) {
        self.poll_fault = true;
    }

    /// For tests of failure handling: later requests to `node` carry a wrong rkey, so the node
    /// refuses them (a remote access error).
    #[doc(hidden)]
    pub fn inject_wrong_rkey(&mut self, node: NodeId) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.node.id == node) {
            conn.rkey ^= 0x5a;
        }
    }

    /// The remote key and pool base this endpoint's connection to `node` was given: with
    /// memory windows, a key of that connection's own, which the device accepts on its queue
    /// pair only and which the node revokes when the connection ends.
    pub fn remote_key(&self, node: NodeId) -> Option<(u64, u32)> {
        self.conns.iter().find(|c| c.node.id == node).map(|c| (c.pool_base, c.rkey))
    }

    /// For tests of isolation: later requests to `node` go to pool base `base` with key `rkey`
    /// (another connection's, another tenant's), as a forged request would.
    #[doc(hidden)]
    pub fn forge_remote_key(&mut self, node: NodeId, base: u64, rkey: u32) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.node.id == node) {
            conn.pool_base = base;
            conn.rkey = rkey;
        }
    }

    /// For tests of failure handling: the next `ibv_post_send` of this endpoint is reported as
    /// failed (ENOMEM, a full send queue), so the connection it was for breaks.
    #[doc(hidden)]
    pub fn inject_post_failure(&mut self) {
        self.post_fault = true;
    }

    /// How long an operation waits for its completion before it fails with
    /// [`Error::Timeout`] (default 60 s; checked every few thousand empty polls, so it runs a
    /// few milliseconds over). The queue pairs it waited on are then stopped: make a new
    /// endpoint for those nodes. Under the async face ([`rdmem_core::aio`]) it counts from the
    /// first time the waiting driver checks (after its spin) and is checked at least every
    /// 100 ms while it sleeps.
    pub fn set_completion_deadline(&mut self, deadline: Duration) {
        self.completion_deadline = deadline;
    }

    fn conn_index(&self, node: NodeId) -> usize {
        // validate() already checked the node exists; few nodes, so a scan is cheapest.
        self.conns.iter().position(|c| c.node.id == node).expect("validated node")
    }

    /// Staging bytes operation `op` needs (8-aligned), given the queue pair's inline limit.
    #[inline]
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
        self.round_last.iter_mut().for_each(|l| *l = None);
        self.last_wr.iter_mut().for_each(|w| *w = None);
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
            // A write-behind failure seen during an earlier round of this batch stops it here
            // (execute checked every connection before the first).
            if start > 0 {
                self.check_usable(conn)?;
            }
            // Unconfirmed write-behinds hold slots of the send queue (at most half of it).
            let room = limits.send_depth - self.conns[conn].behind;
            if used + need > self.staging.len() || self.round_counts[conn] >= room {
                break;
            }
            let side = LocalSide::of(op, need, used);
            if !matches!(side, LocalSide::Skip) {
                self.round_counts[conn] += 1;
                self.round_last[conn] = Some(end - start);
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

    // Inline (across crates too): in `faa`, `read_into` and the like the operation's kind is
    // known, so the lone operation's path loses its matches on it.
    #[inline]
    fn execute(&mut self, ops: &mut [Op<'_>]) -> Result<()> {
        if let [op] = ops {
            if let Some(done) = self.run_single(op) {
                return done;
            }
        }
        self.run_rounds(ops)
    }

    fn post_write(&mut self, dst: GlobalAddr, src: &[u8]) -> Result<()> {
        Op::Write { remote: dst, local: src, key: None }.validate(&self.shared.nodes, MAX_TRANSFER)?;
        let c = self.conn_index(dst.node());
        self.check_usable(c)?;
        if src.is_empty() {
            return Ok(());
        }
        let limits = self.conns[c].limits;
        let inline = src.len() <= limits.max_inline as usize;
        if (!inline && src.len() > BEHIND_BYTES) || limits.send_depth < 2 {
            return self.write(dst, src);
        }
        let need = if inline { 0 } else { src.len().next_multiple_of(8) };
        if self.conns[c].behind >= limits.send_depth / 2 || self.behind_used + need > BEHIND_BYTES {
            // Make room: the area is shared by all connections (nothing to do if all confirmed).
            self.confirm_behind(None)?;
        }
        if self.conns.iter().all(|conn| conn.behind == 0) {
            self.behind_used = 0;
        }
        let (addr, lkey) = if inline {
            // The device copies inline bytes at post time; no key is needed.
            (src.as_ptr() as u64, 0)
        } else {
            let at = self.behind_used;
            self.behind.as_mut_slice()[at..at + src.len()].copy_from_slice(src);
            self.behind_used += need;
            (self.behind.addr() + at as u64, self.behind.lkey())
        };
        let conn = &mut self.conns[c];
        let mut sge = ibv_sge { addr, length: src.len() as u32, lkey };
        // SAFETY: ibv_send_wr is a plain C struct; all-zero is its "empty" value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = BEHIND_TAG | conn.behind_seq;
        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        wr.wr.rdma = rdma_t { remote_addr: conn.pool_base + dst.offset(), rkey: conn.rkey };
        wr.send_flags = if inline { ibv_send_flags::IBV_SEND_INLINE.0 } else { 0 };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        // SAFETY: the request's memory is either copied at post time (inline) or in
        // `self.behind`, which is not reused before the request is confirmed (behind_used is
        // reset only when no connection has write-behinds left).
        unsafe { conn.post(&mut wr) }.map_err(|(errno, _)| Error::Post { op: OpKind::Write, addr: dst, errno })?;
        let slot = (conn.behind_seq % conn.behind_addrs.len() as u64) as usize;
        conn.behind_addrs[slot] = dst;
        conn.behind_seq += 1;
        conn.behind += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.confirm_behind(None)?;
        self.stored_failure()
    }

    fn flush_for(&mut self, node: NodeId) -> Result<()> {
        self.confirm_behind(Some(node))?;
        self.stored_failure()
    }
}

impl RdmaEndpoint {
    /// Confirms the write-behinds of every usable connection but `skip`'s with a signaled
    /// 8-byte READ behind them (RC completes in order). Failures stored on connections are
    /// left for whoever reports them.
    fn confirm_behind(&mut self, skip: Option<NodeId>) -> Result<()> {
        let nodes: SmallVec<[NodeId; 8]> = self
            .conns
            .iter()
            .filter(|c| c.behind > 0 && !c.broken && Some(c.node.id) != skip)
            .map(|c| c.node.id)
            .collect();
        let mut words: SmallVec<[[u8; 8]; 8]> = smallvec::smallvec![[0u8; 8]; nodes.len()];
        let mut ops: SmallVec<[Op<'_>; 8]> = nodes
            .iter()
            .zip(words.iter_mut())
            .map(|(&node, word)| Op::Read {
                // Offset 0 is in every pool.
                remote: GlobalAddr::new(node, 0).expect("offset 0"),
                local: word,
                key: None,
            })
            .collect();
        if ops.is_empty() { Ok(()) } else { self.execute(&mut ops) }
    }

    /// The first write-behind failure stored on a connection, reported once.
    fn stored_failure(&mut self) -> Result<()> {
        match self.conns.iter_mut().find_map(|c| c.failure.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for RdmaEndpoint {
    fn drop(&mut self) {
        // Write-behinds not yet confirmed may not have left: destroying the queue pairs would
        // lose them.
        if let Err(e) = self.confirm_behind(None) {
            tracing::error!("an endpoint dropped with writes still posted could not flush them: {e}");
        }
        for e in self.conns.iter_mut().filter_map(|c| c.failure.take()) {
            tracing::error!("a posted write failed and was not reported before the endpoint was dropped: {e}");
        }
    }
}

impl Connection {
    /// Marks the queue pair broken: it is in the error state and confirms nothing any more.
    fn break_off(&mut self) {
        self.broken = true;
        self.behind = 0;
    }

    /// Posts the linked list of requests starting at `first` (one doorbell). On failure the
    /// queue pair is moved to the error state (requests before the bad one may be in flight
    /// with nothing signaled; the error state stops the device touching their memory), marked
    /// broken, and the error number returned with the `wr_id` of the first request not
    /// posted (when the device named it).
    ///
    /// # Safety
    /// `first` starts a well-formed list whose local memory is registered (or inline) and
    /// stays valid until the requests complete.
    unsafe fn post(&mut self, first: *mut ibv_send_wr) -> std::result::Result<(), (i32, Option<u64>)> {
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the queue pair is alive (owned by `self`); the list is the caller's promise.
        let rc = unsafe { ibv_post_send(self.qp.qp().as_ptr(), first, &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: a non-null `bad` points at a request of the caller's list, still alive.
        let wr_id = (!bad.is_null()).then(|| unsafe { (*bad).wr_id });
        self.fail_post(rc).map_err(|errno| (errno, wr_id))
    }

    /// What a failed post leaves: the queue pair stopped and broken, `errno` returned.
    fn fail_post(&mut self, errno: i32) -> std::result::Result<(), i32> {
        self.stop();
        Err(errno)
    }

    /// Moves the queue pair to the error state (the device stops touching the memory of its
    /// requests and flushes them) and marks it broken.
    fn stop(&mut self) {
        queue_pair::set_error(&mut self.qp);
        self.break_off();
    }

    /// True when the node has ended the connection: its process is gone (or it evicted us).
    fn is_gone(&self) -> bool {
        self.cm.is_gone()
    }
}

impl RdmaEndpoint {
    /// Fails if connection `c` cannot take operations: a write-behind failure not reported yet
    /// (reported once), or a broken queue pair.
    #[inline]
    fn check_usable(&mut self, c: usize) -> Result<()> {
        let conn = &mut self.conns[c];
        if conn.failure.is_some() {
            return Err(conn.failure.take().expect("checked"));
        }
        if conn.broken {
            return Err(Error::Broken { node: conn.node.id });
        }
        Ok(())
    }

    /// A batch in rounds (each fits the staging memory and every send queue), refused whole
    /// before anything is posted when an operation is bad or its node broken. Out of line, so
    /// a lone operation's path stays small.
    #[inline(never)]
    fn run_rounds(&mut self, ops: &mut [Op<'_>]) -> Result<()> {
        for op in ops.iter() {
            op.validate(&self.shared.nodes, MAX_TRANSFER)?;
            self.check_usable(self.conn_index(op.remote().node()))?;
        }
        let mut start = 0;
        while start < ops.len() {
            let end = self.plan_round(ops, start)?;
            self.run_round(&mut ops[start..end])?;
            start = end;
        }
        Ok(())
    }

    /// The path of a lone operation, perftest's shape: one request built on the stack, posted,
    /// and polled for, with none of a round's planning and per-operation lists (the same
    /// validation, failure handling and completion waiting as a round of one). `None` when it
    /// needs the general path: an empty transfer, one larger than the staging memory, or a
    /// send queue full of write-behinds.
    #[inline]
    fn run_single(&mut self, op: &mut Op<'_>) -> Option<Result<()>> {
        let Some(c) = self.valid_conn(op) else { return self.refuse_single(op) };
        let conn = &self.conns[c];
        if conn.failure.is_some() || conn.broken {
            return Some(self.check_usable(c));
        }
        let limits = conn.limits;
        let need = Self::staging_need(op, limits.max_inline);
        if op.is_empty() || need > self.staging.len() || conn.behind >= limits.send_depth {
            return None;
        }
        let side = LocalSide::of(op, need, 0);
        let remote = RemoteKey { base: conn.pool_base, rkey: conn.rkey };
        if let (Op::Write { local, .. }, LocalSide::Staged { .. }) = (&*op, side) {
            self.staging.as_mut_slice()[..local.len()].copy_from_slice(local);
        }
        let (mut wr, mut sge) = build_wr(op, side, 0, true, remote, (self.staging.addr(), self.staging.lkey()));
        wr.sg_list = &mut sge;
        let posted = if std::mem::take(&mut self.post_fault) {
            self.conns[c].fail_post(12).map_err(|errno| (errno, None)) // ENOMEM
        } else {
            // SAFETY: a one-request list (`next` is null) whose scatter entry lives on this
            // stack through the post; its local memory is registered (or inline) and borrowed
            // by `op` or owned by this endpoint until the completion is waited for below.
            unsafe { self.conns[c].post(&mut wr) }
        };
        if let Err((errno, _)) = posted {
            return Some(Err(Error::Post { op: op.kind(), addr: op.remote(), errno }));
        }
        if let Err(e) = self.wait_single(c, op) {
            return Some(Err(e));
        }
        if let LocalSide::Staged { .. } = side {
            unstage(op, self.staging.as_slice());
        }
        Some(Ok(()))
    }

    /// The connection of `op`'s node when `op` is valid: what [`Op::validate`] checks, in one
    /// pass over the connections (which hold the same nodes as `shared.nodes`). `None` when it
    /// is not valid, or its node has no connection. (Calling `Op::validate` against the
    /// connection's node instead costs about 70 more instructions per operation: its `Result`
    /// carries the error.)
    #[inline]
    fn valid_conn(&self, op: &Op<'_>) -> Option<usize> {
        let (addr, len) = (op.remote(), op.len());
        let c = self.conns.iter().position(|c| c.node.id == addr.node())?;
        let in_pool = addr.offset().checked_add(len).is_some_and(|end| end <= self.conns[c].node.pool_size);
        let aligned = matches!(op, Op::Read { .. } | Op::Write { .. }) || addr.is_aligned(8);
        (len <= MAX_TRANSFER && in_pool && aligned).then_some(c)
    }

    /// A lone operation [`RdmaEndpoint::valid_conn`] did not pass: its validation error (the
    /// general path's, so every path refuses an input the same way).
    #[cold]
    fn refuse_single(&self, op: &Op<'_>) -> Option<Result<()>> {
        match op.validate(&self.shared.nodes, MAX_TRANSFER) {
            Err(e) => Some(Err(e)),
            Ok(()) => None, // valid after all: the general path finds its connection
        }
    }

    /// Waits for the lone request just posted on connection `c` (wr_id 0, signaled). The usual
    /// case, its own successful completion alone in the poll, costs the poll and four
    /// compares, and keeps no round books. Anything else (a failure, other completions, a
    /// poll error, no completion within `STALL_CHECK_POLLS` polls) goes to `wait_round` with the
    /// books a round of one keeps, the completions already polled included.
    #[inline]
    fn wait_single(&mut self, c: usize, op: &Op<'_>) -> Result<()> {
        let (mut polled, mut spun) = (0, 0);
        if !self.poll_fault {
            let qpn = self.conns[c].qpn;
            // SAFETY: the pointer is used only here, while `self.cq` (an Arc) keeps the
            // completion queue alive.
            let cq = unsafe { self.cq.cq() };
            for _ in 0..STALL_CHECK_POLLS {
                // SAFETY: `cq` is a live completion queue and `self.wcs` has room for
                // POLL_BATCH completions, the most ibv_poll_cq writes.
                polled = unsafe { ibv_poll_cq(cq.as_ptr(), POLL_BATCH as i32, self.wcs.as_mut_ptr()) };
                if polled != 0 {
                    break;
                }
                spun += 1;
            }
            let wc = &self.wcs[0];
            if polled == 1 && wc.qp_num == qpn && wc.wr_id == 0 && wc.status == WorkCompletionStatus::Success as u32 {
                // Its completion confirms every write-behind posted before it.
                self.conns[c].behind = 0;
                return Ok(());
            }
        }
        self.round_counts.iter_mut().for_each(|n| *n = 0);
        self.round_counts[c] = 1;
        self.last_wr.iter_mut().for_each(|w| *w = None);
        self.last_wr[c] = Some(0);
        self.wait_round_after(std::slice::from_ref(op), polled, spun)
    }

    /// Posts one planned round (one doorbell per node), waits for it, copies results out.
    fn run_round(&mut self, ops: &mut [Op<'_>]) -> Result<()> {
        self.stage_writes(ops);
        let mut post_error = None;
        for c in 0..self.conns.len() {
            let Some(last) = self.round_last[c] else { continue };
            if let Err((errno, bad)) = self.post_node(c, ops, last) {
                // Other nodes' requests of this round are waited for below first.
                let op = &ops[bad.map_or(last, |i| i as usize)];
                post_error = Some(Error::Post { op: op.kind(), addr: op.remote(), errno });
                break;
            }
            self.last_wr[c] = Some(last as u64);
        }
        let waited = self.wait_round(ops);
        if let Some(e) = post_error {
            return Err(e);
        }
        waited?;
        self.unstage_results(ops);
        Ok(())
    }

    /// Copies the round's staged WRITE payloads into the staging memory.
    fn stage_writes(&mut self, ops: &[Op<'_>]) {
        for (op, side) in ops.iter().zip(&self.sides) {
            if let (Op::Write { local, .. }, LocalSide::Staged { offset }) = (op, side) {
                self.staging.as_mut_slice()[*offset..*offset + local.len()].copy_from_slice(local);
            }
        }
    }

    /// Copies the round's staged READ data and atomics' old values out to the caller.
    fn unstage_results(&self, ops: &mut [Op<'_>]) {
        for (op, side) in ops.iter_mut().zip(&self.sides) {
            let LocalSide::Staged { offset } = *side else { continue };
            unstage(op, &self.staging.as_slice()[offset..]);
        }
    }

    /// Posts connection `c`'s requests of the round, `ops[..=last]` on its node, as one linked
    /// list: one ibv_post_send, one doorbell, and one indirect call for the lot (perftest's
    /// way; the ibv_wr_* API costs four per request). Only the last is signaled. The list lives
    /// in the endpoint's own storage, so no round allocates once it has grown.
    fn post_node(&mut self, c: usize, ops: &[Op<'_>], last: usize) -> std::result::Result<(), (i32, Option<u64>)> {
        let node = self.conns[c].node.id;
        let remote = RemoteKey { base: self.conns[c].pool_base, rkey: self.conns[c].rkey };
        let staging = (self.staging.addr(), self.staging.lkey());
        let list = &mut self.wr_list;
        list.wrs.clear();
        list.sges.clear();
        for (i, (op, &side)) in ops.iter().zip(&self.sides).enumerate().take(last + 1) {
            if op.remote().node() == node && !matches!(side, LocalSide::Skip) {
                let (wr, sge) = build_wr(op, side, i as u64, i == last, remote, staging);
                list.wrs.push(wr);
                list.sges.push(sge);
            }
        }
        let first = list.link();
        if std::mem::take(&mut self.post_fault) {
            return self.conns[c].fail_post(12).map_err(|errno| (errno, None)); // ENOMEM
        }
        // SAFETY: the list is well formed (`link`); its local memory is registered and
        // borrowed by `ops` or owned by this endpoint until run_round returns, after the
        // round's last completion.
        unsafe { self.conns[c].post(first) }
    }

    /// Polls until every connection's last request of the round completed; reports the first
    /// failed request (a flush caused by an earlier failure is not the cause, so it ranks last).
    fn wait_round(&mut self, ops: &[Op<'_>]) -> Result<()> {
        self.wait_round_after(ops, 0, 0)
    }

    /// [`RdmaEndpoint::wait_round`], where `polled` is what a poll already made returned
    /// (its completions in `self.wcs`; 0 for none) after `spun` empty polls, which count
    /// towards the next stall check.
    fn wait_round_after(&mut self, ops: &[Op<'_>], mut polled: i32, spun: u32) -> Result<()> {
        let mut pending = self.last_wr.iter().filter(|w| w.is_some()).count();
        let mut failure: Option<Failed> = None;
        let mut spins = spun;
        let mut deadline: Option<Instant> = None;
        if polled == 0 && spun == STALL_CHECK_POLLS {
            self.check_stalled(ops, &mut deadline)?;
        }
        // SAFETY: the pointer is used only in this function, while `self.cq` (an Arc) keeps the
        // completion queue alive.
        let cq = unsafe { self.cq.cq() };
        while pending > 0 {
            let n = if polled != 0 {
                std::mem::take(&mut polled)
            } else if std::mem::take(&mut self.poll_fault) {
                -5 // EIO
            } else {
                // SAFETY: `cq` is a live completion queue (above) and `self.wcs` has room for
                // POLL_BATCH completions, the most ibv_poll_cq writes.
                unsafe { ibv_poll_cq(cq.as_ptr(), POLL_BATCH as i32, self.wcs.as_mut_ptr()) }
            };
            if n < 0 {
                // The device may still write into this round's buffers: stop it (queue pairs
                // to the error state) before returning, like every other early exit.
                let (op, addr) = self.abandon_round(ops, None);
                return Err(Error::Poll { op, addr, errno: -n });
            }
            for k in 0..n as usize {
                let wc = self.wcs[k];
                pending -= self.complete(&wc, ops, &mut failure) as usize;
            }
            if n == 0 {
                spins = spins.wrapping_add(1);
                // Is a waited-on node's control socket closed, or the deadline past?
                if spins % STALL_CHECK_POLLS == 0 {
                    self.check_stalled(ops, &mut deadline)?;
                }
            }
        }
        failure.map_or(Ok(()), |f| Err(f.error()))
    }

    /// Takes one completion: records a failure in `failure`; true when it is the last request
    /// of its connection this round. Completions carry the wr_id (the op index); the
    /// connection is found by QP number. Completions of queue pairs not in this round are stale
    /// (flushes of an abandoned round) and ignored.
    fn complete(&mut self, wc: &ibv_wc, ops: &[Op<'_>], failure: &mut Option<Failed>) -> bool {
        let Some(c) = self.conns.iter().position(|c| c.qpn == wc.qp_num) else { return false };
        let failed = wc.status != WorkCompletionStatus::Success as u32;
        let in_round = self.round_counts[c] > 0;
        if wc.wr_id & BEHIND_TAG == 0 && wc.wr_id & aio::ASYNC_TAG != 0 {
            return false; // an async slot's, whose future is gone (the endpoint is dropping)
        }
        if wc.wr_id & BEHIND_TAG != 0 {
            self.write_behind_failed(c, wc, in_round, failure);
            return false;
        }
        if !in_round {
            return false;
        }
        if failed {
            self.conns[c].break_off();
            let op = &ops[wc.wr_id as usize];
            *failure = better_failure(*failure, Failed::of(op.kind(), op.remote(), wc));
        }
        if self.last_wr[c] != Some(wc.wr_id) {
            return false;
        }
        self.last_wr[c] = None;
        if !failed {
            // Its completion confirms every write-behind posted before it.
            self.conns[c].behind = 0;
        }
        true
    }

    /// A write-behind completed: only failed ones do (they are unsignaled). Keep the first for
    /// the next operation to this node, unless this round reports it.
    #[cold]
    fn write_behind_failed(&mut self, c: usize, wc: &ibv_wc, in_round: bool, failure: &mut Option<Failed>) {
        let conn = &mut self.conns[c];
        let at = conn.behind_addrs[((wc.wr_id & !BEHIND_TAG) % conn.behind_addrs.len() as u64) as usize];
        let first = !conn.broken;
        conn.break_off();
        if in_round {
            *failure = better_failure(*failure, Failed::of(OpKind::Write, at, wc));
        } else if first {
            conn.failure = Some(Failed::of(OpKind::Write, at, wc).error());
        }
    }

    /// No completion for a while: fails (abandoning the round) when a waited-on node's control
    /// socket is closed, or the completion deadline (started at the first check) is past.
    #[cold]
    fn check_stalled(&mut self, ops: &[Op<'_>], deadline: &mut Option<Instant>) -> Result<()> {
        if let Some(c) = self.dead_node() {
            let peer = self.conns[c].peer.clone();
            let (op, addr) = self.abandon_round(ops, Some(c));
            return Err(Error::NodeGone { op, addr, peer });
        }
        let now = Instant::now();
        let limit = *deadline.get_or_insert(now + self.completion_deadline);
        if now > limit {
            let (op, addr) = self.abandon_round(ops, None);
            return Err(Error::Timeout { op, addr, waited: self.completion_deadline });
        }
        Ok(())
    }

    /// The first connection still waited on whose control socket is closed.
    fn dead_node(&self) -> Option<usize> {
        (0..self.conns.len()).find(|&c| self.last_wr[c].is_some() && self.conns[c].is_gone())
    }

    /// A round whose completions will not come: move the queue pairs still waited on to the
    /// error state (the device stops touching their memory and flushes them). Returns the
    /// operation to name in the error.
    /// `name` is the connection whose operation the error should name (the dead node's), or
    /// `None` for the first one still waited on.
    fn abandon_round(&mut self, ops: &[Op<'_>], name: Option<usize>) -> (OpKind, GlobalAddr) {
        let mut first = name.and_then(|c| self.last_wr[c]).map(|wr| wr as usize);
        for (c, last) in self.last_wr.iter().enumerate() {
            if let Some(wr) = last {
                self.conns[c].stop();
                first.get_or_insert(*wr as usize);
            }
        }
        let op = &ops[first.unwrap_or(0)];
        (op.kind(), op.remote())
    }
}

/// Copies a finished staged operation's result out of `staged` (its staging bytes): a READ's
/// data, or an atomic's old value.
#[inline(always)]
fn unstage(op: &mut Op<'_>, staged: &[u8]) {
    match op {
        Op::Read { local, .. } => local.copy_from_slice(&staged[..local.len()]),
        Op::CompareSwap { old, .. } | Op::FetchAdd { old, .. } => {
            **old = u64::from_ne_bytes(staged[..8].try_into().expect("8 bytes"));
        }
        Op::Write { .. } => {}
    }
}

/// Where a node's pool is, for building requests.
#[derive(Clone, Copy)]
struct RemoteKey {
    base: u64,
    rkey: u32,
}

/// The work request and scatter entry of `op` (its local side at `side`), numbered `wr_id`;
/// signaled when `signaled`. `staging` is the staging memory's address and key. The list
/// links (`next`, `sg_list`) are set by [`WrList::link`].
#[inline]
fn build_wr(
    op: &Op<'_>,
    side: LocalSide,
    wr_id: u64,
    signaled: bool,
    node: RemoteKey,
    staging: (u64, u32),
) -> (ibv_send_wr, ibv_sge) {
    let (addr, lkey) = match (op, side) {
        (_, LocalSide::Registered { addr, lkey }) => (addr, lkey),
        (_, LocalSide::Staged { offset }) => (staging.0 + offset as u64, staging.1),
        // Inline: the device copies the bytes at post time; no key is needed.
        (Op::Write { local, .. }, LocalSide::Inline) => (local.as_ptr() as u64, 0),
        _ => unreachable!("only writes go inline; skipped ops are not posted"),
    };
    let remote_addr = node.base + op.remote().offset();
    let mut flags = if signaled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
    // SAFETY: ibv_send_wr is a plain C struct; all-zero is its "empty" value.
    let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = wr_id;
    wr.num_sge = 1;
    match op {
        Op::Read { .. } => {
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            wr.wr.rdma = rdma_t { remote_addr, rkey: node.rkey };
        }
        Op::Write { .. } => {
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
            wr.wr.rdma = rdma_t { remote_addr, rkey: node.rkey };
            if matches!(side, LocalSide::Inline) {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
        }
        Op::CompareSwap { expected, new, .. } => {
            wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
            wr.wr.atomic = atomic_t { remote_addr, compare_add: *expected, swap: *new, rkey: node.rkey };
        }
        Op::FetchAdd { add, .. } => {
            wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
            wr.wr.atomic = atomic_t { remote_addr, compare_add: *add, swap: 0, rkey: node.rkey };
        }
    }
    wr.send_flags = flags;
    (wr, ibv_sge { addr, length: op.len() as u32, lkey })
}

/// An endpoint's storage for the work requests of one node's part of a round, reused by every
/// round (it grows to the largest round and stays).
#[derive(Default)]
struct WrList {
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
}

// SAFETY: the raw pointers inside the requests (`next`, `sg_list`) point into these vectors
// and are set by `link` right before a post; they are never dereferenced outside that call
// (the device copies the requests during ibv_post_send), so moving the list between threads
// with its endpoint is sound.
unsafe impl Send for WrList {}

impl WrList {
    /// Links the requests into a list (each to its scatter entry and the next request) now
    /// that neither vector moves any more; returns its head.
    fn link(&mut self) -> *mut ibv_send_wr {
        let n = self.wrs.len();
        let (wr_ptr, sge_ptr) = (self.wrs.as_mut_ptr(), self.sges.as_mut_ptr());
        for k in 0..n {
            // SAFETY: k and k + 1 index the vectors (k + 1 only when in bounds); both stay in
            // place until the post that follows returns, which copies the requests.
            unsafe {
                (*wr_ptr.add(k)).sg_list = sge_ptr.add(k);
                (*wr_ptr.add(k)).next = if k + 1 < n { wr_ptr.add(k + 1) } else { std::ptr::null_mut() };
            }
        }
        wr_ptr
    }
}

/// A failed request of a round: what it was, and what the device said.
#[derive(Clone, Copy)]
struct Failed {
    op: OpKind,
    addr: GlobalAddr,
    status: u32,
    vendor_err: u32,
}

impl Failed {
    fn of(op: OpKind, addr: GlobalAddr, wc: &ibv_wc) -> Failed {
        Failed { op, addr, status: wc.status, vendor_err: wc.vendor_err }
    }

    fn error(self) -> Error {
        let Failed { op, addr, status, vendor_err } = self;
        Error::Completion { op, addr, status: WcStatus::from_code(status), vendor_err }
    }
}

/// The failure to report of two: a flush is only the consequence of an earlier failure, so any
/// other status ranks before it; otherwise the first one stays.
fn better_failure(first: Option<Failed>, next: Failed) -> Option<Failed> {
    let flushed = |status: u32| status == WorkCompletionStatus::WorkRequestFlushedError as u32;
    match first {
        Some(f) if !flushed(f.status) || flushed(next.status) => Some(f),
        _ => Some(next),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_never_print_their_token_and_name_the_default_tenant() {
        let options = RdmaOptions {
            memnodes: vec!["10.0.0.1:7471".into()],
            token: "a-very-secret-token-value".into(),
            ..Default::default()
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("10.0.0.1:7471") && shown.contains("\"default\""), "{shown}");
        let bob = RdmaOptions { tenant: "bob".into(), ..options };
        assert_eq!(bob.tenant_name(), "bob");
    }
}
