//! The RDMA side of the async face ([`rdmem_core::aio`]): slots of registered memory, one
//! signaled work request per slot, one doorbell per node per [`Submit::ring`], completions
//! routed back by `wr_id`, and the completion channel for an idle driver to sleep on.
//!
//! A slot's `wr_id` is [`ASYNC_TAG`], its generation (bumped at every queue) and its index, so
//! a completion that arrives after its slot was failed early (a dead node, a deadline, a failed
//! post or poll) is recognised as stale and dropped, even if the slot is in use again.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    atomic_t, ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_poll_cq, ibv_req_notify_cq, ibv_send_flags, ibv_send_wr,
    ibv_sge, ibv_wr_opcode, rdma_t,
};
use rdmem_core::aio::{SlotOp, Submit, Wait};
use rdmem_core::{Error, GlobalAddr, LocalBuffer, OpKind, Result, WcStatus};
use rustix::event::{PollFd, PollFlags, Timespec};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue, WorkCompletionStatus};

use super::{BEHIND_TAG, MAX_TRANSFER, POLL_BATCH, RdmaBuffer, RdmaEndpoint};
use crate::error::RdmaError;
use crate::memory::{PageSize, Region};

/// The `wr_id` bit of async slots' requests (below [`BEHIND_TAG`]).
pub(super) const ASYNC_TAG: u64 = 1 << 62;

/// One slot: what is in flight in it.
struct SlotInfo {
    generation: u32,
    in_flight: bool,
    conn: usize,
    op: OpKind,
    remote: GlobalAddr,
    /// A buffer moved in for the flight (read_into/write_from); kept with the result until
    /// [`Submit::take_result`].
    buf: Option<RdmaBuffer>,
    /// How a finished flight failed (none: it succeeded), until [`Submit::take_result`].
    error: Option<Error>,
    /// When this slot's request was the signaled last of its doorbell: the unsignaled slots
    /// posted before it, which its successful completion completes too (RC completes in order).
    covers: Vec<u32>,
}

/// Every slot's work request and scatter entry, built once: queueing fills in the operation,
/// ringing links the queued ones into a list. (Boxed slices: they never move, so each request
/// points at its scatter entry for good.)
struct SlotRequests {
    wrs: Box<[ibv_send_wr]>,
    sges: Box<[ibv_sge]>,
}

// SAFETY: the raw pointers inside the requests point into the two boxed slices, which move
// with the struct (their heap memory stays put); they are dereferenced only by the post that
// follows the linking (the device copies the requests during ibv_post_send).
unsafe impl Send for SlotRequests {}

impl SlotRequests {
    fn new(slots: u32) -> Self {
        // SAFETY: ibv_send_wr is a plain C struct; all-zero is its "empty" value.
        let mut wrs: Box<[ibv_send_wr]> = (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut sges: Box<[ibv_sge]> = (0..slots).map(|_| ibv_sge { addr: 0, length: 0, lkey: 0 }).collect();
        for (wr, sge) in wrs.iter_mut().zip(sges.iter_mut()) {
            wr.sg_list = sge;
            wr.num_sge = 1;
        }
        SlotRequests { wrs, sges }
    }
}

/// An endpoint's async state: see the module docs.
pub(crate) struct AsyncSlots {
    memory: Region,
    /// The slots' memory: its address and key (read once: sideway's getters are calls).
    memory_addr: u64,
    lkey: u32,
    slot_bytes: usize,
    slots: Vec<SlotInfo>,
    requests: SlotRequests,
    /// Per connection: the slots queued since the last ring, in order.
    pending: Vec<Vec<u32>>,
    /// Per connection: slots in flight, and since when (the first stall check after its last
    /// completion: the clock is not read on the data path) nothing of theirs completed.
    in_flight: Vec<u32>,
    stalled_since: Vec<Option<Instant>>,
    /// Slots failed without a completion (failed post or poll, dead node, deadline), for the
    /// next reap.
    failed: Vec<u32>,
}

impl AsyncSlots {
    /// Ends slot `s`'s flight with `result` (kept for [`Submit::take_result`]); returns `s`.
    #[inline(always)]
    fn finish(&mut self, s: u32, result: Result<()>) -> u32 {
        let info = &mut self.slots[s as usize];
        info.in_flight = false;
        if let Err(e) = result {
            info.error = Some(e); // (none before: taken with the previous result)
        }
        // Its list stands for a doorbell that is over: a later use of the slot must not inherit it.
        info.covers.clear();
        self.in_flight[info.conn] -= 1;
        s
    }

