//! The async face of an endpoint: many operations in flight from one thread, on any executor.
//!
//! [`AsyncEndpoint`] wraps one thread's endpoint. Its methods ([`read`](AsyncEndpoint::read),
//! [`write`](AsyncEndpoint::write), [`cas`](AsyncEndpoint::cas), [`faa`](AsyncEndpoint::faa),
//! [`read_into`](AsyncEndpoint::read_into), [`write_from`](AsyncEndpoint::write_from) and
//! [`batch`](AsyncEndpoint::batch)) return futures that complete when the operation's work
//! completion arrives. It needs no particular runtime: tokio, smol, `futures`' executors or the
//! minimal [`block_on`] here all drive it.
//!
//! ```
//! use rdmem_core::aio::{AsyncEndpoint, block_on};
//! use rdmem_core::{GlobalAddr, LoopbackTransport, NodeId, Transport};
//!
//! let transport = LoopbackTransport::new(&[1 << 20]);
//! let ep = AsyncEndpoint::new(transport.endpoint()?)?;
//! let counter = GlobalAddr::new(NodeId(0), 64).unwrap();
//! block_on(async {
//!     // Two operations in flight at once, posted with one doorbell.
//!     let (a, b) = (ep.faa(counter, 1), ep.faa(counter, 1));
//!     let (a, b) = join(a, b).await;
//!     assert_eq!(a? + b?, 1); // the old values were 0 and 1
//!     assert_eq!(ep.read_u64(counter).await?, 2);
//!     Ok::<_, rdmem_core::Error>(())
//! })?;
//! # async fn join<A: std::future::Future, B: std::future::Future>(a: A, b: B) -> (A::Output, B::Output) {
//! #     let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
//! #     let (mut ra, mut rb) = (None, None);
//! #     std::future::poll_fn(|cx| {
//! #         if ra.is_none() { if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) { ra = Some(v) } }
//! #         if rb.is_none() { if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) { rb = Some(v) } }
//! #         if ra.is_some() && rb.is_some() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
//! #     }).await;
//! #     (ra.unwrap(), rb.unwrap())
//! # }
//! # Ok::<(), rdmem_core::Error>(())
//! ```
//!
//! # Slots, and why dropping a future is safe
//! An async endpoint has a fixed number of *slots* ([`AsyncOptions::slots`]), each with
//! [`AsyncOptions::slot_bytes`] of the transport's registered memory. Every operation in flight
//! holds one; a future that finds none free waits for one (so any number of futures may be
//! pending: thousands from one thread are fine). The device only ever touches memory the
//! endpoint owns:
//! - [`read`](AsyncEndpoint::read) lands in the slot's memory and is copied into your `&mut [u8]`
//!   when the future completes; [`write`](AsyncEndpoint::write) copies your bytes into the slot
//!   (or sends them inline) when it is posted. Both are limited to `slot_bytes`.
//! - [`read_into`](AsyncEndpoint::read_into) and [`write_from`](AsyncEndpoint::write_from) move
//!   a registered buffer into the endpoint for the flight (zero-copy, any length) and hand it
//!   back with the result.
//!
//! **Cancellation rule.** Dropping a future before it completes never frees or exposes memory
//! the device may still write: its slot (and a buffer it moved in) stays with the endpoint until
//! the completion arrives, then is recycled (the buffer is dropped). Your `&mut [u8]` is not
//! written after the drop. The operation itself may or may not take effect, as with any
//! operation whose outcome is not awaited. Dropping the `AsyncEndpoint` waits for nothing: the
//! transport stops its queue pairs before it frees any memory (with the default helper thread,
//! it may wait up to 100 ms for that thread). A future dropped before its operation was posted
//! has it posted at once.
//!
//! **Keep polling what you start.** One waiting future polls the completion queue for all of
//! them. If its task stops polling it (say a `select` returned the other branch and the first
//! is kept for later), another future of the same endpoint takes the driving over when it is
//! polled twice with no progress in between; a future held unpolled in one task can still hold
//! up futures of *other* tasks on the same endpoint until it is polled or dropped.
//!
//! # Doorbells and completions
//! An operation's future is queued on its first poll and yields once
//! ([`AsyncOptions::coalesce`]), so that every future the executor polls in the same pass is
//! posted together, with one doorbell per node; with many in flight, new ones are posted when
//! the device is about to run dry (no more posted than waiting). An operation alone on the
//! endpoint is posted and polled for in place, and once yields stop gathering company (one
//! operation at a time) it skips the yield too. All of them
//! share the endpoint's one completion queue; each completion wakes the future of its slot
//! (routed by `wr_id`). One waiting future at a time polls the completion queue (the *driver*);
//! it busy-polls for [`AsyncOptions::spin`] after the last completion, then arms the completion
//! queue's notification and sleeps. So a burst of operations costs no system call beyond the
//! doorbells, and an endpoint with nothing to do costs no CPU.
//!
//! # Sleeping: a helper thread, or your executor's reactor
//! By default ([`AsyncEndpoint::new`]) a helper thread of the endpoint waits on the completion
//! channel's descriptor and wakes the sleeping future. [`AsyncEndpoint::with_reactor`] hands
//! the descriptor to the executor's reactor instead (any runtime, through the small
//! [`Reactor`] and [`Readable`] traits; `TokioReactor`, behind this crate's `tokio` feature,
//! uses tokio's `AsyncFd`), with a timer descriptor for the idle checks (every 100 ms a
//! sleeping driver looks for dead nodes and deadlines), and no thread is started.
//! [`AsyncEndpoint::sleeps`] and [`AsyncEndpoint::event_wakes`] count the sleeps and those a
//! completion ended. A reactor whose watchers fail makes the driver poll instead of sleeping.
//!
//! # Threads
//! An `AsyncEndpoint` belongs to one thread (it is `Send`, not `Sync`), and its futures borrow
//! it, so they stay on that thread: use a current-thread runtime, a `LocalSet`, or one endpoint
//! per task. Make one per thread from the same transport, as with [`Endpoint`]s.
//!
//! # Failure
//! The same as for the sync face ([`crate::endpoint`]): bad arguments fail without posting
//! anything; a failed completion breaks the endpoint's connection to that node
//! ([`Error::Broken`] afterwards) and the operations in flight to it fail too (their
//! completions are flushed). A memory node that vanishes fails its operations with
//! [`Error::NodeGone`], a completion that never comes with [`Error::Timeout`] (both checked while
//! the driver waits).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::addr::GlobalAddr;
use crate::endpoint::{Endpoint, NodeInfo, validate};
use crate::error::{Error, OpKind, Result, WcStatus};

mod idle;
#[cfg(feature = "tokio")]
pub use idle::TokioReactor;
use idle::{Idle, IdleThread, ReactorIdle};
pub use idle::{Reactor, Readable};

/// The most slots an endpoint may have: half of a queue pair's send queue, so that slots and
/// the sync face's write-behinds always find room.
pub const MAX_SLOTS: u32 = 128;

/// Coalescing yields in a row that gathered no other operation before lone operations skip
/// theirs (see [`AsyncOptions::coalesce`]).
const LONE_STREAK: u32 = 16;

/// Reaps a driver makes at most after one that found completions, while they keep finding some.
const MORE_REAPS: u32 = 8;

/// Of the lone operations that skip the coalescing yield, about one in this many yields anyway.
const PROBE_ONE_IN: u32 = 32;

