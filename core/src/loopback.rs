//! The loopback transport: the [`Transport`] traits over in-process pools, for fast tests.
//!
//! Each "memory node" is a pool of `AtomicU64` words, so remote atomics are real atomics and any
//! number of threads can hammer the same words, exactly as on RDMA. READ and WRITE move bytes
//! word by word: a word is never torn (RDMA gives the same guarantee for aligned 8-byte words
//! only in practice; do not rely on more), and a WRITE that covers part of a word merges its
//! bytes into it atomically. Byte order is little-endian, as on x86 RDMA.
//!
//! It behaves like the RDMA transport where upper layers can tell: the same validation errors;
//! operations of a batch run in order; a failing operation stops its batch and breaks the
//! endpoint's connection to that node ([`Error::Broken`] afterwards, until a new endpoint).
//! [`LoopbackOptions`] adds latency to every batch and injects faults, and
//! [`LoopbackTransport::set_node_down`] makes a node unreachable, to test failure handling.
//! Its nodes take checkpoints too ([`Transport::checkpoint`], kept in memory), and
//! [`LoopbackTransport::restart_from`] starts them again from one, as memory nodes restarted
//! with `--restore`.
//!
//! No unsafe code: the pools are atomics, local buffers are plain vectors.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::addr::{GlobalAddr, NodeId};
use crate::aio::{SlotOp, Submit, Wait};
use crate::endpoint::{Checkpoint, Endpoint, LocalBuffer, NodeInfo, Op, Transport};
use crate::error::{Error, Result};

/// The longest single transfer, as on RDMA (2 GiB).
const MAX_TRANSFER: u64 = 1 << 31;

/// Failure and latency injection for a [`LoopbackTransport`].
#[derive(Debug, Clone, Default)]
pub struct LoopbackOptions {
    /// Slept once per executed batch (one simulated round trip).
    pub latency: Duration,
    /// When set, every `n`-th operation (counted over the whole transport, from 1) fails with
    /// [`Error::Injected`] without taking effect.
    pub fail_every: Option<u64>,
    /// The async face only: an operation's completion shows up this many
    /// [`Submit::reap`]s after it was posted (0: at the next), so tests can hold operations in
    /// flight, as a device does.
    pub async_reaps: u32,
}

struct Pool {
    info: NodeInfo,
    words: Box<[AtomicU64]>,
    down: AtomicBool,
}

/// A node's snapshots by sequence number: copies of its words.
type Snapshots = BTreeMap<u64, Arc<[u64]>>;

struct Shared {
    pools: Vec<Pool>,
    nodes: Vec<NodeInfo>,
    options: LoopbackOptions,
    ops: AtomicU64,
    /// Batches executed (sync doorbells).
    doorbells: AtomicU64,
    /// Per node, its checkpoints.
    snapshots: Mutex<Vec<Snapshots>>,
}

/// In-process memory nodes behind the [`Transport`] traits. Cheap to clone (shared pools).
#[derive(Clone)]
pub struct LoopbackTransport {
    shared: Arc<Shared>,
    /// Set on the handles made by [`LoopbackTransport::process`].
    life: Option<KillSwitch>,
}

/// Kills a [`LoopbackTransport::process`] handle at a chosen point, as `kill -9` does a
/// client process: once armed, the handle's endpoints execute that many more operations, and
/// every operation after those fails with [`Error::Injected`] without taking effect (a
/// batch is cut between two of its operations). The pools, and every other handle's
/// endpoints, go on. Clones share the switch.
#[derive(Clone, Debug)]
pub struct KillSwitch(Arc<AtomicU64>);

impl KillSwitch {
    const UNARMED: u64 = u64::MAX;

    /// Lets `ops` more operations through, then kills (0: kills at once).
    pub fn after(&self, ops: u64) {
        self.0.store(ops.min(Self::UNARMED - 1), Ordering::SeqCst);
    }

    /// Kills at once.
    pub fn now(&self) {
        self.after(0);
    }

    /// True once the process is dead: its operations are spent (or it was killed with
    /// [`KillSwitch::now`]), so every operation from now on is refused.
    pub fn fired(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }

    /// Takes one operation's life; false when the process is dead.
    fn spend(&self) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                0 => None,
                Self::UNARMED => Some(left),
                _ => Some(left - 1),
            })
            .is_ok()
    }
}

impl LoopbackTransport {
    /// Memory nodes `0, 1, ...` with pools of the given sizes in bytes (rounded up to 8),
    /// zero-filled.
    pub fn new(pool_sizes: &[u64]) -> Self {
        Self::with_options(pool_sizes, LoopbackOptions::default())
    }