    /// Fails every slot in flight to connection `c` with the error `make` builds.
    fn fail_conn(&mut self, c: usize, make: &dyn Fn(OpKind, GlobalAddr) -> Error) {
        // What was queued and not posted goes too: it is failed here, never posted.
        self.pending[c].clear();
        for s in 0..self.slots.len() as u32 {
            let info = &self.slots[s as usize];
            if info.in_flight && info.conn == c {
                let e = make(info.op, info.remote);
                let done = self.finish(s, Err(e));
                self.failed.push(done);
            }
        }
        self.stalled_since[c] = None;
    }
}

/// Sleeps on the endpoint's completion channel (see [`Wait`]).
pub struct RdmaWaiter {
    channel: Arc<CompletionChannel>,
    // Keeps the completion queue alive while an event for it may be read.
    _cq: Arc<BasicCompletionQueue>,
}

impl Wait for RdmaWaiter {
    fn wait(&mut self, timeout: Duration) -> bool {
        // SAFETY: the descriptor is the channel's, open while `self.channel` lives.
        let fd = unsafe { BorrowedFd::borrow_raw(self.channel.as_raw_fd()) };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let ts = Timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
        if !matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
            return false;
        }
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut context: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the channel is alive; the descriptor is non-blocking, so this returns at once
        // (-1 with EAGAIN when another reader took the event).
        let rc = unsafe { ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut cq, &mut context) };
        if rc == 0 {
            // SAFETY: `cq` is the completion queue the event was for (ours, alive: `_cq`).
            unsafe { ibv_ack_cq_events(cq, 1) };
        }
        rc == 0
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the descriptor is the channel's, open while `self.channel` lives (as the
        // borrow does).
        Some(unsafe { BorrowedFd::borrow_raw(self.channel.as_raw_fd()) })
    }
}

impl RdmaEndpoint {
    fn aio(&mut self) -> &mut AsyncSlots {
        self.aio.as_mut().expect("AsyncEndpoint opens the slots first")
    }