/// How long a sleeping driver waits for the completion channel (on the helper thread or in the
/// reactor) before it is woken anyway, so that dead nodes and deadlines are checked while
/// nothing completes.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// One operation as the async face hands it to a transport.
#[derive(Debug)]
pub enum SlotOp<'a, B> {
    /// READ `len` bytes at `remote` into the slot's memory.
    Read {
        /// Where to read.
        remote: GlobalAddr,
        /// How many bytes (at most the slot size).
        len: usize,
    },
    /// WRITE `src` to `remote`; the transport copies `src` (or sends it inline) before
    /// [`Submit::queue`] returns.
    Write {
        /// Where to write.
        remote: GlobalAddr,
        /// The bytes (at most the slot size).
        src: &'a [u8],
    },
    /// READ into `buf[range]`, in place; the transport keeps `buf` until the completion.
    ReadInto {
        /// Where to read.
        remote: GlobalAddr,
        /// The registered buffer, moved in.
        buf: B,
        /// The part of it that receives the bytes.
        range: Range<usize>,
    },
    /// WRITE `buf[range]` from where it is; the transport keeps `buf` until the completion.
    WriteFrom {
        /// Where to write.
        remote: GlobalAddr,
        /// The registered buffer, moved in.
        buf: B,
        /// The part of it to write.
        range: Range<usize>,
    },
    /// Compare-and-swap; the old value goes to the slot ([`Submit::slot_word`]).
    CompareSwap {
        /// The word.
        remote: GlobalAddr,
        /// Compared with.
        expected: u64,
        /// Stored on a match.
        new: u64,
    },
    /// Fetch-and-add; the old value goes to the slot ([`Submit::slot_word`]).
    FetchAdd {
        /// The word.
        remote: GlobalAddr,
        /// The addend.
        add: u64,
    },
}

