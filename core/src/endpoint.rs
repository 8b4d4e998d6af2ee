//! The transport traits: what every way of reaching remote memory offers.
//!
//! A [`Transport`] is shared by a whole process (device, protection domain, cluster); each thread
//! takes its own [`Endpoint`] from it (on RDMA: one queue pair per memory node, its own completion
//! queue and registered staging memory), so the data path takes no locks.
//!
//! An endpoint executes [`Op`]s: READ, WRITE, compare-and-swap and fetch-and-add. Singly through
//! the provided methods ([`Endpoint::read`], [`Endpoint::cas`], ...) or many at once through a
//! [`Batch`], which the transport posts with one doorbell per node and waits on as a whole.
//! Atomics hand back the value the word held before the operation.
//!
//! Local memory comes in two kinds:
//! - an endpoint's [`LocalBuffer`]s are registered with the device: READs land in them and WRITEs
//!   leave from them in place, without a copy ([`Endpoint::read_into`], [`Endpoint::write_from`]);
//! - any `&[u8]`/`&mut [u8]` works too ([`Endpoint::read`], [`Endpoint::write`]): the transport
//!   copies through its staging memory or, for short writes, sends the bytes inline.
//!
//! Borrowing carries RDMA's rule that memory in flight is not touched: a batch holds every local
//! slice it was given until [`Batch::submit`] returns, and `submit` returns only once the device
//! is done with all of them, error or not.
//!
//! Ordering: operations of one batch to one node execute in order (an RC queue pair); operations
//! to different nodes are unordered. A batch that fails reports its first failing operation; the
//! operations before it on that node took effect, the ones after it did not, and the endpoint's
//! connection to that node is then [`Error::Broken`].

use std::ops::{DerefMut, Range};

use smallvec::SmallVec;

use crate::addr::{GlobalAddr, NodeId};
use crate::error::{Error, OpKind, Result};

/// A memory node as an endpoint sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its id, the node part of its addresses.
    pub id: NodeId,
    /// The size of its pool in bytes: valid offsets are `0..pool_size`.
    pub pool_size: u64,
}

/// Local memory registered with an endpoint's device, so data moves in and out of it in place.
pub trait LocalBuffer: DerefMut<Target = [u8]> + Send {
    /// The key the transport needs to use this memory (the lkey on RDMA). Opaque to callers.
    fn key(&self) -> u32;

    /// The whole buffer as a registered slice, to split among the operations of one batch.
    fn reg_slice_mut(&mut self) -> RegSliceMut<'_> {
        let key = self.key();
        RegSliceMut { bytes: &mut self[..], key }
    }

    /// The whole buffer as a read-only registered slice.
    fn reg_slice(&self) -> RegSlice<'_> {
        RegSlice { bytes: &self[..], key: self.key() }
    }
}

/// Part of a [`LocalBuffer`], mutable: a READ target. Only buffers make them, so the key always
/// matches the bytes; split it to give one batch many disjoint targets.
#[derive(Debug)]
pub struct RegSliceMut<'b> {
    bytes: &'b mut [u8],
    key: u32,
}

impl<'b> RegSliceMut<'b> {
    /// Splits at `mid` (panics past the end, like `split_at_mut`).
    pub fn split_at(self, mid: usize) -> (RegSliceMut<'b>, RegSliceMut<'b>) {
        let (a, b) = self.bytes.split_at_mut(mid);
        (RegSliceMut { bytes: a, key: self.key }, RegSliceMut { bytes: b, key: self.key })
    }

    /// Consecutive pieces of `size` bytes (the last may be shorter).
    pub fn chunks(self, size: usize) -> impl Iterator<Item = RegSliceMut<'b>> {
        let key = self.key;
        self.bytes.chunks_mut(size).map(move |bytes| RegSliceMut { bytes, key })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }
}

/// Part of a [`LocalBuffer`], read-only: a WRITE source. See [`RegSliceMut`].
#[derive(Debug, Clone, Copy)]
pub struct RegSlice<'b> {
    bytes: &'b [u8],
    key: u32,
}