    /// Checks `op` and fills in `slot`'s work request for it (a new generation); returns its
    /// connection's index. The slot's memory or `buf` is its local side.
    #[inline(always)]
    fn build_slot_wr(&mut self, slot: u32, op: &SlotOp<'_, RdmaBuffer>) -> Result<usize> {
        op.validate(&self.shared.nodes, self.aio.as_ref().expect("slots").slot_bytes, MAX_TRANSFER)?;
        let (kind, remote) = match op {
            SlotOp::Read { remote, .. } | SlotOp::ReadInto { remote, .. } => (OpKind::Read, *remote),
            SlotOp::Write { remote, .. } | SlotOp::WriteFrom { remote, .. } => (OpKind::Write, *remote),
            SlotOp::CompareSwap { remote, .. } => (OpKind::CompareSwap, *remote),
            SlotOp::FetchAdd { remote, .. } => (OpKind::FetchAdd, *remote),
        };
        let c = self.conn_index(remote.node());
        self.check_usable(c)?;
        let conn = &self.conns[c];
        let (base, rkey, max_inline) = (conn.pool_base, conn.rkey, conn.limits.max_inline);
        let aio = self.aio.as_mut().expect("slots");
        let at = slot as usize * aio.slot_bytes;
        let (slot_addr, lkey) = (aio.memory_addr + at as u64, aio.lkey);
        let info = &mut aio.slots[slot as usize];
        let generation = info.generation.wrapping_add(1) & 0x3fff_ffff;
        info.covers.clear();
        info.generation = generation;
        info.conn = c;
        info.op = kind;
        info.remote = remote;
        let (wr, sge) = (&mut aio.requests.wrs[slot as usize], &mut aio.requests.sges[slot as usize]);
        wr.wr_id = ASYNC_TAG | (generation as u64) << 32 | slot as u64;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        let remote_addr = base + remote.offset();
        *sge = ibv_sge { addr: slot_addr, length: 8, lkey };
        match op {
            SlotOp::Read { len, .. } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = rdma_t { remote_addr, rkey };
                sge.length = *len as u32;
            }
            SlotOp::Write { src, .. } => {
                // Copied now: the caller's bytes are free once this returns, and inline
                // requests read their bytes at post time.
                aio.memory.as_mut_slice()[at..at + src.len()].copy_from_slice(src);
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = rdma_t { remote_addr, rkey };
                sge.length = src.len() as u32;
                if src.len() <= max_inline as usize {
                    wr.send_flags |= ibv_send_flags::IBV_SEND_INLINE.0;
                }
            }
            SlotOp::ReadInto { buf, range, .. } | SlotOp::WriteFrom { buf, range, .. } => {
                wr.opcode = if kind == OpKind::Read {
                    ibv_wr_opcode::IBV_WR_RDMA_READ
                } else {
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                wr.wr.rdma = rdma_t { remote_addr, rkey };
                *sge = ibv_sge {
                    addr: buf.region.addr() + range.start as u64,
                    length: range.len() as u32,
                    lkey: buf.key(),
                };
            }
            SlotOp::CompareSwap { expected, new, .. } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr.atomic = atomic_t { remote_addr, compare_add: *expected, swap: *new, rkey };
            }
            SlotOp::FetchAdd { add, .. } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr.atomic = atomic_t { remote_addr, compare_add: *add, swap: 0, rkey };
            }
        }
        Ok(c)
    }

    /// Counts `slot` in flight on connection `c`, holding `buf` until its completion.
    #[inline(always)]
    fn track(&mut self, slot: u32, c: usize, buf: Option<RdmaBuffer>) {
        let aio = self.aio();
        let info = &mut aio.slots[slot as usize];
        info.in_flight = true;
        // Both are empty here: taken with the previous result.
        debug_assert!(info.buf.is_none() && info.error.is_none());
        if buf.is_some() {
            info.buf = buf;
        }
        aio.in_flight[c] += 1;
    }

    /// Posts connection `c`'s queued requests as one list (one doorbell). A failed post stops
    /// the queue pair; the requests not posted fail at once, those posted come back flushed.
    fn ring_conn(&mut self, c: usize) {
        let aio = self.aio.as_mut().expect("slots");
        let slots = std::mem::take(&mut aio.pending[c]);
        let Some((&last, rest)) = slots.split_last() else {
            aio.pending[c] = slots;
            return;
        };
        // Linked in queue order. Only the last request is signaled: its completion stands for
        // the others, unless one fails (a failed request completes, signaled or not, and
        // flushes the rest).
        let wrs = aio.requests.wrs.as_mut_ptr();
        for (k, &s) in rest.iter().enumerate() {
            // SAFETY: slot ids index the boxed slice, which stays put until the post returns.
            unsafe {
                let wr = &mut *wrs.add(s as usize);
                wr.send_flags &= !ibv_send_flags::IBV_SEND_SIGNALED.0;
                wr.next = wrs.add(slots[k + 1] as usize);
            }
        }
        // SAFETY: as above.
        let first = unsafe {
            (*wrs.add(last as usize)).next = std::ptr::null_mut();
            wrs.add(slots[0] as usize)
        };
        let covers = &mut aio.slots[last as usize].covers;
        covers.clear();
        covers.extend_from_slice(rest);
        let posted = if std::mem::take(&mut self.post_fault) {
            self.conns[c].fail_post(12).map_err(|errno| (errno, None)) // ENOMEM
        } else {
            // SAFETY: the list is well formed (linked above, each request to its scatter entry);
            // its local memory is the slots' region or buffers the slots hold, both kept until
            // the slots' completions are reaped.
            unsafe { self.conns[c].post(first) }
        };
        let aio = self.aio.as_mut().expect("slots");
        if let Err((errno, bad)) = posted {
            // Requests from the one the device named (or all, if it named none) were not posted.
            let from = bad.and_then(|id| slots.iter().position(|&s| s == (id & 0xffff_ffff) as u32)).unwrap_or(0);
            for &s in &slots[from..] {
                let info = &aio.slots[s as usize];
                let e = Error::Post { op: info.op, addr: info.remote, errno };
                let done = aio.finish(s, Err(e));
                aio.failed.push(done);
            }
        }
        let mut slots = slots;
        slots.clear();
        aio.pending[c] = slots;
    }

    /// Hands the slots a completion finishes to `done` (none for a stale one); how many.
    fn slot_completions(&mut self, wc: &rdma_mummy_sys::ibv_wc, done: &mut impl FnMut(u32)) -> usize {
        let aio = self.aio.as_mut().expect("slots");
        let s = (wc.wr_id & 0xffff_ffff) as u32;
        let generation = ((wc.wr_id >> 32) & 0x3fff_ffff) as u32;
        let Some(info) = aio.slots.get(s as usize) else { return 0 };
        if !info.in_flight || info.generation != generation {
            return 0;
        }
        let (c, op, addr) = (info.conn, info.op, info.remote);
        aio.stalled_since[c] = None;
        // The unsignaled requests rung before it that are still in flight succeeded: a failed
        // one completes (signaled or not), and completions come in order. So they are done,
        // whatever this one's status.
        let mut covers = std::mem::take(&mut aio.slots[s as usize].covers);
        let mut n = 0;
        for &k in &covers {
            let info = &aio.slots[k as usize];
            if info.in_flight && info.conn == c {
                done(aio.finish(k, Ok(())));
                n += 1;
            }
        }
        covers.clear();
        aio.slots[s as usize].covers = covers;
        let result = if wc.status == WorkCompletionStatus::Success as u32 {
            Ok(())
        } else {
            self.conns[c].break_off();
            Err(Error::Completion { op, addr, status: WcStatus::from_code(wc.status), vendor_err: wc.vendor_err })
        };
        done(self.aio().finish(s, result));
        n + 1
    }
}