impl<B> SlotOp<'_, B> {
    /// The buffer a `ReadInto` or `WriteFrom` moved in (for a transport that refuses it).
    pub fn into_buffer(self) -> Option<B> {
        match self {
            SlotOp::ReadInto { buf, .. } | SlotOp::WriteFrom { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

impl<B: std::ops::Deref<Target = [u8]>> SlotOp<'_, B> {
    /// Checks the operation as every transport must before queueing it ([`Op::validate`]'s
    /// rules): a moved-in buffer's range inside the buffer, the remote range on a known node
    /// and inside its pool, atomics aligned, and a transfer through the slot's memory at most
    /// `slot_bytes` (one through a buffer at most `max_transfer`).
    ///
    /// [`Op::validate`]: crate::Op::validate
    #[inline]
    pub fn validate(&self, nodes: &[NodeInfo], slot_bytes: usize, max_transfer: u64) -> Result<()> {
        let small = slot_bytes as u64;
        let (kind, remote, len, max) = match self {
            SlotOp::Read { remote, len } => (OpKind::Read, *remote, *len as u64, small),
            SlotOp::Write { remote, src } => (OpKind::Write, *remote, src.len() as u64, small),
            SlotOp::ReadInto { remote, buf, range } | SlotOp::WriteFrom { remote, buf, range } => {
                if range.start > range.end || range.end > buf.len() {
                    return Err(Error::LocalRange { start: range.start, end: range.end, len: buf.len() });
                }
                let kind = if matches!(self, SlotOp::ReadInto { .. }) { OpKind::Read } else { OpKind::Write };
                (kind, *remote, range.len() as u64, max_transfer)
            }
            SlotOp::CompareSwap { remote, .. } => (OpKind::CompareSwap, *remote, 8, 8),
            SlotOp::FetchAdd { remote, .. } => (OpKind::FetchAdd, *remote, 8, 8),
        };
        validate(kind, remote, len, nodes, max)
    }
}

/// Waits until an endpoint's completion queue has news (after [`Submit::arm`]): on the helper
/// thread, or (with [`AsyncEndpoint::with_reactor`]) called with a zero timeout on the
/// executor's thread to take the events the reactor saw, so `wait(Duration::ZERO)` must return
/// at once, and false once no event is left. Transports give one from [`Submit::open_slots`].
pub trait Wait: Send + 'static {
    /// Waits until the armed completion queue signals, or `timeout` passes; true when it
    /// signaled. Consumes (and acknowledges) the event.
    fn wait(&mut self, timeout: Duration) -> bool;

    /// The completion channel's descriptor (non-blocking), readable when an event is there,
    /// for a [`Reactor`] to watch; `None` (the default) for a transport without one (then only
    /// the idle checks, every 100 ms, wake a driver sleeping in a reactor: override it).
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// The non-blocking face of an endpoint that [`AsyncEndpoint`] drives. Transports implement it;
/// users call [`AsyncEndpoint`].
///
/// The contract: a slot given to [`Submit::queue`] is reported exactly once by
/// [`Submit::reap`] (completed, or failed); until then the transport keeps the slot's memory
/// and any buffer moved in, and never reuses them. The slot's result and buffer then stay with
/// the transport until [`Submit::take_result`] takes them, before the slot is queued again.
pub trait Submit: Endpoint {
    /// What the helper thread waits on.
    type Waiter: Wait;

    /// Sets up `slots` slots of `slot_bytes` registered bytes each (once per endpoint).
    fn open_slots(&mut self, slots: u32, slot_bytes: usize) -> Result<Self::Waiter>;

    /// Validates `op` and queues it in `slot` (not yet posted). On error nothing is queued and
    /// a buffer moved in comes back.
    fn queue(
        &mut self,
        slot: u32,
        op: SlotOp<'_, Self::Buffer>,
    ) -> std::result::Result<(), (Error, Option<Self::Buffer>)>;

    /// Posts everything queued: one doorbell per node. A post that fails is reported through
    /// [`Submit::reap`] for each slot it concerned.
    fn ring(&mut self);

    /// Hands every newly finished slot to `done`; returns how many.
    fn reap(&mut self, done: impl FnMut(u32)) -> usize;

    /// How finished `slot` went, and the buffer its operation moved in (once per finish).
    fn take_result(&mut self, slot: u32) -> (Result<()>, Option<Self::Buffer>);

    /// The latency path of a lone operation: posts what is queued, which is `slot`'s operation
    /// and nothing else (nothing else is in flight either), and polls for its completion up to
    /// `polls` times. True once it finished (its result is then taken with
    /// [`Submit::take_result`]; [`Submit::reap`] does not report it), false while it is in flight
    /// (`reap` reports it later, as usual). The default rings and reaps; a transport may do less.
    fn ring_lone(&mut self, slot: u32, polls: u32) -> bool {
        self.ring();
        for _ in 0..polls.max(1) {
            let mut mine = false;
            self.reap(|s| mine |= s == slot);
            if mine {
                return true;
            }
        }
        false
    }

    /// [`Submit::queue`] and [`Submit::ring_lone`] in one, for an operation alone on the
    /// endpoint from the start: its result if it finished within `polls` polls, `None` while it
    /// is in flight ([`Submit::reap`] reports it later), or why it was refused (nothing posted;
    /// a buffer moved in comes back). The default is those two calls.
    #[allow(clippy::type_complexity, reason = "queue's refusal, or the result")]
    fn run_lone(
        &mut self,
        slot: u32,
        op: SlotOp<'_, Self::Buffer>,
        polls: u32,
    ) -> std::result::Result<Option<(Result<()>, Option<Self::Buffer>)>, (Error, Option<Self::Buffer>)> {
        self.queue(slot, op)?;
        Ok(self.ring_lone(slot, polls).then(|| self.take_result(slot)))
    }

    /// The first `len` bytes of a finished READ's slot.
    fn slot_bytes(&self, slot: u32, len: usize) -> &[u8];

    /// The old value of a finished atomic's slot.
    fn slot_word(&self, slot: u32) -> u64;

    /// Asks for a completion event at the next completion (the [`Wait`] sees it).
    fn arm(&mut self) -> Result<()>;

    /// Fails what is in flight to a node that is gone or past the completion deadline (reported
    /// by the next [`Submit::reap`]). Called while the driver waits; cheap enough to call often.
    fn check_stalled(&mut self);
}

/// Tuning of an [`AsyncEndpoint`].
#[derive(Debug, Clone)]
pub struct AsyncOptions {
    /// Operations in flight at once (1 to [`MAX_SLOTS`]; default 128). More futures than this
    /// wait for a slot.
    pub slots: u32,
    /// Registered bytes per slot: the longest [`AsyncEndpoint::read`] and
    /// [`AsyncEndpoint::write`] (default 4096; at least 8). Longer transfers go through
    /// [`AsyncEndpoint::read_into`] and [`AsyncEndpoint::write_from`].
    pub slot_bytes: usize,
    /// How long the driver busy-polls after the last completion before it sleeps on the
    /// completion channel (default 500 us): long enough to cover a round trip, short enough that
    /// an idle endpoint stops spinning soon.
    pub spin: Duration,
    /// Whether a future yields to the executor once before posting, so that the futures the
    /// executor polls in one pass share one doorbell (default true). On Soft-RoCE an operation
    /// on one machine often completes inside its doorbell's system call, so without this,
    /// futures in flight together are posted, and complete, one by one. The yield adapts: once
    /// 16 yields in a row gathered no other operation (one operation at a time, as a loop of
    /// awaits does), an operation alone on the endpoint skips it, but for about one in 32
    /// (picked at random), which notices when others come along again. `false` never yields.
    pub coalesce: bool,
    /// Completion-queue polls the waiting driver makes in a row before it lets the executor run
    /// other tasks (default 32; at least 1): more sees a completion sooner, fewer shares the
    /// thread more finely.
    pub inline_polls: u32,
}

impl Default for AsyncOptions {
    fn default() -> Self {
        AsyncOptions {
            slots: MAX_SLOTS,
            slot_bytes: 4096,
            spin: Duration::from_micros(500),
            coalesce: true,
            inline_polls: 32,
        }
    }
}

/// Where a slot stands. (Plain values: a queued slot's waker is in [`Inner::wakers`], a done
/// one's result with the transport, so a change of state is one store.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Held by a future, nothing queued in it yet (or its result taken).
    Claimed,
    /// Queued or posted; its future's waker (registered when it last returned pending) is in
    /// [`Inner::wakers`].
    Queued,
    /// Completed, result (still with the transport: [`Submit::take_result`]) not taken yet.
    Done,
    /// Its future was dropped while it was in flight: recycled at its completion.
    Orphan,
}

/// A completed slot's result, and the buffer its operation moved in.
type Finished<B> = (Result<()>, Option<B>);

struct Inner<E: Submit> {
    ep: E,
    slots: Vec<Slot>,
    /// Per slot: the waker of a queued slot's future.
    wakers: Vec<Option<Waker>>,
    free: Vec<u32>,
    /// Futures waiting for free slots, in order, with an id so a dropped one can leave.
    claimers: VecDeque<(u64, Waker)>,
    next_claimer: u64,
    /// Wakers to call once the endpoint is no longer borrowed (a waker may poll at once), in
    /// order ([`AsyncEndpoint::wake_pending`]). Kept here so that waking allocates nothing.
    wakes: VecDeque<Waker>,
    /// Operations queued and not yet posted.
    unrung: u32,
    /// Doorbells rung (calls of [`Submit::ring`] that had something to post).
    rings: u64,
    /// Steps of driving so far: a waiting future that sees no step between two of its polls
    /// takes the driving over (the driver's task may not be polling it).
    drives: u64,
    /// When the driver last checked for dead nodes and deadlines.
    last_check: Option<Instant>,
    /// The slot whose future polls the completion queue.
    driver: Option<u32>,
    in_flight: u32,
    /// Empty reaps since the last completion, and when the first of them was.
    empty_reaps: u32,
    idle_since: Option<Instant>,
    /// Times the driver went to sleep on the completion channel.
    sleeps: u64,
    /// The driver went to sleep and has not run since.
    asleep: bool,
    /// Yields in a row (of operations alone on the endpoint) that gathered no other operation
    /// ([`Inner::skip_yield`]), and the state of the generator that picks the probing ones.
    lone_yields: u32,
    probe_state: u32,
    options: AsyncOptions,
}

/// What one step of driving the completion queue did.
enum Drive {
    /// Completions arrived (their futures are woken).
    Progress,
    /// Nothing yet; still spinning.
    Spin,
    /// Nothing for a while: the completion queue is armed and the idle sleeper ([`Idle`]) waits.
    Sleep,
}

impl<E: Submit> Inner<E> {
    /// Takes the completions (waking their futures, recycling orphans).
    fn reap(&mut self) -> usize {
        let Inner { ep, slots, wakers, free, in_flight, wakes, driver, .. } = self;
        let before = free.len();
        let n = ep.reap(|slot| {
            let s = slot as usize;
            match slots[s] {
                Slot::Queued => {
                    // The driver is being polled right now, and looks at its own slot next.
                    if let Some(w) = wakers[s].take().filter(|_| *driver != Some(slot)) {
                        wakes.push_back(w);
                    }
                    slots[s] = Slot::Done;
                    *in_flight -= 1;
                }
                Slot::Orphan => {
                    slots[s] = Slot::Free;
                    *in_flight -= 1;
                    free.push(slot);
                }
                _ => {
                    // Not ours to complete (a transport bug): leave it as it was.
                    tracing::error!("async endpoint: completion for slot {s}, which is not in flight");
                }
            }
        });
        if n > 0 {
            self.saw_completion();
            let freed = self.free.len() - before;
            if freed > 0 {
                // Orphans: their results (and buffers) are dropped.
                for k in before..self.free.len() {
                    drop(self.ep.take_result(self.free[k]));
                }
                self.wake_claimers(freed);
            }
        }
        n
    }

    /// Something completed: the driver's spin starts over.
    #[inline]
    fn saw_completion(&mut self) {
        self.empty_reaps = 0;
        self.idle_since = None;
    }

    /// Wakes up to `n` futures waiting for slots.
    #[inline]
    fn wake_claimers(&mut self, n: usize) {
        if self.claimers.is_empty() {
            return;
        }
        for _ in 0..n {
            match self.claimers.pop_front() {
                Some((_, waker)) => self.wakes.push_back(waker),
                None => break,
            }
        }
    }

    /// Posts what is queued when the device is about to run dry: when no more requests are
    /// posted and unfinished than wait to be posted. With many in flight, completions trickle
    /// in one at a time, and so do their replacements: waiting until half the window is queued
    /// posts them with one doorbell (one system call on Soft-RoCE), while a lone operation
    /// (nothing posted) goes at once.
    fn ring_if_due(&mut self) {
        let posted = self.in_flight.saturating_sub(self.unrung);
        if self.unrung > 0 && posted <= self.unrung {
            self.ring();
        }
    }

    fn ring(&mut self) {
        if self.unrung > 0 {
            self.unrung = 0;
            self.rings += 1;
            self.ep.ring();
        }
    }

    /// One step of driving: takes completions, and when there were none for `spin`, arms the
    /// completion queue and sleeps ([`Idle`]: the helper thread or the reactor wakes `waker`).
    fn drive(&mut self, waker: &Waker, idle: &Idle) -> Drive {
        self.drives = self.drives.wrapping_add(1);
        if std::mem::take(&mut self.asleep) {
            idle.woken(waker);
        }
        self.ring_if_due();
        // Polls in a row before going back to the executor: a round trip through it costs
        // many polls' worth, so a completion is seen sooner, and the executor still runs others
        // every few microseconds.
        for _ in 0..self.options.inline_polls.max(1) {
            if self.reap() > 0 {
                // Take what else has arrived too (a reap takes a few at a time), so that one
                // executor pass sees them all, and their successors share a doorbell.
                for _ in 0..MORE_REAPS {
                    if self.reap() == 0 {
                        break;
                    }
                }
                return Drive::Progress;
            }
            self.empty_reaps = self.empty_reaps.wrapping_add(1);
            // The clock costs about a microsecond in a VM, as much as a dozen polls: read it
            // only every 256 empty polls (a round trip usually ends before the first), and
            // count the spin from there.
            if self.empty_reaps % 256 == 0 {
                break;
            }
        }
        if self.empty_reaps % 256 != 0 {
            return Drive::Spin;
        }
        self.drive_slowly(waker, idle)
    }

    /// The part of [`Inner::drive`] that reads the clock: stall checks, and going to sleep.
    #[cold]
    fn drive_slowly(&mut self, waker: &Waker, idle: &Idle) -> Drive {
        let now = Instant::now();
        // Dead nodes and deadlines are checked while others still complete too (every 100 ms).
        if self.last_check.is_none_or(|t| now.saturating_duration_since(t) >= IDLE_CHECK) {
            self.last_check = Some(now);
            self.ep.check_stalled();
        }
        let since = *self.idle_since.get_or_insert(now);
        if now.saturating_duration_since(since) < self.options.spin {
            return Drive::Spin;
        }
        self.ring(); // nothing may stay unposted while the driver sleeps
        self.last_check = Some(now);
        self.ep.check_stalled();
        if self.ep.arm().is_err() {
            return Drive::Spin; // cannot sleep: keep polling
        }
        // A completion between the last reap and arming raises no event: look once more.
        if self.reap() > 0 {
            return Drive::Progress;
        }
        if !idle.sleep(waker) {
            return Drive::Progress; // woken already: look again (and arm again to sleep)
        }
        self.asleep = true;
        self.sleeps += 1;
        Drive::Sleep
    }

    /// Claims `n` free slots (all at once, so batches cannot deadlock on each other) for the
    /// claimer whose place in the queue is `place`. Without enough, it takes or keeps its place
    /// (its waker refreshed) and, if nobody drives, drives: slots free only when someone reaps.
    #[inline(always)]
    fn claim(
        &mut self,
        n: usize,
        place: &mut Option<u64>,
        cx: &mut Context<'_>,
        idle: &Idle,
    ) -> Option<SmallVec<[u32; 4]>> {
        if n == 1 && place.is_none() {
            // The common case, first poll of a single operation: nothing to leave.
            if let Some(s) = self.free.pop() {
                self.slots[s as usize] = Slot::Claimed;
                if !self.free.is_empty() {
                    self.wake_claimers(1); // others may fit in what is left
                }
                return Some(smallvec::smallvec![s]);
            }
        }
        // Ids only grow, so the queue is sorted by id; a wake for free slots took it out.
        let at = place.and_then(|mine| self.claimers.binary_search_by_key(&mine, |(i, _)| *i).ok());
        if self.free.len() >= n {
            if let Some(at) = at {
                self.claimers.remove(at);
            }
            *place = None;
            let from = self.free.len() - n;
            let ids: SmallVec<[u32; 4]> = self.free.drain(from..).collect();
            for &s in &ids {
                self.slots[s as usize] = Slot::Claimed;
            }
            if !self.free.is_empty() {
                self.wake_claimers(1); // others may fit in what is left
            }
            return Some(ids);
        }
        match at {
            Some(at) => {
                let waker = &mut self.claimers[at].1;
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
            }
            None => {
                let mine = self.next_claimer;
                self.next_claimer += 1;
                self.claimers.push_back((mine, cx.waker().clone()));
                *place = Some(mine);
            }
        }
        if self.driver.is_none() && self.in_flight > 0 {
            match self.drive(cx.waker(), idle) {
                Drive::Sleep => {}
                Drive::Progress | Drive::Spin => cx.waker().wake_by_ref(),
            }
        }
        None
    }

    /// A claim dropped while it waits: gives up its place, and a slot freed for it goes on.
    fn withdraw(&mut self, place: Option<u64>) {
        let Some(mine) = place else { return };
        if let Ok(at) = self.claimers.binary_search_by_key(&mine, |(i, _)| *i) {
            self.claimers.remove(at);
        }
        if !self.free.is_empty() {
            self.wake_claimers(1);
        }
    }

    /// Marks claimed `slot` as queued (the transport took its operation).
    #[inline]
    fn queued(&mut self, slot: u32) {
        self.slots[slot as usize] = Slot::Queued;
        self.in_flight += 1;
        self.unrung += 1;
    }

    /// A future lets `slot` go: in flight, it stays with the endpoint as an orphan (posted now
    /// if it was only queued, not at some later doorbell behind younger operations) until its
    /// completion; otherwise (claimed, or done and not taken: a buffer in it is dropped) it is
    /// free again at once.
    #[inline]
    fn release(&mut self, slot: u32) {
        let s = slot as usize;
        if self.slots[s] == Slot::Queued {
            self.slots[s] = Slot::Orphan;
            self.wakers[s] = None;
            self.ring();
        } else {
            if self.slots[s] == Slot::Done {
                drop(self.ep.take_result(slot)); // a buffer in it is dropped
            }
            self.slots[s] = Slot::Free;
            self.free.push(slot);
            self.wake_claimers(1);
        }
        self.resign(slot);
    }

    /// The result of completed `slot`; with `keep`, the slot stays claimed by its future (whose
    /// results are still in its memory), otherwise it is free again. (Its memory may be read
    /// until the endpoint's borrow ends either way: nothing else queues in between.)
    #[inline(always)]
    fn take_done(&mut self, slot: u32, keep: bool) -> Finished<E::Buffer> {
        debug_assert_eq!(self.slots[slot as usize], Slot::Done);
        let done = self.ep.take_result(slot);
        self.settle(slot, keep);
        done
    }

    /// Whether an operation alone on the endpoint skips the coalescing yield: once
    /// [`LONE_STREAK`] yields in a row gathered nobody (one operation at a time, as a loop of
    /// awaits does), it is only a cost. One lone operation in [`PROBE_ONE_IN`], picked at
    /// random (so that no burst size keeps missing them), still yields, to notice when others
    /// come along again.
    fn skip_yield(&mut self) -> bool {
        if self.lone_yields < LONE_STREAK {
            return false;
        }
        // xorshift32: cheap, and deterministic per endpoint.
        let mut x = self.probe_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.probe_state = x;
        x % PROBE_ONE_IN != 0
    }

    /// A slot whose result was taken: still claimed with `keep`, otherwise free.
    #[inline(always)]
    fn settle(&mut self, slot: u32, keep: bool) {
        if keep {
            self.slots[slot as usize] = Slot::Claimed;
        } else {
            self.slots[slot as usize] = Slot::Free;
            self.free.push(slot);
            self.wake_claimers(1);
        }
        self.resign(slot);
    }

    /// If `slot` was the driver, hands the driving to another waiting future.
    #[inline]
    fn resign(&mut self, slot: u32) {
        if self.driver == Some(slot) {
            self.driver = None;
            if self.in_flight > 0 {
                self.hand_over();
            }
        }
    }

    #[cold]
    fn hand_over(&mut self) {
        let waiting = self.slots.iter().zip(&self.wakers).find_map(|(s, w)| match (s, w) {
            (Slot::Queued, Some(w)) => Some(w.clone()),
            _ => None,
        });
        // Only orphans left in flight: a future waiting for a slot drives (it stays first).
        let next = waiting.or_else(|| self.claimers.front().map(|(_, w)| w.clone()));
        self.wakes.extend(next);
    }

    /// Remembers `cx`'s waker as the one to wake at `slot`'s completion (a future returning
    /// pending: whoever reaps the completion wakes it, even if it drives now, since another may
    /// take the driving over).
    #[inline]
    fn register(&mut self, slot: u32, cx: &Context<'_>) {
        let s = slot as usize;
        if self.slots[s] == Slot::Queued && !self.wakers[s].as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.wakers[s] = Some(cx.waker().clone());
        }
    }

    /// Polls for queued `slot`'s completion: ready once it is done (take its result with
    /// [`Inner::take_done`]).
    #[inline(always)]
    fn poll_slot(&mut self, slot: u32, wait: &mut Waiting, cx: &mut Context<'_>, idle: &Idle) -> Poll<()> {
        if self.slots[slot as usize] == Slot::Done {
            return Poll::Ready(());
        }
        let alone = self.in_flight == 1 && self.unrung == 1;
        if !wait.yielded {
            wait.yielded = true;
            if self.unrung > 0 && self.options.coalesce {
                // Let the other futures of this executor pass queue theirs, so one doorbell
                // posts them all.
                wait.yielded_alone = alone;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        } else if std::mem::take(&mut wait.yielded_alone) {
            self.lone_yields = if alone { self.lone_yields.saturating_add(1) } else { 0 };
        }
        // Only here, after the yield, is anything posted, so the futures of one pass go
        // together when the first of them is polled again.
        if alone {
            // Alone (only this one is queued, and nothing else in flight): post it and poll for
            // it in place, without the driver's bookkeeping.
            self.unrung = 0;
            self.rings += 1;
            self.drives = self.drives.wrapping_add(1);
            if self.ep.ring_lone(slot, self.options.inline_polls) {
                self.in_flight -= 1;
                self.saw_completion();
                self.slots[slot as usize] = Slot::Done;
                return Poll::Ready(());
            }
        }
        self.ring_if_due();
        if self.driver.is_some_and(|d| d != slot) {
            // The driver polls for everyone, unless it made no step since this future's last
            // poll: its task may be holding it without polling it (a select that returned the
            // other branch, say). Then this one drives.
            if wait.drives_seen != Some(self.drives) {
                self.register(slot, cx);
                // The first time, look again after one more pass, so that a task that polls only
                // this future finds out.
                if wait.drives_seen.replace(self.drives).is_none() {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
        }
        self.driver = Some(slot);
        match self.drive(cx.waker(), idle) {
            Drive::Sleep => {
                self.register(slot, cx);
                Poll::Pending
            }
            Drive::Progress | Drive::Spin => {
                if self.slots[slot as usize] == Slot::Done {
                    return Poll::Ready(());
                }
                self.register(slot, cx);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// A waiting future's own state, kept between its polls.
#[derive(Default)]
struct Waiting {
    /// It yielded once already (coalescing).
    yielded: bool,
    /// It yielded while it was the only operation queued or in flight (to see whether the
    /// yield gathered others).
    yielded_alone: bool,
    /// The driver's step count at its last poll as a non-driver.
    drives_seen: Option<u64>,
}

/// One thread's endpoint with an async face. See the [module docs](self).
pub struct AsyncEndpoint<E: Submit> {
    inner: RefCell<Inner<E>>,
    idle: Idle,
}

impl<E: Submit> AsyncEndpoint<E> {
    /// Wraps `ep` with the default [`AsyncOptions`].
    pub fn new(ep: E) -> Result<Self> {
        Self::with_options(ep, AsyncOptions::default())
    }

    /// Wraps `ep`. Fails for `slots` outside 1..=[`MAX_SLOTS`] or `slot_bytes` below 8
    /// ([`Error::Config`]), or when the transport cannot register the slots' memory. An idle
    /// driver sleeps on a helper thread of the endpoint ([module docs](self)).
    pub fn with_options(ep: E, options: AsyncOptions) -> Result<Self> {
        Self::build(ep, options, |waiter| Ok(Idle::Thread(IdleThread::start(waiter)?)))
    }

    /// Wraps `ep`, with an idle driver sleeping through the executor's reactor instead of a
    /// helper thread: `reactor` watches the completion channel's descriptor (where the transport
    /// has one) and a timer for the idle checks, and wakes the sleeping future's task itself. No
    /// thread is started. With tokio (this crate's `tokio` feature), make the endpoint inside
    /// the runtime:
    ///
    /// ```ignore
    /// let ep = AsyncEndpoint::with_reactor(transport.endpoint()?, AsyncOptions::default(), &TokioReactor)?;
    /// ```
    ///
    /// Fails as [`AsyncEndpoint::with_options`] does, and with [`Error::Config`] when the
    /// reactor refuses a descriptor (for tokio: no runtime here, or one without IO).
    pub fn with_reactor(ep: E, options: AsyncOptions, reactor: &dyn Reactor) -> Result<Self> {
        Self::build(ep, options, |waiter| Ok(Idle::Reactor(RefCell::new(ReactorIdle::new(waiter, reactor)?))))
    }

    fn build(mut ep: E, options: AsyncOptions, idle: impl FnOnce(E::Waiter) -> Result<Idle>) -> Result<Self> {
        if options.slots == 0 || options.slots > MAX_SLOTS {
            return Err(Error::Config(format!(
                "AsyncOptions::slots is {}; it must be 1 to {MAX_SLOTS}",
                options.slots
            )));
        }
        if options.slot_bytes < 8 || options.slot_bytes > 1 << 30 {
            return Err(Error::Config(format!(
                "AsyncOptions::slot_bytes is {}; it must be 8 to 2^30",
                options.slot_bytes
            )));
        }
        let waiter = ep.open_slots(options.slots, options.slot_bytes)?;
        let n = options.slots;
        let inner = Inner {
            ep,
            slots: vec![Slot::Free; n as usize],
            wakers: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            claimers: VecDeque::new(),
            next_claimer: 0,
            wakes: VecDeque::new(),
            unrung: 0,
            rings: 0,
            drives: 0,
            last_check: None,
            driver: None,
            in_flight: 0,
            empty_reaps: 0,
            idle_since: None,
            sleeps: 0,
            asleep: false,
            lone_yields: 0,
            probe_state: 0x9e37_79b9,
            options,
        };
        Ok(AsyncEndpoint { inner: RefCell::new(inner), idle: idle(waiter)? })
    }

    /// The memory nodes this endpoint reaches.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.inner.borrow().ep.nodes().to_vec()
    }

    /// A registered buffer of `len` zeroed bytes, for [`AsyncEndpoint::read_into`] and
    /// [`AsyncEndpoint::write_from`]. Slow (it registers memory): allocate once and reuse.
    pub fn buffer(&self, len: usize) -> Result<E::Buffer> {
        self.inner.borrow_mut().ep.buffer(len)
    }

    /// How many times a waiting future went to sleep on the completion channel (after
    /// [`AsyncOptions::spin`] without a completion) instead of polling.
    pub fn sleeps(&self) -> u64 {
        self.inner.borrow().sleeps
    }

    /// How many of those sleeps a completion event ended (the others ended at an idle check,
    /// every 100 ms, which looks for dead nodes and deadlines).
    pub fn event_wakes(&self) -> u64 {
        self.idle.event_wakes()
    }

    /// Posts a compare-and-swap that nobody waits for (its slot is recycled when it completes),
    /// for a release from a `Drop`, which cannot await. Fails when no slot is free or the
    /// operation is refused.
    #[doc(hidden)]
    pub fn post_detached_cas(&self, addr: GlobalAddr, expected: u64, new: u64) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        let Some(slot) = inner.free.pop() else {
            return Err(Error::TooManyOps { ops: 1, slots: 0 });
        };
        if let Err((e, _)) = inner.ep.queue(slot, SlotOp::CompareSwap { remote: addr, expected, new }) {
            inner.free.push(slot);
            return Err(e);
        }
        inner.queued(slot);
        inner.slots[slot as usize] = Slot::Orphan;
        inner.ring();
        Ok(())
    }

    /// How many doorbells were rung: operations over doorbells is the batching achieved.
    pub fn doorbells(&self) -> u64 {
        self.inner.borrow().rings
    }

    /// The options in use.
    pub fn options(&self) -> AsyncOptions {
        self.inner.borrow().options.clone()
    }

    /// READs `dst.len()` bytes (at most [`AsyncOptions::slot_bytes`]) at `src` into `dst`.
    pub fn read<'a>(&'a self, src: GlobalAddr, dst: &'a mut [u8]) -> impl Future<Output = Result<()>> + 'a {
        OpFuture::new(self, Single::Read { remote: src, dst }, Outcome::unit)
    }

    /// WRITEs `src` (at most [`AsyncOptions::slot_bytes`]) to `dst`. The bytes are taken when
    /// the operation is posted.
    pub fn write<'a>(&'a self, dst: GlobalAddr, src: &'a [u8]) -> impl Future<Output = Result<()>> + 'a {
        OpFuture::new(self, Single::Write { remote: dst, src }, Outcome::unit)
    }

    /// READs the 8-byte little-endian word at `addr`.
    pub fn read_u64(&self, addr: GlobalAddr) -> impl Future<Output = Result<u64>> + '_ {
        OpFuture::new(self, Single::ReadWord { remote: addr }, Outcome::word)
    }

    /// WRITEs `value` as an 8-byte little-endian word at `addr`.
    pub fn write_u64(&self, addr: GlobalAddr, value: u64) -> impl Future<Output = Result<()>> + '_ {
        OpFuture::new(self, Single::WriteWord { remote: addr, value: value.to_le_bytes() }, Outcome::unit)
    }

    /// Compare-and-swap on the 8-byte word at `addr`; returns the value it held before.
    pub fn cas(&self, addr: GlobalAddr, expected: u64, new: u64) -> impl Future<Output = Result<u64>> + '_ {
        OpFuture::new(self, Single::CompareSwap { remote: addr, expected, new }, Outcome::word)
    }

    /// Fetch-and-add (wrapping) on the 8-byte word at `addr`; returns the value it held before.
    pub fn faa(&self, addr: GlobalAddr, add: u64) -> impl Future<Output = Result<u64>> + '_ {
        OpFuture::new(self, Single::FetchAdd { remote: addr, add }, Outcome::word)
    }

    /// READs `range.len()` bytes at `src` into `buf[range]`, in place (no copy, any length up to
    /// the transport's limit). The buffer comes back with the result; if the future is dropped
    /// in flight, the buffer is dropped once the device is done with it.
    pub fn read_into(
        &self,
        src: GlobalAddr,
        buf: E::Buffer,
        range: Range<usize>,
    ) -> impl Future<Output = (Result<()>, E::Buffer)> + '_ {
        OpFuture::new(self, Single::ReadInto { remote: src, buf: Some(buf), range }, Outcome::buffer)
    }

    /// WRITEs `buf[range]` to `dst` from where it is; the buffer comes back with the result
    /// (see [`AsyncEndpoint::read_into`]).
    pub fn write_from(
        &self,
        dst: GlobalAddr,
        buf: E::Buffer,
        range: Range<usize>,
    ) -> impl Future<Output = (Result<()>, E::Buffer)> + '_ {
        OpFuture::new(self, Single::WriteFrom { remote: dst, buf: Some(buf), range }, Outcome::buffer)
    }

    /// Starts a batch: operations posted together (one doorbell per node) and awaited together.
    pub fn batch<'b>(&self) -> AsyncBatch<'_, 'b, E> {
        AsyncBatch { ep: self, ops: SmallVec::new() }
    }

    /// Validates an operation on a slot's memory (the transport checks again).
    fn check(&self, op: OpKind, addr: GlobalAddr, len: usize) -> Result<()> {
        let inner = self.inner.borrow();
        validate(op, addr, len as u64, inner.ep.nodes(), inner.options.slot_bytes as u64)
    }

    /// Waits for `n` free slots (all at once, so batches cannot deadlock on each other).
    fn claim(&self, n: usize) -> Claim<'_, E> {
        Claim { ep: self, n, id: None }
    }

    fn queue(&self, slots: &Slots<'_, E>, k: usize, op: SlotOp<'_, E::Buffer>) -> Result<()> {
        self.inner.borrow_mut().ep.queue(slots.ids[k], op).map_err(|(e, _)| e)?;
        self.mark_queued(slots, k);
        Ok(())
    }

    fn mark_queued(&self, slots: &Slots<'_, E>, k: usize) {
        self.inner.borrow_mut().queued(slots.ids[k]);
    }

    /// Waits for slot `k` of `slots` to complete (the slot stays claimed: its results are read
    /// when the whole batch is done).
    async fn wait(&self, slots: &Slots<'_, E>, k: usize) -> (Result<()>, Option<E::Buffer>) {
        let slot = slots.ids[k];
        let mut wait = Waiting::default();
        std::future::poll_fn(|cx| {
            self.with(|inner| inner.poll_slot(slot, &mut wait, cx, &self.idle).map(|()| inner.take_done(slot, true)))
        })
        .await
    }

    /// Runs `f` on the borrowed state, then calls the wakers it left ([`Inner::wakes`]).
    #[inline]
    fn with<T>(&self, f: impl FnOnce(&mut Inner<E>) -> T) -> T {
        let mut inner = self.inner.borrow_mut();
        let out = f(&mut inner);
        let woke = !inner.wakes.is_empty();
        drop(inner);
        if woke {
            self.wake_pending();
        }
        out
    }

    /// [`AsyncEndpoint::with`] for a `Drop`, which may run while the endpoint is borrowed (a
    /// future dropped by a waker): then it does nothing.
    fn try_with(&self, f: impl FnOnce(&mut Inner<E>)) {
        let woke = match self.inner.try_borrow_mut() {
            Ok(mut inner) => {
                f(&mut inner);
                !inner.wakes.is_empty()
            }
            Err(_) => return,
        };
        if woke {
            self.wake_pending();
        }
    }

    /// Calls the wakers left in [`Inner::wakes`], in order, with the endpoint not borrowed (a
    /// waker may poll a future of this endpoint at once; what that leaves is called here too).
    #[cold]
    fn wake_pending(&self) {
        loop {
            let next = match self.inner.try_borrow_mut() {
                Ok(mut inner) => inner.wakes.pop_front(),
                Err(_) => return, // called inside a borrow: its owner calls them
            };
            match next {
                Some(w) => w.wake(),
                None => return,
            }
        }
    }

    /// Posts what is queued now (a batch does not wait for other futures).
    fn ring(&self) {
        self.inner.borrow_mut().ring();
    }
}