    /// Like [`LoopbackTransport::new`], with latency and fault injection.
    pub fn with_options(pool_sizes: &[u64], options: LoopbackOptions) -> Self {
        let pools: Vec<Pool> = pool_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let words = size.div_ceil(8) as usize;
                let id = NodeId(u16::try_from(i).expect("at most 65536 loopback nodes"));
                Pool {
                    info: NodeInfo { id, pool_size: words as u64 * 8 },
                    words: (0..words).map(|_| AtomicU64::new(0)).collect(),
                    down: AtomicBool::new(false),
                }
            })
            .collect();
        let nodes: Vec<NodeInfo> = pools.iter().map(|p| p.info).collect();
        let snapshots = Mutex::new(vec![Snapshots::new(); nodes.len()]);
        Self {
            shared: Arc::new(Shared {
                pools,
                nodes,
                options,
                ops: AtomicU64::new(0),
                doorbells: AtomicU64::new(0),
                snapshots,
            }),
            life: None,
        }
    }

    /// Another handle on the same pools, standing for a separate client process that a test
    /// can kill at any operation with the returned switch (unarmed until
    /// [`KillSwitch::after`]). Endpoints opened from it, by any thread, share its fate.
    pub fn process(&self) -> (LoopbackTransport, KillSwitch) {
        let switch = KillSwitch(Arc::new(AtomicU64::new(KillSwitch::UNARMED)));
        (LoopbackTransport { shared: Arc::clone(&self.shared), life: Some(switch.clone()) }, switch)
    }

    /// New memory nodes, as these restarted with `--restore-seq`: node `i`'s pool holds its
    /// checkpoint `seqs[i]`, and every node keeps its checkpoints. This transport goes on as it
    /// is (its endpoints still reach the old pools).
    pub fn restart_from(&self, seqs: &[u64]) -> Result<LoopbackTransport> {
        if seqs.len() != self.shared.pools.len() {
            return Err(Error::Config(format!(
                "{} sequence numbers for {} memory nodes",
                seqs.len(),
                self.shared.pools.len()
            )));
        }
        let sizes: Vec<u64> = self.shared.nodes.iter().map(|n| n.pool_size).collect();
        let fresh = LoopbackTransport::with_options(&sizes, self.shared.options.clone());
        let snapshots = self.shared.snapshots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((pool, kept), &seq) in fresh.shared.pools.iter().zip(&snapshots).zip(seqs) {
            let words = kept.get(&seq).ok_or_else(|| Error::Checkpoint {
                node: pool.info.id,
                reason: format!("no checkpoint {seq} (there: {:?})", kept.keys().collect::<Vec<_>>()),
            })?;
            for (word, &value) in pool.words.iter().zip(words.iter()) {
                word.store(value, Ordering::SeqCst);
            }
        }
        *fresh.shared.snapshots.lock().unwrap_or_else(|p| p.into_inner()) = snapshots;
        Ok(fresh)
    }

    fn pool_index(&self, node: NodeId) -> Result<usize> {
        let i = node.0 as usize;
        if i >= self.shared.pools.len() {
            return Err(Error::Checkpoint { node, reason: "no such memory node".into() });
        }
        if self.shared.pools[i].down.load(Ordering::SeqCst) {
            return Err(Error::Checkpoint { node, reason: "the memory node is down".into() });
        }
        Ok(i)
    }

    /// Makes `node` unreachable (`down = true`): every operation on it then fails
    /// ([`Error::NodeGone`]), as when a
    /// memory node dies. `false` brings it back for new endpoints; its memory is kept.
    pub fn set_node_down(&self, node: NodeId, down: bool) {
        if let Some(pool) = self.shared.pools.get(node.0 as usize) {
            pool.down.store(down, Ordering::SeqCst);
        }
    }

    /// The number of operations executed so far by all endpoints (counts network operations in
    /// tests of the layers above).
    pub fn operations(&self) -> u64 {
        self.shared.ops.load(Ordering::Relaxed)
    }

    /// The number of doorbells so far: batches (and single operations) the sync face of all
    /// endpoints executed, each as one device would post with one doorbell.
    pub fn doorbells(&self) -> u64 {
        self.shared.doorbells.load(Ordering::Relaxed)
    }
}

impl Transport for LoopbackTransport {
    type Endpoint = LoopbackEndpoint;

    fn endpoint(&self) -> Result<LoopbackEndpoint> {
        Ok(LoopbackEndpoint {
            shared: Arc::clone(&self.shared),
            life: self.life.clone(),
            broken: vec![false; self.shared.pools.len()],
            aio: AsyncSlots::default(),
        })
    }