impl Submit for RdmaEndpoint {
    type Waiter = RdmaWaiter;

    fn open_slots(&mut self, slots: u32, slot_bytes: usize) -> Result<RdmaWaiter> {
        if let Some(conn) = self.conns.iter().find(|c| slots > c.limits.send_depth / 2) {
            return Err(Error::Config(format!(
                "{slots} async slots do not fit the send queue of {} ({} requests; at most half of it)",
                conn.peer, conn.limits.send_depth
            )));
        }
        let len = slots as usize * slot_bytes.next_multiple_of(8);
        let page = if len >= PageSize::Huge2M.bytes() { PageSize::Huge2M } else { PageSize::Normal };
        let memory = Region::new(&self.shared.pd, len, page, AccessFlags::LocalWrite).map_err(RdmaError::from)?;
        let n = self.conns.len();
        self.aio = Some(AsyncSlots {
            memory_addr: memory.addr(),
            lkey: memory.lkey(),
            memory,
            slot_bytes: slot_bytes.next_multiple_of(8),
            requests: SlotRequests::new(slots),
            slots: (0..slots)
                .map(|_| SlotInfo {
                    generation: 0,
                    in_flight: false,
                    conn: 0,
                    op: OpKind::Read,
                    remote: GlobalAddr::NULL,
                    buf: None,
                    error: None,
                    covers: Vec::with_capacity(slots as usize),
                })
                .collect(),
            pending: (0..n).map(|_| Vec::with_capacity(slots as usize)).collect(),
            in_flight: vec![0; n],
            stalled_since: vec![None; n],
            failed: Vec::new(),
        });
        Ok(RdmaWaiter { channel: Arc::clone(&self.channel), _cq: Arc::clone(&self.cq) })
    }

    fn queue(&mut self, slot: u32, op: SlotOp<'_, RdmaBuffer>) -> std::result::Result<(), (Error, Option<RdmaBuffer>)> {
        let built = self.build_slot_wr(slot, &op);
        let buf = op.into_buffer();
        let c = match built {
            Ok(c) => c,
            Err(e) => return Err((e, buf)),
        };
        self.aio().pending[c].push(slot);
        self.track(slot, c, buf);
        Ok(())
    }

    fn run_lone(
        &mut self,
        slot: u32,
        op: SlotOp<'_, RdmaBuffer>,
        polls: u32,
    ) -> std::result::Result<Option<(Result<()>, Option<RdmaBuffer>)>, (Error, Option<RdmaBuffer>)> {
        let built = self.build_slot_wr(slot, &op);
        let mut buf = op.into_buffer();
        let c = match built {
            Ok(c) => c,
            Err(e) => return Err((e, buf)),
        };
        // Posted alone, at once: a list of one (signaled, covering nothing).
        let wr: *mut ibv_send_wr = &mut self.aio().requests.wrs[slot as usize];
        // SAFETY: the slot's request, in the boxed slice; nothing else touches it meanwhile.
        let want = unsafe {
            (*wr).next = std::ptr::null_mut();
            (*wr).wr_id
        };
        let posted = if std::mem::take(&mut self.post_fault) {
            self.conns[c].fail_post(12).map_err(|errno| (errno, None)) // ENOMEM
        } else {
            // SAFETY: one well-formed request; its local memory is the slot's or `buf`'s, kept
            // until its completion (here, or by the slot's books once it is tracked).
            unsafe { self.conns[c].post(wr) }
        };
        if let Err((errno, _)) = posted {
            let info = &self.aio().slots[slot as usize];
            return Ok(Some((Err(Error::Post { op: info.op, addr: info.remote, errno }), buf)));
        }
        let mut tracked = false;
        for _ in 0..polls.max(1) {
            let n = self.poll_cq();
            if n == 0 {
                continue;
            }
            let wc = &self.wcs[0];
            if !tracked && n == 1 && wc.wr_id == want && wc.status == WorkCompletionStatus::Success as u32 {
                // The usual case, in short: its own successful completion, and nothing else.
                self.aio().stalled_since[c] = None;
                return Ok(Some((Ok(()), buf)));
            }
            // Anything else goes the general way, with this slot in the books.
            if !tracked {
                self.track(slot, c, buf.take());
                tracked = true;
            }
            let mut mine = false;
            self.handle_polled(n, &mut |s| mine |= s == slot);
            if mine {
                return Ok(Some(self.take_result(slot)));
            }
        }
        if !tracked {
            self.track(slot, c, buf);
        }
        Ok(None)
    }

