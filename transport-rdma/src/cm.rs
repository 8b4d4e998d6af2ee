//! RDMA-CM (librdmacm, through `rdma-mummy-sys`): the connection manager that sets up every
//! queue pair between a client and a memory node, with private data ([`crate::cm_auth`]).
//!
//! The queue pairs stay ours (created with `queue_pair::create` on our own protection
//! domain); the CM only carries the exchange: the connect request names our queue pair number,
//! and the attributes it negotiated (the peer's queue pair, both starting packet sequence
//! numbers, which the kernel picks at random, and the path) come back from `rdma_init_qp_attr`
//! as a [`Negotiated`], which `queue_pair::connect` applies. That is librdmacm's
//! "queue pair not on the id" mode: the active side gets `CONNECT_RESPONSE` and answers with
//! `rdma_establish`.
//!
//! Every event is copied out and acknowledged at once ([`EventChannel::next`]), so an id can be
//! destroyed at any time (`rdma_destroy_id` waits for the acknowledgement of its events).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    ibv_get_device_name, ibv_qp_attr, ibv_qp_state, rdma_accept, rdma_ack_cm_event, rdma_bind_addr, rdma_cm_event,
    rdma_cm_event_type, rdma_cm_id, rdma_conn_param, rdma_connect, rdma_create_event_channel, rdma_create_id,
    rdma_destroy_event_channel, rdma_destroy_id, rdma_disconnect, rdma_establish, rdma_event_channel,
    rdma_get_cm_event, rdma_init_qp_attr, rdma_listen, rdma_port_space, rdma_reject, rdma_resolve_addr,
    rdma_resolve_route,
};

use crate::error::RdmaError;
use crate::wire::QpInfo;

/// The most private data an event carries (a reply's 196 bytes).
pub const MAX_PRIVATE_DATA: usize = 196;

/// What kind of event (librdmacm's `rdma_cm_event_type`).
pub type EventKind = rdma_cm_event_type::Type;
pub use rdma_cm_event_type::{
    RDMA_CM_EVENT_ADDR_ERROR as ADDR_ERROR, RDMA_CM_EVENT_ADDR_RESOLVED as ADDR_RESOLVED,
    RDMA_CM_EVENT_CONNECT_ERROR as CONNECT_ERROR, RDMA_CM_EVENT_CONNECT_REQUEST as CONNECT_REQUEST,
    RDMA_CM_EVENT_CONNECT_RESPONSE as CONNECT_RESPONSE, RDMA_CM_EVENT_DEVICE_REMOVAL as DEVICE_REMOVAL,
    RDMA_CM_EVENT_DISCONNECTED as DISCONNECTED, RDMA_CM_EVENT_ESTABLISHED as ESTABLISHED,
    RDMA_CM_EVENT_REJECTED as REJECTED, RDMA_CM_EVENT_ROUTE_ERROR as ROUTE_ERROR,
    RDMA_CM_EVENT_ROUTE_RESOLVED as ROUTE_RESOLVED, RDMA_CM_EVENT_TIMEWAIT_EXIT as TIMEWAIT_EXIT,
    RDMA_CM_EVENT_UNREACHABLE as UNREACHABLE,
};

/// The name librdmacm gives an event kind.
pub fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        ADDR_RESOLVED => "ADDR_RESOLVED",
        ADDR_ERROR => "ADDR_ERROR",
        ROUTE_RESOLVED => "ROUTE_RESOLVED",
        ROUTE_ERROR => "ROUTE_ERROR",
        CONNECT_REQUEST => "CONNECT_REQUEST",
        CONNECT_RESPONSE => "CONNECT_RESPONSE",
        CONNECT_ERROR => "CONNECT_ERROR",
        UNREACHABLE => "UNREACHABLE",
        REJECTED => "REJECTED",
        ESTABLISHED => "ESTABLISHED",
        DISCONNECTED => "DISCONNECTED",
        DEVICE_REMOVAL => "DEVICE_REMOVAL",
        TIMEWAIT_EXIT => "TIMEWAIT_EXIT",
        _ => "another event",
    }
}

struct ChannelRaw(*mut rdma_event_channel);