    fn nodes(&self) -> &[NodeInfo] {
        &self.shared.nodes
    }

    /// Copies the node's pool (word by word: a consistent cut only while nobody writes), kept
    /// in memory for [`LoopbackTransport::restart_from`].
    fn checkpoint(&self, node: NodeId, seq: Option<u64>, full: bool) -> Result<Checkpoint> {
        let _ = full; // every loopback checkpoint is a full copy
        let started = std::time::Instant::now();
        let i = self.pool_index(node)?;
        let mut snapshots = self.shared.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let newest = snapshots[i].keys().next_back().copied().unwrap_or(0);
        let seq = seq.unwrap_or(newest + 1);
        if seq <= newest {
            return Err(Error::Checkpoint {
                node,
                reason: format!("sequence number {seq} is not above the newest snapshot's, {newest}"),
            });
        }
        let pool = &self.shared.pools[i];
        let words: Arc<[u64]> = pool.words.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        snapshots[i].insert(seq, words);
        let bytes = pool.info.pool_size;
        Ok(Checkpoint {
            node,
            seq,
            parent: None,
            data_blocks: 1,
            zero_blocks: 0,
            bytes,
            scanned: bytes,
            duration: started.elapsed(),
        })
    }

    fn newest_checkpoint(&self, node: NodeId) -> Result<u64> {
        let i = self.pool_index(node)?;
        let snapshots = self.shared.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        Ok(snapshots[i].keys().next_back().copied().unwrap_or(0))
    }
}

/// A thread's endpoint on a [`LoopbackTransport`].
pub struct LoopbackEndpoint {
    shared: Arc<Shared>,
    /// The [`KillSwitch`] of its process handle, if any.
    life: Option<KillSwitch>,
    /// Per node: an earlier failure broke the "connection", as a QP in the error state.
    broken: Vec<bool>,
    /// The async face's slots ([`crate::aio`]).
    aio: AsyncSlots,
}

/// "Registered" memory of the loopback transport: a plain vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopbackBuffer(Vec<u8>);

impl Deref for LoopbackBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for LoopbackBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl LocalBuffer for LoopbackBuffer {
    fn key(&self) -> u32 {
        0
    }
}

impl Endpoint for LoopbackEndpoint {
    type Buffer = LoopbackBuffer;

    fn buffer(&mut self, len: usize) -> Result<LoopbackBuffer> {
        Ok(LoopbackBuffer(vec![0; len]))
    }

    fn nodes(&self) -> &[NodeInfo] {
        &self.shared.nodes
    }

    fn execute(&mut self, ops: &mut [Op<'_>]) -> Result<()> {
        for op in ops.iter() {
            op.validate(&self.shared.nodes, MAX_TRANSFER)?;
        }
        self.shared.doorbells.fetch_add(1, Ordering::Relaxed);
        if !self.shared.options.latency.is_zero() {
            std::thread::sleep(self.shared.options.latency);
        }
        for op in ops.iter_mut() {
            self.run_one(op)?;
        }
        Ok(())
    }
}

impl LoopbackEndpoint {
    /// Performs one validated operation, or fails it as the node's state says (broken, down,
    /// an injected fault); a failure breaks the connection to that node.
    fn run_one(&mut self, op: &mut Op<'_>) -> Result<()> {
        let node = op.remote().node().0 as usize;
        if self.broken[node] {
            return Err(Error::Broken { node: op.remote().node() });
        }
        if self.life.as_ref().is_some_and(|life| !life.spend()) {
            return Err(Error::Injected { op: op.kind(), addr: op.remote() });
        }
        let pool = &self.shared.pools[node];
        let count = self.shared.ops.fetch_add(1, Ordering::Relaxed) + 1;
        let injected = self.shared.options.fail_every.is_some_and(|n| n > 0 && count % n == 0);
        if injected || pool.down.load(Ordering::SeqCst) {
            self.broken[node] = true;
            let (op, addr) = (op.kind(), op.remote());
            return Err(if injected {
                Error::Injected { op, addr }
            } else {
                Error::NodeGone { op, addr, peer: format!("loopback node {}", addr.node().0) }
            });
        }
        apply(&pool.words, op);
        Ok(())
    }
}

/// The loopback side of the async face: operations run when they are posted
/// ([`Submit::ring`]), in order, and complete at once (or after
/// [`LoopbackOptions::async_reaps`] reaps). Latency injection does not apply to
/// them (it would block the executor); fault injection and downed nodes do.
#[derive(Default)]
struct AsyncSlots {
    slot_bytes: usize,
    memory: Vec<u8>,
    queued: Vec<(u32, Queued)>,
    /// Finished slots, with the reap count from which they show.
    done: std::collections::VecDeque<(u64, u32)>,
    /// Per slot: how it went, and the buffer moved in (until [`Submit::take_result`]).
    results: Vec<Option<(Result<()>, Option<LoopbackBuffer>)>>,
    reaps: u64,
}

/// A queued async operation; its local side is the slot's memory or the buffer moved in.
enum Queued {
    Read { remote: GlobalAddr, len: usize },
    Write { remote: GlobalAddr, len: usize },
    Buffer { remote: GlobalAddr, buf: LoopbackBuffer, range: std::ops::Range<usize>, write: bool },
    CompareSwap { remote: GlobalAddr, expected: u64, new: u64 },
    FetchAdd { remote: GlobalAddr, add: u64 },
}

/// Waits for nothing: loopback operations complete when they are posted.
pub struct LoopbackWaiter;

impl Wait for LoopbackWaiter {
    fn wait(&mut self, timeout: std::time::Duration) -> bool {
        std::thread::sleep(timeout);
        false
    }
}

impl Submit for LoopbackEndpoint {
    type Waiter = LoopbackWaiter;