impl<'b> RegSlice<'b> {
    /// Splits at `mid` (panics past the end, like `split_at`).
    pub fn split_at(self, mid: usize) -> (RegSlice<'b>, RegSlice<'b>) {
        let (a, b) = self.bytes.split_at(mid);
        (RegSlice { bytes: a, key: self.key }, RegSlice { bytes: b, key: self.key })
    }

    /// Consecutive pieces of `size` bytes (the last may be shorter).
    pub fn chunks(self, size: usize) -> impl Iterator<Item = RegSlice<'b>> {
        let key = self.key;
        self.bytes.chunks(size).map(move |bytes| RegSlice { bytes, key })
    }

    /// The bytes.
    pub fn bytes(&self) -> &'b [u8] {
        self.bytes
    }
}

/// One one-sided operation, borrowing the local memory it uses.
#[derive(Debug)]
pub enum Op<'b> {
    /// READ `local.len()` bytes at `remote` into `local`.
    Read {
        /// Where to read from.
        remote: GlobalAddr,
        /// Where the bytes land.
        local: &'b mut [u8],
        /// The registration key of `local`, or `None` when it is not registered (copied).
        key: Option<u32>,
    },
    /// WRITE `local` to `remote`.
    Write {
        /// Where to write.
        remote: GlobalAddr,
        /// The bytes to write.
        local: &'b [u8],
        /// The registration key of `local`, or `None` when it is not registered (copied).
        key: Option<u32>,
    },
    /// If the 8-byte word at `remote` equals `expected`, replace it with `new`; `old` gets the
    /// value it held either way (so the swap happened exactly when `*old == expected`).
    CompareSwap {
        /// The word, 8-byte aligned.
        remote: GlobalAddr,
        /// The value to compare with.
        expected: u64,
        /// The value to store on a match.
        new: u64,
        /// Receives the previous value.
        old: &'b mut u64,
    },
    /// Add `add` (wrapping) to the 8-byte word at `remote`; `old` gets the previous value.
    FetchAdd {
        /// The word, 8-byte aligned.
        remote: GlobalAddr,
        /// The addend (use `x.wrapping_neg()` to subtract).
        add: u64,
        /// Receives the previous value.
        old: &'b mut u64,
    },
}

impl Op<'_> {
    /// The operation's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Read { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::CompareSwap { .. } => OpKind::CompareSwap,
            Op::FetchAdd { .. } => OpKind::FetchAdd,
        }
    }

    /// The remote address.
    pub fn remote(&self) -> GlobalAddr {
        match self {
            Op::Read { remote, .. }
            | Op::Write { remote, .. }
            | Op::CompareSwap { remote, .. }
            | Op::FetchAdd { remote, .. } => *remote,
        }
    }

    /// The number of remote bytes it touches.
    pub fn len(&self) -> u64 {
        match self {
            Op::Read { local, .. } => local.len() as u64,
            Op::Write { local, .. } => local.len() as u64,
            Op::CompareSwap { .. } | Op::FetchAdd { .. } => 8,
        }
    }

    /// True for a zero-length READ or WRITE.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the operation against the node it targets: known node, range inside the pool,
    /// atomics 8-byte aligned, length at most `max_len`. Every transport calls this before
    /// posting, so all of them reject the same inputs with the same errors.
    pub fn validate(&self, nodes: &[NodeInfo], max_len: u64) -> Result<()> {
        validate(self.kind(), self.remote(), self.len(), nodes, max_len)
    }
}

/// Checks an operation of kind `op` on `len` bytes at `addr` against the nodes: known node,
/// range inside the pool, atomics 8-byte aligned, length at most `max_len` ([`Op::validate`]
/// for operations not built as an [`Op`], such as the async face's).
pub fn validate(op: OpKind, addr: GlobalAddr, len: u64, nodes: &[NodeInfo], max_len: u64) -> Result<()> {
    let node = nodes.iter().find(|n| n.id == addr.node()).ok_or_else(|| Error::UnknownNode { op, addr })?;
    if len > max_len {
        return Err(Error::TooLong { op, addr, len, max: max_len });
    }
    if addr.offset().checked_add(len).is_none_or(|end| end > node.pool_size) {
        return Err(Error::OutOfRange { op, addr, len, pool_size: node.pool_size });
    }
    if matches!(op, OpKind::CompareSwap | OpKind::FetchAdd) && !addr.is_aligned(8) {
        return Err(Error::Misaligned { op, addr });
    }
    Ok(())
}