impl<E: Submit> Drop for AsyncEndpoint<E> {
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        inner.ring(); // queued by futures since dropped: they run, as posted ones do
    }
}

/// A single operation's parameters, and where its result goes.
enum Single<'a, B> {
    Read { remote: GlobalAddr, dst: &'a mut [u8] },
    ReadWord { remote: GlobalAddr },
    Write { remote: GlobalAddr, src: &'a [u8] },
    WriteWord { remote: GlobalAddr, value: [u8; 8] },
    CompareSwap { remote: GlobalAddr, expected: u64, new: u64 },
    FetchAdd { remote: GlobalAddr, add: u64 },
    ReadInto { remote: GlobalAddr, buf: Option<B>, range: Range<usize> },
    WriteFrom { remote: GlobalAddr, buf: Option<B>, range: Range<usize> },
}

/// What a single operation ended with, before its method's output is made of it.
enum Outcome<B> {
    Unit(Result<()>),
    Word(Result<u64>),
    Buffer(Result<()>, B),
}

impl<B> Outcome<B> {
    fn unit(self) -> Result<()> {
        match self {
            Outcome::Unit(r) | Outcome::Buffer(r, _) => r,
            Outcome::Word(r) => r.map(|_| ()),
        }
    }

    fn word(self) -> Result<u64> {
        match self {
            Outcome::Word(r) => r,
            Outcome::Unit(r) | Outcome::Buffer(r, _) => r.map(|()| 0),
        }
    }

    fn buffer(self) -> (Result<()>, B) {
        match self {
            Outcome::Buffer(r, b) => (r, b),
            _ => unreachable!("only buffer operations end with a buffer"),
        }
    }
}

enum Stage {
    /// Not polled yet, or waiting for a slot (with its place among the claimers).
    Start(Option<u64>),
    /// Queued in this slot, and how its waiting stands.
    Flight(u32, Waiting),
    Finished,
}

/// The future of one operation: claims a slot, queues the operation, waits for its completion
/// and copies its result out, with one borrow of the endpoint per poll. (Written out by hand:
/// every nanosecond here is on the latency path.)
struct OpFuture<'a, E: Submit, F> {
    ep: &'a AsyncEndpoint<E>,
    op: Single<'a, E::Buffer>,
    stage: Stage,
    /// Makes the method's output (a closure: called directly, not through a pointer).
    output: F,
}