    fn open_slots(&mut self, slots: u32, slot_bytes: usize) -> Result<LoopbackWaiter> {
        self.aio = AsyncSlots {
            slot_bytes,
            memory: vec![0; slots as usize * slot_bytes],
            results: (0..slots).map(|_| None).collect(),
            ..AsyncSlots::default()
        };
        Ok(LoopbackWaiter)
    }

    fn queue(
        &mut self,
        slot: u32,
        op: SlotOp<'_, LoopbackBuffer>,
    ) -> std::result::Result<(), (Error, Option<LoopbackBuffer>)> {
        if let Err(e) = op.validate(&self.shared.nodes, self.aio.slot_bytes, MAX_TRANSFER) {
            return Err((e, op.into_buffer()));
        }
        let at = slot as usize * self.aio.slot_bytes;
        let queued = match op {
            SlotOp::Read { remote, len } => Queued::Read { remote, len },
            SlotOp::Write { remote, src } => {
                self.aio.memory[at..at + src.len()].copy_from_slice(src);
                Queued::Write { remote, len: src.len() }
            }
            SlotOp::ReadInto { remote, buf, range } => Queued::Buffer { remote, buf, range, write: false },
            SlotOp::WriteFrom { remote, buf, range } => Queued::Buffer { remote, buf, range, write: true },
            SlotOp::CompareSwap { remote, expected, new } => Queued::CompareSwap { remote, expected, new },
            SlotOp::FetchAdd { remote, add } => Queued::FetchAdd { remote, add },
        };
        self.aio.queued.push((slot, queued));
        Ok(())
    }

    fn ring(&mut self) {
        let mut queued = std::mem::take(&mut self.aio.queued);
        for (slot, q) in queued.drain(..) {
            let at = slot as usize * self.aio.slot_bytes;
            let mut memory = std::mem::take(&mut self.aio.memory);
            let (result, buf) = match q {
                Queued::Read { remote, len } => {
                    (self.run_one(&mut Op::Read { remote, local: &mut memory[at..at + len], key: None }), None)
                }
                Queued::Write { remote, len } => {
                    (self.run_one(&mut Op::Write { remote, local: &memory[at..at + len], key: None }), None)
                }
                Queued::Buffer { remote, mut buf, range, write } => {
                    let result = if write {
                        self.run_one(&mut Op::Write { remote, local: &buf[range], key: Some(0) })
                    } else {
                        self.run_one(&mut Op::Read { remote, local: &mut buf[range], key: Some(0) })
                    };
                    (result, Some(buf))
                }
                Queued::CompareSwap { remote, expected, new } => {
                    let mut old = 0;
                    let r = self.run_one(&mut Op::CompareSwap { remote, expected, new, old: &mut old });
                    memory[at..at + 8].copy_from_slice(&old.to_le_bytes());
                    (r, None)
                }
                Queued::FetchAdd { remote, add } => {
                    let mut old = 0;
                    let r = self.run_one(&mut Op::FetchAdd { remote, add, old: &mut old });
                    memory[at..at + 8].copy_from_slice(&old.to_le_bytes());
                    (r, None)
                }
            };
            self.aio.memory = memory;
            let at = self.aio.reaps + self.shared.options.async_reaps as u64;
            self.aio.results[slot as usize] = Some((result, buf));
            self.aio.done.push_back((at, slot));
        }
        self.aio.queued = queued; // keeps its allocation
    }