/// A process's way to reach remote memory; hands out per-thread [`Endpoint`]s.
pub trait Transport: Send + Sync + 'static {
    /// The per-thread endpoint type.
    type Endpoint: Endpoint;

    /// A new endpoint connected to every memory node. Give each thread its own.
    fn endpoint(&self) -> Result<Self::Endpoint>;

    /// The memory nodes, in the order of the cluster configuration.
    fn nodes(&self) -> &[NodeInfo];

    /// Asks memory node `node` to write a snapshot of its pool to its checkpoint directory,
    /// with sequence number `seq` (default: one above its newest; it must be above it), full
    /// if `full` (else incremental when the node has a base to build on), and returns once it
    /// is on disk. The snapshot is a consistent cut only while no client writes the pool.
    /// Transports without memory nodes that keep snapshots return [`Error::Checkpoint`].
    fn checkpoint(&self, node: NodeId, seq: Option<u64>, full: bool) -> Result<Checkpoint> {
        let _ = (seq, full);
        Err(Error::Checkpoint { node, reason: "this transport's memory nodes take no checkpoints".into() })
    }

    /// The sequence number of memory node `node`'s newest snapshot (0: none yet), for picking
    /// one above it ([`Transport::checkpoint`]'s errors otherwise).
    fn newest_checkpoint(&self, node: NodeId) -> Result<u64> {
        Err(Error::Checkpoint { node, reason: "this transport's memory nodes take no checkpoints".into() })
    }
}

/// What a memory node's snapshot of its pool wrote ([`Transport::checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The node.
    pub node: NodeId,
    /// The snapshot's sequence number.
    pub seq: u64,
    /// The snapshot an incremental one applies to (`None`: a full one).
    pub parent: Option<u64>,
    /// Blocks written with their bytes.
    pub data_blocks: u64,
    /// Blocks of zeros recorded (no bytes written).
    pub zero_blocks: u64,
    /// The snapshot file's size in bytes.
    pub bytes: u64,
    /// Pool bytes the node read (all of its pool: every block is hashed).
    pub scanned: u64,
    /// How long the node took, fsync included.
    pub duration: std::time::Duration,
}

/// Ops inline in a batch before it spills to the heap; the batch sizes we measure fit.
const INLINE_OPS: usize = 64;

/// One thread's connection to all memory nodes. Not shared between threads (`Send`, not `Sync`).
pub trait Endpoint: Send {
    /// Registered local memory of this endpoint's device.
    type Buffer: LocalBuffer;

    /// Allocates `len` bytes of zeroed registered memory. Slow (it registers memory): allocate
    /// once and reuse.
    fn buffer(&mut self, len: usize) -> Result<Self::Buffer>;

    /// The memory nodes this endpoint reaches.
    fn nodes(&self) -> &[NodeInfo];