impl<'a, E: Submit, F> OpFuture<'a, E, F> {
    fn new(ep: &'a AsyncEndpoint<E>, op: Single<'a, E::Buffer>, output: F) -> Self {
        OpFuture { ep, op, stage: Stage::Start(None), output }
    }

    /// The operation as the transport takes it (a buffer moves in).
    fn slot_op<'s>(op: &'s mut Single<'a, E::Buffer>) -> SlotOp<'s, E::Buffer> {
        match op {
            Single::Read { remote, dst } => SlotOp::Read { remote: *remote, len: dst.len() },
            Single::ReadWord { remote } => SlotOp::Read { remote: *remote, len: 8 },
            Single::Write { remote, src } => SlotOp::Write { remote: *remote, src },
            Single::WriteWord { remote, value } => SlotOp::Write { remote: *remote, src: &value[..] },
            Single::CompareSwap { remote, expected, new } => {
                SlotOp::CompareSwap { remote: *remote, expected: *expected, new: *new }
            }
            Single::FetchAdd { remote, add } => SlotOp::FetchAdd { remote: *remote, add: *add },
            Single::ReadInto { remote, buf, range } => {
                SlotOp::ReadInto { remote: *remote, buf: buf.take().expect("queued once"), range: range.clone() }
            }
            Single::WriteFrom { remote, buf, range } => {
                SlotOp::WriteFrom { remote: *remote, buf: buf.take().expect("queued once"), range: range.clone() }
            }
        }
    }