    fn reap(&mut self, mut done: impl FnMut(u32)) -> usize {
        let now = self.aio.reaps;
        self.aio.reaps += 1;
        let mut n = 0;
        while self.aio.done.front().is_some_and(|(at, _)| *at <= now) {
            done(self.aio.done.pop_front().expect("front").1);
            n += 1;
        }
        n
    }

    fn take_result(&mut self, slot: u32) -> (Result<()>, Option<LoopbackBuffer>) {
        self.aio.results[slot as usize].take().expect("take_result of a slot reported finished")
    }

    fn slot_bytes(&self, slot: u32, len: usize) -> &[u8] {
        let at = slot as usize * self.aio.slot_bytes;
        &self.aio.memory[at..at + len]
    }

    fn slot_word(&self, slot: u32) -> u64 {
        u64::from_le_bytes(self.slot_bytes(slot, 8).try_into().expect("8 bytes"))
    }

    fn arm(&mut self) -> Result<()> {
        Ok(())
    }

    fn check_stalled(&mut self) {}
}

/// Performs one validated operation on a pool.
fn apply(words: &[AtomicU64], op: &mut Op<'_>) {
    match op {
        Op::Read { remote, local, .. } => read_bytes(words, remote.offset(), local),
        Op::Write { remote, local, .. } => write_bytes(words, remote.offset(), local),
        Op::CompareSwap { remote, expected, new, old } => {
            let word = &words[(remote.offset() / 8) as usize];
            **old = match word.compare_exchange(*expected, *new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            };
        }
        Op::FetchAdd { remote, add, old } => {
            **old = words[(remote.offset() / 8) as usize].fetch_add(*add, Ordering::SeqCst);
        }
    }
}

/// Copies pool bytes `offset..offset + dst.len()` into `dst`, one atomic load per word.
fn read_bytes(words: &[AtomicU64], offset: u64, dst: &mut [u8]) {
    let mut pos = offset as usize;
    for chunk in chunks(offset, dst.len()) {
        let bytes = words[pos / 8].load(Ordering::SeqCst).to_le_bytes();
        let at = pos % 8;
        dst[chunk.clone()].copy_from_slice(&bytes[at..at + chunk.len()]);
        pos += chunk.len();
    }
}

/// Copies `src` into pool bytes `offset..offset + src.len()`: whole words are stored, partial
/// words merged with a compare-and-swap loop so concurrent atomics on them are never lost.
fn write_bytes(words: &[AtomicU64], offset: u64, src: &[u8]) {
    let mut pos = offset as usize;
    for chunk in chunks(offset, src.len()) {
        let word = &words[pos / 8];
        let part = &src[chunk.clone()];
        if part.len() == 8 {
            word.store(u64::from_le_bytes(part.try_into().expect("8 bytes")), Ordering::SeqCst);
        } else {
            let at = pos % 8;
            let merge = |w: u64| {
                let mut bytes = w.to_le_bytes();
                bytes[at..at + part.len()].copy_from_slice(part);
                Some(u64::from_le_bytes(bytes))
            };
            let _ = word.fetch_update(Ordering::SeqCst, Ordering::SeqCst, merge);
        }
        pos += chunk.len();
    }
}

/// Splits local range `0..len`, which starts at pool offset `offset`, at pool word boundaries.
fn chunks(offset: u64, len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut start = 0usize;
    std::iter::from_fn(move || {
        if start >= len {
            return None;
        }
        let pos = offset as usize + start;
        let end = (start + 8 - pos % 8).min(len);
        let range = start..end;
        start = end;
        Some(range)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_word_boundaries() {
        let got: Vec<_> = chunks(5, 20).collect();
        // pool bytes 5..25: [5, 8) [8, 16) [16, 24) [24, 25)
        assert_eq!(got, vec![0..3, 3..11, 11..19, 19..20]);
        assert_eq!(chunks(8, 16).collect::<Vec<_>>(), vec![0..8, 8..16]);
        assert_eq!(chunks(3, 0).count(), 0);
    }

    #[test]
    fn unaligned_write_merges_into_neighbouring_bytes() {
        let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(u64::MAX)).collect();
        write_bytes(&words, 6, &[1, 2, 3, 4, 5]);
        let mut all = [0u8; 24];
        read_bytes(&words, 0, &mut all);
        let mut want = [0xff; 24];
        want[6..11].copy_from_slice(&[1, 2, 3, 4, 5]);
        assert_eq!(all, want);
    }
}