    /// Executes `ops` as one batch: validates them all, posts them (one doorbell per node, only
    /// the last request per node signaled), waits until the device is done with every one, and
    /// stores the atomics' old values. See the module docs for ordering and failure.
    fn execute(&mut self, ops: &mut [Op<'_>]) -> Result<()>;

    /// Starts a batch of operations on this endpoint.
    fn batch<'b>(&mut self) -> Batch<'_, 'b, Self>
    where
        Self: Sized,
    {
        Batch { endpoint: self, ops: SmallVec::new(), error: None }
    }

    /// READs `dst.len()` bytes at `src` into `dst` (copied through staging memory).
    fn read(&mut self, src: GlobalAddr, dst: &mut [u8]) -> Result<()> {
        self.execute(&mut [Op::Read { remote: src, local: dst, key: None }])
    }

    /// WRITEs `src` to `dst` (inline when short enough, else copied through staging memory).
    fn write(&mut self, dst: GlobalAddr, src: &[u8]) -> Result<()> {
        self.execute(&mut [Op::Write { remote: dst, local: src, key: None }])
    }

    /// WRITEs `src` to `dst` without waiting for it (write-behind). The bytes are taken (sent
    /// inline or copied) before this returns, so `src` is free at once.
    ///
    /// Ordering: the write comes before every later operation of this endpoint to the same node
    /// (one queue pair), and before nothing on other nodes. A READ of `dst` through this
    /// endpoint returns it; a lock word on the same node released through this endpoint is
    /// released after it. Other endpoints are sure to see it only once one of those later
    /// operations, or [`Endpoint::flush`], has completed. Releasing a lock on another node needs
    /// [`Endpoint::flush_for`] first (the lock types do it). This is how a critical section's
    /// last write costs no round trip of its own.
    ///
    /// Errors: bad arguments fail at once, as for [`Endpoint::write`]. If the write itself
    /// fails, the next operation to that node reports it (naming this write) and the connection
    /// is then [`Error::Broken`]. Dropping the endpoint flushes first, so nothing posted is lost
    /// by dropping it. Transports that cannot post without waiting write and wait (this
    /// default), which has the same ordering.
    fn post_write(&mut self, dst: GlobalAddr, src: &[u8]) -> Result<()> {
        self.write(dst, src)
    }

    /// [`Endpoint::post_write`] of an 8-byte little-endian word.
    fn post_write_u64(&mut self, dst: GlobalAddr, value: u64) -> Result<()> {
        self.post_write(dst, &value.to_le_bytes())
    }

    /// Waits until every [`Endpoint::post_write`] of this endpoint has completed, so that
    /// every endpoint sees them; reports one that failed. Nothing to do when none is
    /// outstanding.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// Makes every [`Endpoint::post_write`] so far come before the next operation to `node`:
    /// those to `node` already do (same queue pair), so this waits only for the others, and
    /// reports one that failed. Call it before an operation to `node` that publishes them,
    /// such as a lock release.
    fn flush_for(&mut self, node: NodeId) -> Result<()> {
        let _ = node;
        Ok(())
    }

    /// READs `range.len()` bytes at `src` into `buf[range]`, in place.
    fn read_into(&mut self, src: GlobalAddr, buf: &mut Self::Buffer, range: Range<usize>) -> Result<()> {
        let key = buf.key();
        let local = local_range_mut(buf, range)?;
        self.execute(&mut [Op::Read { remote: src, local, key: Some(key) }])
    }

    /// WRITEs `buf[range]` to `dst`, from where it is.
    fn write_from(&mut self, dst: GlobalAddr, buf: &Self::Buffer, range: Range<usize>) -> Result<()> {
        let local = local_range(buf, range)?;
        self.execute(&mut [Op::Write { remote: dst, local, key: Some(buf.key()) }])
    }

    /// Compare-and-swap on the 8-byte word at `addr`; returns the value it held before (the swap
    /// happened exactly when that equals `expected`).
    fn cas(&mut self, addr: GlobalAddr, expected: u64, new: u64) -> Result<u64> {
        let mut old = 0;
        self.execute(&mut [Op::CompareSwap { remote: addr, expected, new, old: &mut old }])?;
        Ok(old)
    }

    /// Fetch-and-add (wrapping) on the 8-byte word at `addr`; returns the value it held before.
    fn faa(&mut self, addr: GlobalAddr, add: u64) -> Result<u64> {
        let mut old = 0;
        self.execute(&mut [Op::FetchAdd { remote: addr, add, old: &mut old }])?;
        Ok(old)
    }

    /// READs the 8-byte little-endian word at `addr`.
    fn read_u64(&mut self, addr: GlobalAddr) -> Result<u64> {
        let mut word = [0u8; 8];
        self.read(addr, &mut word)?;
        Ok(u64::from_le_bytes(word))
    }

    /// WRITEs `value` as an 8-byte little-endian word at `addr`.
    fn write_u64(&mut self, addr: GlobalAddr, value: u64) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }
}

fn local_range_mut(buf: &mut [u8], range: Range<usize>) -> Result<&mut [u8]> {
    let len = buf.len();
    let (start, end) = (range.start, range.end);
    buf.get_mut(range).ok_or_else(|| Error::LocalRange { start, end, len })
}

fn local_range(buf: &[u8], range: Range<usize>) -> Result<&[u8]> {
    let len = buf.len();
    let (start, end) = (range.start, range.end);
    buf.get(range).ok_or_else(|| Error::LocalRange { start, end, len })
}

/// Operations collected to be posted together: one doorbell per node, one wait for all.
///
/// Every method borrows the local memory it is given until [`Batch::submit`]; the builder
/// methods never fail, the first bad argument is reported by `submit`. Up to 64 operations live
/// on the stack; building a batch allocates nothing below that.
///
/// A batch borrows its endpoint mutably, so local memory cannot be reused while in flight:
///
/// ```compile_fail
/// use rdmem_core::{Endpoint, GlobalAddr, LoopbackTransport, Transport};
/// let transport = LoopbackTransport::new(&[4096]);
/// let mut ep = transport.endpoint().unwrap();
/// let mut word = [0u8; 8];
/// let mut batch = ep.batch();
/// batch.read(GlobalAddr::NULL, &mut word);
/// word[0] = 1; // error: `word` is borrowed by the batch until submit
/// batch.submit().unwrap();
/// ```
#[must_use = "a batch does nothing until submit() is called"]
pub struct Batch<'e, 'b, E: Endpoint> {
    endpoint: &'e mut E,
    ops: SmallVec<[Op<'b>; INLINE_OPS]>,
    error: Option<Error>,
}

impl<'b, E: Endpoint> Batch<'_, 'b, E> {
    /// Adds a READ of `dst.len()` bytes at `src` into unregistered memory (copied).
    pub fn read(&mut self, src: GlobalAddr, dst: &'b mut [u8]) -> &mut Self {
        self.ops.push(Op::Read { remote: src, local: dst, key: None });
        self
    }

