//! Memory windows: a remote key of its own for every client connection, revoked when it ends.
//!
//! The memory node registers each pool once, as a memory region that allows binding windows
//! but no remote access of its own: its key opens nothing to a peer, so guessing it (rxe's keys
//! carry 8 random bits) gains nothing. For every client connection it allocates a type-2
//! memory window, binds it over the whole pool with a work request posted on that client's
//! queue pair, and tells the client the window's key. The device then accepts the key only on
//! that queue pair (a type-2 window belongs to the queue pair it was bound on, IBTA C10-72 and
//! o10-37.2.26), so one client cannot use another's key, and a tenant cannot use another
//! tenant's (other protection domain). When the connection ends or the client is evicted the
//! window is deallocated, and its key opens nothing from then on.
//!
//! Devices without type-2 windows fall back to the region's own key, registered with remote
//! access, with a warning at start ([`WindowSupport::probe`]).

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    ibv_alloc_mw, ibv_dealloc_mw, ibv_mw, ibv_mw_bind_info, ibv_mw_type, ibv_poll_cq, ibv_post_send, ibv_send_flags,
    ibv_send_wr, ibv_wc, ibv_wc_status, ibv_wr_opcode,
};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::completion::{CompletionQueue, GenericCompletionQueue};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{ExtendedQueuePair, QueuePair};

use crate::error::RdmaError;
use crate::memory::Region;

/// How long a bind may take to complete (a local operation: microseconds on hardware,
/// milliseconds on a loaded rxe).
const BIND_DEADLINE: Duration = Duration::from_secs(5);
/// The `wr_id` of a bind request.
const BIND_TAG: u64 = 0xb1d0_0000_0000_0000;

/// Whether the node hands out memory windows or its regions' own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSupport {
    /// A type-2 window per connection; the regions give no remote access themselves.
    Windows,
    /// The device has no type-2 windows: every client of a tenant gets its region's key.
    RegionKey,
}

impl WindowSupport {
    /// Whether `pd`'s device can allocate a type-2 window (one is allocated and freed).
    pub fn probe(pd: &Arc<ProtectionDomain>) -> WindowSupport {
        match Window::alloc(pd) {
            Ok(_) => WindowSupport::Windows,
            Err(e) => {
                tracing::warn!(
                    "this device has no type-2 memory windows ({e}): every client of a tenant gets its pool's own \
                     remote key, which a client keeps after it disconnects or is evicted"
                );
                WindowSupport::RegionKey
            }
        }
    }

    /// How a pool must be registered: windows carry the remote access, or the region does.
    pub fn region_access(self) -> AccessFlags {
        let remote = AccessFlags::RemoteRead | AccessFlags::RemoteWrite | AccessFlags::RemoteAtomic;
        match self {
            WindowSupport::Windows => AccessFlags::LocalWrite | AccessFlags::MemoryWindowBind,
            WindowSupport::RegionKey => AccessFlags::LocalWrite | remote,
        }
    }
}

/// A type-2 memory window, deallocated (and its key revoked) when dropped. It holds its
/// protection domain (and so the device context) alive until then.
pub(crate) struct Window {
    mw: NonNull<ibv_mw>,
    rkey: u32,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an ibv_mw handle may be used and freed from any thread (verbs objects are
// thread-safe); `Window` holds it exclusively.
unsafe impl Send for Window {}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window").field("rkey", &format_args!("{:#x}", self.rkey)).finish()
    }
}

impl Window {
    /// Allocates an unbound type-2 window on `pd`.
    pub(crate) fn alloc(pd: &Arc<ProtectionDomain>) -> Result<Window, RdmaError> {
        // SAFETY: the PD is alive for the call; a window keeps its own reference in the kernel.
        let mw = unsafe { ibv_alloc_mw(pd.pd().as_ptr(), ibv_mw_type::IBV_MW_TYPE_2) };
        let Some(mw) = NonNull::new(mw) else {
            return Err(RdmaError::verbs("ibv_alloc_mw(type 2)", std::io::Error::last_os_error()));
        };
        // SAFETY: a window just allocated.
        let rkey = unsafe { mw.as_ref().rkey };
        Ok(Window { mw, rkey, _pd: Arc::clone(pd) })
    }

    /// Binds the window over all of `pool` with remote READ, WRITE and atomics, by a signaled
    /// work request on `qp` (in RTS), whose completion is waited for on `cq` (which must have
    /// no other completions coming: the node posts nothing else, and other completions found
    /// there are dropped). Returns the key, which only `qp`'s peer can use.
    pub(crate) fn bind(
        &mut self,
        qp: &mut ExtendedQueuePair,
        cq: &GenericCompletionQueue,
        pool: &Region,
    ) -> Result<u32, RdmaError> {
        // A new key on every bind (the low byte is the consumer's): a stale copy of an earlier
        // binding's key does not open the new one.
        let rkey = (self.rkey & !0xff) | (self.rkey.wrapping_add(1) & 0xff);
        let access = AccessFlags::RemoteRead | AccessFlags::RemoteWrite | AccessFlags::RemoteAtomic;
        // SAFETY: ibv_send_wr is a plain C struct; all-zero is its "empty" value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = BIND_TAG | u64::from(qp.qp_number());
        wr.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.bind_mw_tso_union.bind_mw = rdma_mummy_sys::bind_mw_t {
            mw: self.mw.as_ptr(),
            rkey,
            bind_info: ibv_mw_bind_info {
                // SAFETY: the pool's region is alive for the call.
                mr: unsafe { pool.raw_mr() },
                addr: pool.addr(),
                length: pool.len() as u64,
                mw_access_flags: access.bits() as _,
            },
        };
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the request and what it points to live for the call; the window and region
        // outlive the binding (the window is dropped before its region: see the node's client).
        let rc = unsafe { ibv_post_send(qp.qp().as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(RdmaError::verbs("ibv_post_send(BIND_MW)", std::io::Error::from_raw_os_error(rc)));
        }
        let deadline = Instant::now() + BIND_DEADLINE;
        // SAFETY: ibv_wc is a plain C struct; all-zero is a valid value.
        let mut wc: ibv_wc = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: the CQ is alive; one entry is written at most.
            let n = unsafe { ibv_poll_cq(cq.cq().as_ptr(), 1, &mut wc) };
            if n < 0 {
                return Err(RdmaError::verbs("ibv_poll_cq", std::io::Error::from_raw_os_error(-n)));
            }
            if n == 1 && wc.wr_id == wr.wr_id {
                break;
            }
            if n == 1 {
                // Not ours (nothing else is posted): an old client's flushed request, say.
                continue;
            }
            if Instant::now() >= deadline {
                return Err(RdmaError::verbs("memory window bind", format!("no completion within {BIND_DEADLINE:?}")));
            }
            std::thread::yield_now();
        }
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            return Err(RdmaError::verbs(
                "memory window bind",
                format!("completion status {} (vendor error {:#x})", wc.status, wc.vendor_err),
            ));
        }
        self.rkey = rkey;
        Ok(rkey)
    }

    /// The key of the current binding.
    pub(crate) fn rkey(&self) -> u32 {
        self.rkey
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the window is ours and dropped once; deallocating invalidates its key.
        let rc = unsafe { ibv_dealloc_mw(self.mw.as_ptr()) };
        if rc != 0 {
            tracing::warn!("ibv_dealloc_mw failed ({rc}): window key {:#x} may stay valid", self.rkey);
        }
    }
}