// SAFETY: an event channel is a file descriptor that librdmacm lets any thread use; ours is
// read by one owner at a time (`&self` methods only read events, which the kernel serialises).
unsafe impl Send for ChannelRaw {}
// SAFETY: as above: reads of events from several threads are serialised by the kernel.
unsafe impl Sync for ChannelRaw {}

impl Drop for ChannelRaw {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_event_channel; every id on it holds an Arc to it, so
        // they are all destroyed, and every event was acknowledged when it was read.
        unsafe { rdma_destroy_event_channel(self.0) };
    }
}

/// A non-blocking RDMA-CM event channel: the events of the ids created on it.
#[derive(Clone)]
pub struct EventChannel {
    raw: Arc<ChannelRaw>,
}

/// One event, copied out of librdmacm's (which is acknowledged already).
#[derive(Clone)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The event's status: an errno for errors, the CM's reject reason for `REJECTED`.
    pub status: i32,
    /// The id it is about (for `CONNECT_REQUEST`, a new id: [`EventChannel::adopt`] it).
    pub id: IdKey,
    private: [u8; MAX_PRIVATE_DATA],
    private_len: u8,
}

impl Event {
    /// The private data (the CM pads it with zeros to its message's size).
    pub fn private_data(&self) -> &[u8] {
        &self.private[..self.private_len as usize]
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (status {}, {} bytes of private data)", kind_name(self.kind), self.status, self.private_len)
    }
}

/// Which id an event is about: the id's address, compared, never dereferenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdKey(usize);

impl EventChannel {
    /// Opens a channel (`rdma_create_event_channel`), non-blocking.
    pub fn new() -> Result<EventChannel, RdmaError> {
        // SAFETY: no arguments; null on failure, with errno set.
        let raw = unsafe { rdma_create_event_channel() };
        if raw.is_null() {
            let e = std::io::Error::last_os_error();
            return Err(RdmaError::verbs(
                "rdma_create_event_channel",
                format!("{e} (is the rdma_ucm kernel module loaded, and /dev/infiniband/rdma_cm there?)"),
            ));
        }
        let channel = EventChannel { raw: Arc::new(ChannelRaw(raw)) };
        rustix::io::ioctl_fionbio(channel.as_fd(), true)
            .map_err(|e| RdmaError::verbs("setting the RDMA-CM event channel non-blocking", e))?;
        Ok(channel)
    }

    /// The next event, if one is waiting (never blocks).
    pub fn next(&self) -> Result<Option<Event>, RdmaError> {
        let mut raw: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is open; on success `raw` points to an event we own until acked.
        let rc = unsafe { rdma_get_cm_event(self.raw.0, &mut raw) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(RdmaError::verbs("rdma_get_cm_event", e)),
            };
        }
        // SAFETY: `raw` is a valid event until acknowledged below; for the connection events
        // its `param.conn` is the one filled (the others leave it zeroed).
        let event = unsafe {
            let ev = &*raw;
            let conn = &ev.param.conn;
            let len = usize::from(conn.private_data_len).min(MAX_PRIVATE_DATA);
            let mut private = [0u8; MAX_PRIVATE_DATA];
            if len > 0 && !conn.private_data.is_null() {
                ptr::copy_nonoverlapping(conn.private_data.cast::<u8>(), private.as_mut_ptr(), len);
            }
            let event = Event {
                kind: ev.event,
                status: ev.status,
                id: IdKey(ev.id as usize),
                private,
                private_len: if conn.private_data.is_null() { 0 } else { len as u8 },
            };
            rdma_ack_cm_event(raw);
            event
        };
        Ok(Some(event))
    }

    /// The next event, waiting until `deadline` (`None` when none came by then).
    pub fn wait(&self, deadline: Instant) -> Result<Option<Event>, RdmaError> {
        loop {
            if let Some(event) = self.next()? {
                return Ok(Some(event));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let fd = self.as_fd();
            let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
            let ts = rustix::event::Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(RdmaError::verbs("poll on the RDMA-CM event channel", e)),
            }
        }
    }

    /// Takes ownership of the new id of a `CONNECT_REQUEST` event read from this channel.
    ///
    /// # Safety
    /// `event` must be a `CONNECT_REQUEST` read from this channel, adopted once.
    pub unsafe fn adopt(&self, event: &Event) -> CmId {
        CmId { raw: event.id.0 as *mut rdma_cm_id, _channel: Arc::clone(&self.raw) }
    }
}