    /// A zero-length transfer: validated, and done without a slot.
    fn empty(&self) -> Option<(OpKind, GlobalAddr)> {
        match &self.op {
            Single::Read { remote, dst: [] } => Some((OpKind::Read, *remote)),
            Single::Write { remote, src: [] } => Some((OpKind::Write, *remote)),
            _ => None,
        }
    }

    /// The outcome of a failure before or at queueing (a moved-in buffer comes back).
    fn failed(op: &mut Single<'a, E::Buffer>, e: Error, buf: Option<E::Buffer>) -> Outcome<E::Buffer> {
        match op {
            Single::ReadInto { buf: mine, .. } | Single::WriteFrom { buf: mine, .. } => {
                Outcome::Buffer(Err(e), buf.or_else(|| mine.take()).expect("the buffer comes back"))
            }
            Single::CompareSwap { .. } | Single::FetchAdd { .. } | Single::ReadWord { .. } => Outcome::Word(Err(e)),
            _ => Outcome::Unit(Err(e)),
        }
    }

    /// The outcome of a completion: results copied out of the slot.
    #[inline(always)]
    fn completed(
        op: &mut Single<'a, E::Buffer>,
        ep: &E,
        slot: u32,
        result: Result<()>,
        buf: Option<E::Buffer>,
    ) -> Outcome<E::Buffer> {
        match op {
            Single::ReadInto { .. } | Single::WriteFrom { .. } => {
                Outcome::Buffer(result, buf.expect("the transport hands a moved-in buffer back"))
            }
            Single::Read { dst, .. } => {
                Outcome::Unit(result.map(|()| dst.copy_from_slice(ep.slot_bytes(slot, dst.len()))))
            }
            Single::ReadWord { .. } => {
                Outcome::Word(result.map(|()| u64::from_le_bytes(ep.slot_bytes(slot, 8).try_into().expect("8 bytes"))))
            }
            Single::CompareSwap { .. } | Single::FetchAdd { .. } => Outcome::Word(result.map(|()| ep.slot_word(slot))),
            Single::Write { .. } | Single::WriteWord { .. } => Outcome::Unit(result),
        }
    }
}