    /// Adds a WRITE of unregistered memory `src` to `dst` (inline or copied).
    pub fn write(&mut self, dst: GlobalAddr, src: &'b [u8]) -> &mut Self {
        self.ops.push(Op::Write { remote: dst, local: src, key: None });
        self
    }

    /// Adds a READ at `src` into `buf[range]`, in place.
    pub fn read_into(&mut self, src: GlobalAddr, buf: &'b mut E::Buffer, range: Range<usize>) -> &mut Self {
        let key = buf.key();
        match local_range_mut(buf, range) {
            Ok(local) => self.ops.push(Op::Read { remote: src, local, key: Some(key) }),
            Err(e) => self.fail(e),
        }
        self
    }

    /// Adds a WRITE of `buf[range]` to `dst`, from where it is.
    pub fn write_from(&mut self, dst: GlobalAddr, buf: &'b E::Buffer, range: Range<usize>) -> &mut Self {
        match local_range(buf, range) {
            Ok(local) => self.ops.push(Op::Write { remote: dst, local, key: Some(buf.key()) }),
            Err(e) => self.fail(e),
        }
        self
    }

    /// Adds a READ at `src` into a registered slice, in place.
    pub fn read_into_slice(&mut self, src: GlobalAddr, dst: RegSliceMut<'b>) -> &mut Self {
        self.ops.push(Op::Read { remote: src, local: dst.bytes, key: Some(dst.key) });
        self
    }

    /// Adds a WRITE of a registered slice to `dst`, from where it is.
    pub fn write_from_slice(&mut self, dst: GlobalAddr, src: RegSlice<'b>) -> &mut Self {
        self.ops.push(Op::Write { remote: dst, local: src.bytes, key: Some(src.key) });
        self
    }

    /// Adds a compare-and-swap; `old` receives the previous value when the batch completes.
    pub fn cas(&mut self, addr: GlobalAddr, expected: u64, new: u64, old: &'b mut u64) -> &mut Self {
        self.ops.push(Op::CompareSwap { remote: addr, expected, new, old });
        self
    }

    /// Adds a fetch-and-add; `old` receives the previous value when the batch completes.
    pub fn faa(&mut self, addr: GlobalAddr, add: u64, old: &'b mut u64) -> &mut Self {
        self.ops.push(Op::FetchAdd { remote: addr, add, old });
        self
    }

    /// Adds an already built operation.
    pub fn push(&mut self, op: Op<'b>) -> &mut Self {
        self.ops.push(op);
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

    /// Posts every operation and waits for all of them. Returns the first bad argument, or the
    /// first failing operation (see the module docs for what took effect).
    pub fn submit(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        self.endpoint.execute(&mut self.ops)
    }

    fn fail(&mut self, e: Error) {
        self.error.get_or_insert(e);
    }
}