    fn ring(&mut self) {
        for c in 0..self.conns.len() {
            self.ring_conn(c);
        }
    }

    fn reap(&mut self, mut done: impl FnMut(u32)) -> usize {
        let n = self.poll_cq();
        self.handle_polled(n, &mut done)
    }

    #[inline(always)]
    fn take_result(&mut self, slot: u32) -> (Result<()>, Option<RdmaBuffer>) {
        let info = &mut self.aio().slots[slot as usize];
        (info.error.take().map_or(Ok(()), Err), info.buf.take())
    }

    #[inline]
    fn slot_bytes(&self, slot: u32, len: usize) -> &[u8] {
        let aio = self.aio.as_ref().expect("slots");
        let at = slot as usize * aio.slot_bytes;
        &aio.memory.as_slice()[at..at + len]
    }

    #[inline]
    fn slot_word(&self, slot: u32) -> u64 {
        // The device stores atomics' old values in host order.
        u64::from_ne_bytes(self.slot_bytes(slot, 8).try_into().expect("8 bytes"))
    }

    fn arm(&mut self) -> Result<()> {
        // SAFETY: the completion queue is alive (`self.cq`).
        let rc = unsafe { ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(RdmaError::verbs("ibv_req_notify_cq", std::io::Error::from_raw_os_error(rc)).into())
        }
    }

    fn check_stalled(&mut self) {
        let now = Instant::now();
        let deadline = self.completion_deadline;
        for c in 0..self.conns.len() {
            if self.aio().in_flight[c] == 0 {
                continue;
            }
            let gone = self.conns[c].is_gone();
            let since = *self.aio().stalled_since[c].get_or_insert(now);
            if gone || now.saturating_duration_since(since) >= deadline {
                // Stop the device first: then the slots' memory is no longer written.
                self.conns[c].stop();
                let peer = self.conns[c].peer.clone();
                if gone {
                    self.aio().fail_conn(c, &|op, addr| Error::NodeGone { op, addr, peer: peer.clone() });
                } else {
                    self.aio().fail_conn(c, &|op, addr| Error::Timeout { op, addr, waited: deadline });
                }
            }
        }
    }
}

impl RdmaEndpoint {
    /// Polls the completion queue into `self.wcs`: how many it wrote, or a negative errno.
    fn poll_cq(&mut self) -> i32 {
        if std::mem::take(&mut self.poll_fault) {
            -5 // EIO
        } else {
            // SAFETY: the completion queue is alive (`self.cq`) and `self.wcs` has room for
            // POLL_BATCH completions, the most ibv_poll_cq writes.
            unsafe { ibv_poll_cq(self.cq.cq().as_ptr(), POLL_BATCH as i32, self.wcs.as_mut_ptr()) }
        }
    }

    /// Hands the slots that `n` polled completions (or a failed poll, `n` < 0) finished, and
    /// those failed without one, to `done`; how many.
    fn handle_polled(&mut self, n: i32, done: &mut impl FnMut(u32)) -> usize {
        let mut count = 0;
        if n < 0 {
            // The device may still write into the slots: stop every queue pair with requests in
            // flight first, then fail them.
            for c in 0..self.conns.len() {
                if self.aio().in_flight[c] > 0 {
                    self.conns[c].stop();
                    self.aio().fail_conn(c, &|op, addr| Error::Poll { op, addr, errno: -n });
                }
            }
        }
        for k in 0..n.max(0) as usize {
            let wc = self.wcs[k];
            if wc.wr_id & BEHIND_TAG != 0 {
                if let Some(c) = self.conns.iter().position(|c| c.qpn == wc.qp_num) {
                    self.write_behind_failed(c, &wc, false, &mut None);
                }
            } else if wc.wr_id & ASYNC_TAG != 0 {
                count += self.slot_completions(&wc, done);
            }
            // Anything else is a flush of an abandoned sync round: nothing waits for it.
        }
        // And the slots failed without a completion (here, or by a post or a stall check).
        while let Some(c) = self.aio().failed.pop() {
            done(c);
            count += 1;
        }
        count
    }
}