impl AsFd for EventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel's descriptor stays open while the channel lives.
        unsafe { BorrowedFd::borrow_raw((*self.raw.0).fd) }
    }
}

/// An RDMA-CM id (`rdma_cm_id`) of the TCP port space, destroyed on drop.
pub struct CmId {
    raw: *mut rdma_cm_id,
    /// Held: the channel outlives the ids on it.
    _channel: Arc<ChannelRaw>,
}

// SAFETY: librdmacm's id calls may come from any thread; each CmId has one owner, and what
// takes `&self` only reads the id (its key, addresses, device, negotiated attributes).
unsafe impl Send for CmId {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for CmId {}

/// What connection setup negotiated, for `queue_pair::connect`.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// The peer's queue pair and starting PSN, its LID and GID.
    pub remote: QpInfo,
    /// Our starting PSN (the one the CM sent the peer).
    pub local_psn: u32,
    /// The GID index of our side of the path.
    pub sgid_index: u8,
}

fn check(call: &'static str, rc: i32) -> Result<(), RdmaError> {
    if rc == 0 { Ok(()) } else { Err(RdmaError::verbs(call, std::io::Error::last_os_error())) }
}

/// A socket address as the `sockaddr_storage` librdmacm reads.
fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    storage
}

/// The address in a `sockaddr_storage`, if it is IPv4 or IPv6.
fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    let ptr = (storage as *const libc::sockaddr_storage).cast::<u8>();
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it holds a sockaddr_in, which it is aligned and sized for.
            let sin = unsafe { &*ptr.cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*ptr.cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

impl CmId {
    /// A new id on `channel` (`rdma_create_id`, `RDMA_PS_TCP`: reliable connections).
    pub fn new(channel: &EventChannel) -> Result<CmId, RdmaError> {
        let mut raw = ptr::null_mut();
        // SAFETY: the channel is open; `raw` receives the id.
        check("rdma_create_id", unsafe {
            rdma_create_id(channel.raw.0, &mut raw, ptr::null_mut(), rdma_port_space::RDMA_PS_TCP)
        })?;
        Ok(CmId { raw, _channel: Arc::clone(&channel.raw) })
    }

    /// This id's key, as events name it.
    pub fn key(&self) -> IdKey {
        IdKey(self.raw as usize)
    }

    /// Binds to a local address (`rdma_bind_addr`), for a listener.
    pub fn bind(&mut self, addr: SocketAddr) -> Result<(), RdmaError> {
        let mut sa = to_sockaddr(addr);
        // SAFETY: the id is live; `sa` is a valid address that outlives the call.
        check("rdma_bind_addr", unsafe { rdma_bind_addr(self.raw, (&mut sa as *mut libc::sockaddr_storage).cast()) })
    }

    /// Listens for connect requests (`rdma_listen`).
    pub fn listen(&mut self, backlog: i32) -> Result<(), RdmaError> {
        // SAFETY: the id is live and bound.
        check("rdma_listen", unsafe { rdma_listen(self.raw, backlog) })
    }

    /// Starts resolving `dst` to a device and port (`rdma_resolve_addr`; the answer is an
    /// `ADDR_RESOLVED` or `ADDR_ERROR` event).
    pub fn resolve_addr(&mut self, dst: SocketAddr, timeout: Duration) -> Result<(), RdmaError> {
        let mut sa = to_sockaddr(dst);
        // SAFETY: the id is live; `sa` outlives the call (librdmacm copies it).
        check("rdma_resolve_addr", unsafe {
            rdma_resolve_addr(
                self.raw,
                ptr::null_mut(),
                (&mut sa as *mut libc::sockaddr_storage).cast(),
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        })
    }

    /// Starts resolving the route (`rdma_resolve_route`; `ROUTE_RESOLVED` or `ROUTE_ERROR`).
    pub fn resolve_route(&mut self, timeout: Duration) -> Result<(), RdmaError> {
        // SAFETY: the id is live with its address resolved.
        check("rdma_resolve_route", unsafe {
            rdma_resolve_route(self.raw, timeout.as_millis().min(i32::MAX as u128) as i32)
        })
    }

    /// The local address (a bound listener's, with the port it got), if known.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as for `peer_addr`, the route's source.
        unsafe { from_sockaddr(&(*self.raw).route.addr.src_addr_union.src_storage) }
    }

    /// The peer's address (a connect request's source), if known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is live; the route's destination is a sockaddr_storage librdmacm
        // filled (or zeroed), read by its family.
        unsafe {
            let storage = &(*self.raw).route.addr.dst_addr_union.dst_storage;
            from_sockaddr(storage)
        }
    }

    /// The name of the device this id resolved to, if it has one yet.
    pub fn device_name(&self) -> Option<String> {
        // SAFETY: the id is live; `verbs` is null or librdmacm's open context of the device.
        unsafe {
            let verbs = (*self.raw).verbs;
            if verbs.is_null() || (*verbs).device.is_null() {
                return None;
            }
            let name = ibv_get_device_name((*verbs).device);
            (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
        }
    }

    /// Sends the connect request for our queue pair `qp_num` (`rdma_connect`).
    pub fn connect(&mut self, qp_num: u32, depth: u8, private: &[u8]) -> Result<(), RdmaError> {
        let mut param = conn_param(qp_num, depth, private)?;
        // SAFETY: the id is live with its route resolved; `param` and `private` outlive the call.
        check("rdma_connect", unsafe { rdma_connect(self.raw, &mut param) })
    }

    /// Accepts a connect request with our queue pair `qp_num` (`rdma_accept`).
    pub fn accept(&mut self, qp_num: u32, depth: u8, private: &[u8]) -> Result<(), RdmaError> {
        let mut param = conn_param(qp_num, depth, private)?;
        // SAFETY: the id is a connect request's; `param` and `private` outlive the call.
        check("rdma_accept", unsafe { rdma_accept(self.raw, &mut param) })
    }

    /// Rejects a connect request (`rdma_reject`).
    pub fn reject(&mut self, private: &[u8]) -> Result<(), RdmaError> {
        let len = u8::try_from(private.len()).map_err(|_| RdmaError::verbs("rdma_reject", "private data too long"))?;
        // SAFETY: the id is a connect request's; `private` outlives the call.
        check("rdma_reject", unsafe { rdma_reject(self.raw, private.as_ptr().cast(), len) })
    }

    /// Completes the active side once our queue pair is ready (`rdma_establish`).
    pub fn establish(&mut self) -> Result<(), RdmaError> {
        // SAFETY: the id got its CONNECT_RESPONSE.
        check("rdma_establish", unsafe { rdma_establish(self.raw) })
    }

    /// Ends the connection (`rdma_disconnect`); the peer gets `DISCONNECTED`.
    pub fn disconnect(&mut self) {
        // SAFETY: the id is live; disconnecting one that is not connected only fails.
        unsafe { rdma_disconnect(self.raw) };
    }

    /// What connection setup negotiated for our queue pair, once the peer's side is known
    /// (a connect request received, or a connect response).
    pub fn negotiated(&self) -> Result<Negotiated, RdmaError> {
        let rtr = self.qp_attr(ibv_qp_state::IBV_QPS_RTR, "rdma_init_qp_attr(RTR)")?;
        let rts = self.qp_attr(ibv_qp_state::IBV_QPS_RTS, "rdma_init_qp_attr(RTS)")?;
        let grh = &rtr.ah_attr.grh;
        Ok(Negotiated {
            remote: QpInfo {
                qpn: rtr.dest_qp_num,
                psn: rtr.rq_psn,
                lid: rtr.ah_attr.dlid,
                // SAFETY: both union members are plain bytes.
                gid: unsafe { grh.dgid.raw },
            },
            local_psn: rts.sq_psn,
            sgid_index: grh.sgid_index,
        })
    }

    fn qp_attr(&self, state: ibv_qp_state::Type, call: &'static str) -> Result<ibv_qp_attr, RdmaError> {
        // SAFETY: all zeros is a valid ibv_qp_attr; the id is live; librdmacm fills `attr`.
        unsafe {
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = state;
            let mut mask = 0;
            check(call, rdma_init_qp_attr(self.raw, &mut attr, &mut mask))?;
            Ok(attr)
        }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the id is live and ours; its events were acknowledged as they were read, so
        // this does not wait. A connected id sends the peer a disconnect.
        unsafe { rdma_destroy_id(self.raw) };
    }
}

fn conn_param(qp_num: u32, depth: u8, private: &[u8]) -> Result<rdma_conn_param, RdmaError> {
    let len = u8::try_from(private.len()).map_err(|_| RdmaError::verbs("rdma_connect", "private data too long"))?;
    Ok(rdma_conn_param {
        private_data: if private.is_empty() { ptr::null() } else { private.as_ptr().cast() },
        private_data_len: len,
        responder_resources: depth,
        initiator_depth: depth,
        flow_control: 1,
        retry_count: 7,
        rnr_retry_count: 7,
        srq: 0,
        qp_num,
    })
}

/// The socket address of `host:port` (the first one it resolves to, IPv4 first).
pub fn resolve(peer: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = peer.to_socket_addrs()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{peer} resolves to no address")))
}

/// What a memory node answered a [`probe`].
#[derive(Debug)]
pub enum ProbeAnswer {
    /// It accepted, with this private data. The connection stays half-open (accepted, never
    /// established) while `held` lives: the node drops it at its deadline, or when `held` is
    /// dropped (the kernel then rejects it).
    Accepted {
        /// The accept's private data.
        private: Vec<u8>,
        /// The probe's id.
        held: HalfOpen,
    },
    /// It (or the connection manager) rejected, with the CM's reason and the private data.
    Rejected {
        /// The IB CM reject reason (28: by the node; 8: nothing listens).
        status: i32,
        /// The reject's private data (a [`crate::cm_auth::Refusal`] from a memory node).
        private: Vec<u8>,
    },
    /// Something else ended it (an error event).
    Failed(Box<Event>),
    /// No answer by the deadline.
    TimedOut,
}

/// Sends one connect request with `private` as its private data (at most 56 bytes) to `addr`,
/// naming a queue pair that does not exist, and returns the answer without ever establishing
/// the connection. For tests and tools that check what a memory node does with requests of
/// their making (replays, garbage, other versions, floods); a client connects with
/// [`crate::RdmaTransport`].
pub fn probe(addr: SocketAddr, private: &[u8], timeout: Duration) -> Result<ProbeAnswer, RdmaError> {
    let deadline = Instant::now() + timeout;
    let channel = EventChannel::new()?;
    let mut id = CmId::new(&channel)?;
    id.resolve_addr(addr, timeout)?;
    for (want, next) in [(ADDR_RESOLVED, true), (ROUTE_RESOLVED, false)] {
        match channel.wait(deadline)? {
            Some(event) if event.kind == want => {}
            Some(event) => return Ok(ProbeAnswer::Failed(Box::new(event))),
            None => return Ok(ProbeAnswer::TimedOut),
        }
        if next {
            id.resolve_route(timeout)?;
        }
    }
    // Each probe names another queue pair number: the CM rejects a second request from the
    // same one as a stale connection while the first is half-open.
    let qp_num = NEXT_PROBE_QP_NUM.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0x00ff_ffff;
    id.connect(qp_num, 1, private)?;
    Ok(match channel.wait(deadline)? {
        Some(event) if event.kind == CONNECT_RESPONSE => {
            ProbeAnswer::Accepted { private: event.private_data().to_vec(), held: HalfOpen(id) }
        }
        Some(event) if event.kind == REJECTED => {
            ProbeAnswer::Rejected { status: event.status, private: event.private_data().to_vec() }
        }
        Some(event) => ProbeAnswer::Failed(Box::new(event)),
        None => ProbeAnswer::TimedOut,
    })
}

/// A probe's connection left half-open (see [`ProbeAnswer::Accepted`]).
pub struct HalfOpen(CmId);

impl std::fmt::Debug for HalfOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HalfOpen({:?})", self.0.key())
    }
}

/// The queue pair number the next [`probe`] names (none of ours: it is never connected).
static NEXT_PROBE_QP_NUM: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x00ab_0000);