// Nothing in it is pinned (it never hands out pinned references to its fields; a buffer in it
// only moves into the transport), so moving it is fine.
impl<E: Submit, F> Unpin for OpFuture<'_, E, F> {}

impl<E: Submit, T, F: Fn(Outcome<E::Buffer>) -> T> Future for OpFuture<'_, E, F> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let ep = this.ep;
        ep.with(|inner| this.step(inner, cx))
    }
}

impl<'a, E: Submit, F> OpFuture<'a, E, F> {
    #[inline(always)]
    fn step<T>(&mut self, inner: &mut Inner<E>, cx: &mut Context<'_>) -> Poll<T>
    where
        F: Fn(Outcome<E::Buffer>) -> T,
    {
        let idle = &self.ep.idle;
        if let Stage::Start(mut place) = self.stage {
            if let Some((kind, addr)) = self.empty() {
                self.stage = Stage::Finished;
                let r = validate(kind, addr, 0, inner.ep.nodes(), 0);
                return Poll::Ready((self.output)(Outcome::Unit(r)));
            }
            let claimed = inner.claim(1, &mut place, cx, idle);
            self.stage = Stage::Start(place);
            let Some(ids) = claimed else { return Poll::Pending };
            let slot = ids[0];
            if inner.in_flight == 0 && inner.unrung == 0 && (!inner.options.coalesce || inner.skip_yield()) {
                // Alone on the endpoint, and no yield to make: post it and poll for it at once.
                return self.run_lone(inner, slot, cx);
            }
            let queued = inner.ep.queue(slot, Self::slot_op(&mut self.op));
            if let Err((e, buf)) = queued {
                inner.release(slot);
                self.stage = Stage::Finished;
                return Poll::Ready((self.output)(Self::failed(&mut self.op, e, buf)));
            }
            inner.queued(slot);
            self.stage = Stage::Flight(slot, Waiting::default());
        }
        let Stage::Flight(slot, ref mut wait) = self.stage else {
            panic!("an rdmem operation future polled after it completed");
        };
        std::task::ready!(inner.poll_slot(slot, wait, cx, idle));
        // The slot is free again, but its memory holds the results until the borrow ends.
        let (result, buf) = inner.take_done(slot, false);
        self.stage = Stage::Finished;
        Poll::Ready((self.output)(Self::completed(&mut self.op, &inner.ep, slot, result, buf)))
    }
}

impl<'a, E: Submit, F> OpFuture<'a, E, F> {
    /// The first poll of an operation alone on the endpoint ([`Submit::run_lone`]).
    fn run_lone<T>(&mut self, inner: &mut Inner<E>, slot: u32, cx: &mut Context<'_>) -> Poll<T>
    where
        F: Fn(Outcome<E::Buffer>) -> T,
    {
        inner.rings += 1;
        inner.drives = inner.drives.wrapping_add(1);
        let polls = inner.options.inline_polls;
        match inner.ep.run_lone(slot, Self::slot_op(&mut self.op), polls) {
            Err((e, buf)) => {
                inner.release(slot);
                self.stage = Stage::Finished;
                Poll::Ready((self.output)(Self::failed(&mut self.op, e, buf)))
            }
            Ok(Some((result, buf))) => {
                inner.saw_completion();
                // The slot is free again, but its memory holds the results until the borrow ends.
                inner.settle(slot, false);
                self.stage = Stage::Finished;
                Poll::Ready((self.output)(Self::completed(&mut self.op, &inner.ep, slot, result, buf)))
            }
            Ok(None) => {
                // Still in flight (posted): wait for it as for any other.
                inner.slots[slot as usize] = Slot::Queued;
                inner.in_flight += 1;
                self.stage = Stage::Flight(slot, Waiting { yielded: true, ..Waiting::default() });
                self.step(inner, cx)
            }
        }
    }
}

impl<E: Submit, F> Drop for OpFuture<'_, E, F> {
    fn drop(&mut self) {
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);
        if matches!(stage, Stage::Finished) {
            return;
        }
        self.ep.try_with(|inner| match stage {
            Stage::Start(place) => inner.withdraw(place),
            Stage::Flight(slot, _) => inner.release(slot),
            Stage::Finished => {}
        });
    }
}

/// A future waiting for `n` free slots. Dropped while waiting, it gives up its place (and a
/// slot freed for it goes to the next claim).
struct Claim<'a, E: Submit> {
    ep: &'a AsyncEndpoint<E>,
    n: usize,
    /// Its place among the claimers, while it waits.
    id: Option<u64>,
}

impl<'a, E: Submit> Future for Claim<'a, E> {
    type Output = Result<Slots<'a, E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (ep, n) = (self.ep, self.n);
        let id = &mut self.id;
        ep.with(|inner| {
            let total = inner.options.slots;
            if n > total as usize {
                return Poll::Ready(Err(Error::TooManyOps { ops: n, slots: total }));
            }
            match inner.claim(n, id, cx, &ep.idle) {
                Some(ids) => Poll::Ready(Ok(Slots { ep, ids })),
                None => Poll::Pending,
            }
        })
    }
}

impl<E: Submit> Drop for Claim<'_, E> {
    fn drop(&mut self) {
        let id = self.id;
        self.ep.try_with(|inner| inner.withdraw(id));
    }
}

/// Slots held by one future; dropping it frees them, or leaves those in flight to be recycled
/// at their completion.
struct Slots<'a, E: Submit> {
    ep: &'a AsyncEndpoint<E>,
    ids: SmallVec<[u32; 4]>,
}

impl<E: Submit> Drop for Slots<'_, E> {
    fn drop(&mut self) {
        let ids = &self.ids;
        self.ep.try_with(|inner| {
            for &s in ids {
                inner.release(s);
            }
        });
    }
}

/// Operations of an [`AsyncBatch`], borrowing where their results go.
enum BatchOp<'b> {
    Read { remote: GlobalAddr, dst: &'b mut [u8] },
    Write { remote: GlobalAddr, src: &'b [u8] },
    CompareSwap { remote: GlobalAddr, expected: u64, new: u64, old: &'b mut u64 },
    FetchAdd { remote: GlobalAddr, add: u64, old: &'b mut u64 },
}

/// Operations posted together (one doorbell per node) and awaited as one future.
///
/// Each operation holds a slot, so a batch has at most [`AsyncOptions::slots`] operations
/// ([`Error::TooManyOps`]), and transfers of at most [`AsyncOptions::slot_bytes`]. Results are
/// copied into the borrowed destinations when the whole batch completed; a batch dropped in
/// flight writes nothing into them. Ordering and failure are those of a sync
/// [`crate::Batch`]: in order per node; the first failing operation is reported.
#[must_use = "a batch does nothing until submit().await"]
pub struct AsyncBatch<'e, 'b, E: Submit> {
    ep: &'e AsyncEndpoint<E>,
    ops: SmallVec<[BatchOp<'b>; 16]>,
}

impl<'b, E: Submit> AsyncBatch<'_, 'b, E> {
    /// Adds a READ of `dst.len()` bytes at `src`.
    pub fn read(&mut self, src: GlobalAddr, dst: &'b mut [u8]) -> &mut Self {
        self.ops.push(BatchOp::Read { remote: src, dst });
        self
    }

    /// Adds a WRITE of `src` to `dst`.
    pub fn write(&mut self, dst: GlobalAddr, src: &'b [u8]) -> &mut Self {
        self.ops.push(BatchOp::Write { remote: dst, src });
        self
    }

    /// Adds a compare-and-swap; `old` receives the previous value.
    pub fn cas(&mut self, addr: GlobalAddr, expected: u64, new: u64, old: &'b mut u64) -> &mut Self {
        self.ops.push(BatchOp::CompareSwap { remote: addr, expected, new, old });
        self
    }

    /// Adds a fetch-and-add; `old` receives the previous value.
    pub fn faa(&mut self, addr: GlobalAddr, add: u64, old: &'b mut u64) -> &mut Self {
        self.ops.push(BatchOp::FetchAdd { remote: addr, add, old });
        self
    }

    /// The number of operations so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when no operation was added.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Validates every operation, posts them all, and waits for all of them.
    pub async fn submit(mut self) -> Result<()> {
        let ep = self.ep;
        for op in &self.ops {
            let (kind, addr, len) = match op {
                BatchOp::Read { remote, dst } => (OpKind::Read, *remote, dst.len()),
                BatchOp::Write { remote, src } => (OpKind::Write, *remote, src.len()),
                BatchOp::CompareSwap { remote, .. } => (OpKind::CompareSwap, *remote, 8),
                BatchOp::FetchAdd { remote, .. } => (OpKind::FetchAdd, *remote, 8),
            };
            ep.check(kind, addr, len)?;
        }
        // Zero-length transfers are valid and do nothing.
        self.ops.retain(|op| !matches!(op, BatchOp::Read { dst, .. } if dst.is_empty()));
        self.ops.retain(|op| !matches!(op, BatchOp::Write { src, .. } if src.is_empty()));
        if self.ops.is_empty() {
            return Ok(());
        }
        let slots = ep.claim(self.ops.len()).await?;
        for (k, op) in self.ops.iter().enumerate() {
            let slot_op = match op {
                BatchOp::Read { remote, dst } => SlotOp::Read { remote: *remote, len: dst.len() },
                BatchOp::Write { remote, src } => SlotOp::Write { remote: *remote, src },
                BatchOp::CompareSwap { remote, expected, new, .. } => {
                    SlotOp::CompareSwap { remote: *remote, expected: *expected, new: *new }
                }
                BatchOp::FetchAdd { remote, add, .. } => SlotOp::FetchAdd { remote: *remote, add: *add },
            };
            if let Err(e) = ep.queue(&slots, k, slot_op) {
                ep.ring(); // those before it were queued: they go, as in a sync batch
                for j in 0..k {
                    let _ = ep.wait(&slots, j).await;
                }
                return Err(e);
            }
        }
        ep.ring();
        let mut first: Option<Error> = None;
        for k in 0..self.ops.len() {
            if let Err(e) = ep.wait(&slots, k).await.0 {
                let flushed = |e: &Error| matches!(e, Error::Completion { status: WcStatus::Flushed, .. });
                if first.as_ref().is_none_or(|f| flushed(f) && !flushed(&e)) {
                    first = Some(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        let inner = ep.inner.borrow();
        for (op, &slot) in self.ops.iter_mut().zip(&slots.ids) {
            match op {
                BatchOp::Read { dst, .. } => dst.copy_from_slice(inner.ep.slot_bytes(slot, dst.len())),
                BatchOp::CompareSwap { old, .. } | BatchOp::FetchAdd { old, .. } => **old = inner.ep.slot_word(slot),
                BatchOp::Write { .. } => {}
            }
        }
        Ok(())
    }
}

/// A boxed future that stays on its thread, as [`join_all`] takes them.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Runs `futures` concurrently on the current task; their outputs, in order. Each wake polls
/// every future not done yet, which is fine for tens or a few thousand of them; for more,
/// or a stream of them, use `futures::stream::FuturesUnordered`.
pub fn join_all<'a, T>(futures: Vec<LocalFuture<'a, T>>) -> impl Future<Output = Vec<T>> + 'a
where
    T: 'a,
{
    let mut futures: Vec<Option<LocalFuture<'a, T>>> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *f = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(outputs.iter_mut().map(|o| o.take().expect("done")).collect()) }
    })
}

/// Runs `future` to completion on this thread: the minimal executor (it parks the thread
/// while the future waits, and polls again when woken).
pub fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread, std::sync::atomic::AtomicBool);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.1.store(true, std::sync::atomic::Ordering::Release);
            self.0.unpark();
        }
    }
    let unpark = Arc::new(Unpark(std::thread::current(), std::sync::atomic::AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        while !unpark.1.swap(false, std::sync::atomic::Ordering::Acquire) {
            std::thread::park();
        }
    }
}

/// A future that completes after `duration`, on any executor: one process-wide timer thread
/// (started at the first call) wakes it. For back-off in retry loops, such as a lock waiting
/// for its holder; a runtime's own timer is as good where there is one.
pub fn sleep(duration: Duration) -> impl Future<Output = ()> {
    let deadline = Instant::now() + duration;
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(move |cx| {
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        // Once per distinct waker: a spurious poll adds no entry; a moved task gets one.
        if registered.as_ref().is_none_or(|w: &Waker| !w.will_wake(cx.waker())) {
            registered = Some(cx.waker().clone());
            timer::wake_at(deadline, cx.waker().clone());
        }
        Poll::Pending
    })
}

/// The timer thread behind [`sleep`]: wakers by deadline, woken in order.
mod timer {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::task::Waker;
    use std::time::Instant;

    struct Entry(Instant, u64, Waker);
    impl PartialEq for Entry {
        fn eq(&self, other: &Self) -> bool {
            (self.0, self.1) == (other.0, other.1)
        }
    }
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Entry {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            (self.0, self.1).cmp(&(other.0, other.1))
        }
    }

    #[derive(Default)]
    struct Timer {
        heap: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
        changed: Condvar,
    }

    fn timer() -> &'static Timer {
        static TIMER: OnceLock<&'static Timer> = OnceLock::new();
        TIMER.get_or_init(|| {
            let timer: &'static Timer = Box::leak(Box::default());
            std::thread::Builder::new()
                .name("rdmem-aio-timer".into())
                .spawn(move || run(timer))
                .expect("starting the timer thread of rdmem_core::aio::sleep");
            timer
        })
    }

    fn run(timer: &'static Timer) {
        let mut guard = timer.heap.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while guard.0.peek().is_some_and(|Reverse(e)| e.0 <= now) {
                let Reverse(Entry(_, _, waker)) = guard.0.pop().expect("peeked");
                due.push(waker);
            }
            if !due.is_empty() {
                // Woken without the lock: a waker may register a new sleep at once.
                drop(guard);
                due.into_iter().for_each(Waker::wake);
                guard = timer.heap.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            guard = match guard.0.peek().map(|Reverse(e)| e.0) {
                Some(next) => timer.changed.wait_timeout(guard, next - now).unwrap_or_else(|p| p.into_inner()).0,
                None => timer.changed.wait(guard).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    pub(super) fn wake_at(deadline: Instant, waker: Waker) {
        let timer = timer();
        let mut guard = timer.heap.lock().unwrap_or_else(|p| p.into_inner());
        let seq = guard.1;
        guard.1 += 1;
        guard.0.push(Reverse(Entry(deadline, seq, waker)));
        timer.changed.notify_one();
    }
}

/// A future that is pending once (waking itself), so that others on the executor run: the
/// runtime-agnostic way to wait a little in a retry loop.
pub fn yield_now() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}
