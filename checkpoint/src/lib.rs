//! Snapshots of a memory node's pool on disk: full and incremental, checksummed per block,
//! written atomically, read back with every byte checked.
//!
//! A memory node's pool lives in registered memory that clients change with one-sided WRITEs
//! and atomics: the node's CPU never sees a write, so it cannot keep dirty bits. Instead a
//! [`Checkpointer`] hashes every block of the pool at each snapshot (XXH3, a fast read of the
//! pool) and writes only the blocks whose hash changed since the previous snapshot: an
//! *incremental* snapshot. The first snapshot in a directory, the first after [`MAX_CHAIN`]
//! incremental ones in a row, and any that is asked for as such, is *full*. Blocks of zeros take no space in either.
//!
//! ```no_run
//! use rdmem_checkpoint::{Checkpointer, Take, restore};
//! # let mut pool = vec![0u8; 1 << 20];
//! // Snapshot the pool (writers quiet: see "Consistency").
//! let mut cp = Checkpointer::open("/var/lib/rdmem/node0".as_ref(), pool.len() as u64, 64 << 10, None)?;
//! let report = cp.checkpoint(&pool, Take::default())?;
//! println!("snapshot {} ({:?}): {} bytes", report.seq, report.kind, report.bytes);
//! // After a crash: load the newest complete snapshot into a fresh pool of the same size.
//! let restored = restore("/var/lib/rdmem/node0".as_ref(), &mut pool, None)?;
//! println!("restored snapshot {}", restored.seq);
//! # Ok::<(), rdmem_checkpoint::CheckpointError>(())
//! ```
//!
//! # Files
//! A directory holds `snapshot-<seq>.rdmem` files (the sequence number zero-padded to 20
//! digits, so names sort as numbers). Each is written to a hidden temporary file, flushed with
//! fsync, renamed into place and the directory fsynced: a crash leaves either the whole
//! snapshot or none of it (a leftover temporary file is removed at the next
//! [`Checkpointer::open`]). An incremental snapshot names its parent; restoring it applies its
//! chain, the full snapshot first. When a full snapshot is written, every snapshot is deleted
//! except the chains of the new one, of the snapshot before it, and of the newest *pinned* one
//! (taken with an explicit [`Take::seq`], as a DSM checkpoint is): periodic snapshots never
//! push a checkpoint the job may need out. Restoring a snapshot that is not the newest sets the
//! newer ones aside (renamed `abandoned-...`, deleted at the next full snapshot): they belong
//! to a timeline given up, and a later restore must not pick them. The byte layout is documented in `checkpoint/src/format.rs`.
//!
//! # Damage
//! [`restore`] checks the header, footer, table and every block's hash of each snapshot it
//! applies. A snapshot that fails (torn, corrupt, a block whose bytes do not match its hash, a
//! missing parent, another pool's geometry) is skipped for the newest older one that is whole,
//! and [`Restored::skipped`] says which file failed and why, naming the block. Asked for one
//! sequence number, it restores that one or fails.
//!
//! # Consistency
//! A snapshot reads the pool while clients may be writing it: each block is copied and then
//! hashed, so what is written is self-consistent per block, but blocks are copied at different
//! moments. It is a consistent cut only while no client writes (a DSM takes it right after a
//! barrier, before anyone writes again); a periodic snapshot of a busy pool is *fuzzy*.

mod format;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use format::{BlockState, ENTRY_LEN, Entry, FOOTER_LEN, Footer, HEADER_LEN, Header};
use xxhash_rust::xxh3::xxh3_64;

/// Incremental snapshots after a full one before the next is full again (a restore applies at
/// most this many on top of the full one).
pub const MAX_CHAIN: u32 = 16;
/// The block size snapshots use unless told otherwise: small enough that a scattered 1 % of
/// writes costs about 1 % of the pool, large enough that the table stays a small fraction
/// (24 bytes a block, 0.04 %).
pub const DEFAULT_BLOCK_SIZE: usize = 64 << 10;
/// The smallest block size accepted.
pub const MIN_BLOCK_SIZE: usize = 4096;
/// How much is read or written per system call.
const IO_BUFFER: usize = 1 << 20;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing a file failed.
    #[error("{}: {context}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A snapshot file is damaged or not a snapshot; `block` names the block when one is at
    /// fault.
    #[error("{}: {what}", file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// The block at fault, if the damage is in one.
        block: Option<u64>,
        /// What is wrong.
        what: String,
    },
    /// Nothing in the directory could be restored (`skipped` lists what failed and why).
    #[error("no complete snapshot to restore in {}{}", dir.display(), list_skipped(skipped))]
    NoSnapshot {
        /// The directory.
        dir: PathBuf,
        /// Snapshots that were there but could not be used.
        skipped: Vec<Skipped>,
    },
    /// The sequence number asked for is not above the directory's newest.
    #[error("sequence number {asked} is not above the newest snapshot's, {newest}, in {}", dir.display())]
    Sequence {
        /// The directory.
        dir: PathBuf,
        /// The number asked for.
        asked: u64,
        /// The newest there.
        newest: u64,
    },
    /// The setup asked for is not possible; the message says why.
    #[error("{0}")]
    Config(String),
}

fn list_skipped(skipped: &[Skipped]) -> String {
    skipped.iter().map(|s| format!("; skipped {}", s.reason)).collect()
}

/// A snapshot [`restore`] passed over, and why.
#[derive(Debug)]
pub struct Skipped {
    /// Its sequence number.
    pub seq: u64,
    /// What is wrong with it (or with a snapshot in its chain: the error names that file).
    pub reason: CheckpointError,
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Every block (zeros recorded, not written).
    Full,
    /// The blocks that changed since the parent.
    Incremental,
}

/// How to take a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Take {
    /// Its sequence number: above every one in the directory (default: one above the newest).
    /// Several nodes snapshotted together (a DSM's collective checkpoint) give the same. A
    /// snapshot taken with a number is *pinned*: pruning keeps its chain until a newer pinned
    /// one is taken.
    pub seq: Option<u64>,
    /// Full even when an incremental one would do.
    pub full: bool,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Its sequence number.
    pub seq: u64,
    /// Full or incremental.
    pub kind: Kind,
    /// The snapshot an incremental one applies to.
    pub parent: Option<u64>,
    /// Blocks whose bytes it holds.
    pub data_blocks: u64,
    /// Blocks of zeros it records.
    pub zero_blocks: u64,
    /// The file's size in bytes.
    pub bytes: u64,
    /// Pool bytes read (all of it: every block is hashed).
    pub scanned: u64,
    /// How long it took, fsync and rename included.
    pub duration: Duration,
    /// The file.
    pub file: PathBuf,
}

/// What [`restore`] loaded.
#[derive(Debug)]
pub struct Restored {
    /// The sequence number restored.
    pub seq: u64,
    /// The snapshots applied, the full one first.
    pub chain: Vec<u64>,
    /// Newer snapshots that could not be used, newest first.
    pub skipped: Vec<Skipped>,
    /// Bytes read from the files applied.
    pub bytes_read: u64,
    /// How long it took.
    pub duration: Duration,
    dir: PathBuf,
    block_size: u64,
    states: Vec<BlockState>,
}

/// Takes snapshots of one pool into one directory.
pub struct Checkpointer {
    dir: PathBuf,
    pool_size: u64,
    block_size: u64,
    /// The newest sequence number in the directory.
    newest: u64,
    /// The last snapshot taken or restored in this directory, which the next incremental one
    /// applies to.
    base: Option<Base>,
}

struct Base {
    seq: u64,
    states: Vec<BlockState>,
    /// Incremental snapshots since its full one.
    chain: u32,
}

impl Checkpointer {
    /// Opens (creating it if need be) `dir` for snapshots of a pool of `pool_size` bytes in
    /// blocks of `block_size`. With `restored` from the same directory and block size, the
    /// first snapshot is incremental to it; otherwise it is full.
    pub fn open(
        dir: &Path,
        pool_size: u64,
        block_size: usize,
        restored: Option<&Restored>,
    ) -> Result<Checkpointer, CheckpointError> {
        if block_size < MIN_BLOCK_SIZE || !block_size.is_power_of_two() {
            return Err(CheckpointError::Config(format!(
                "snapshot block size {block_size} is not a power of two of at least {MIN_BLOCK_SIZE} bytes"
            )));
        }
        if pool_size == 0 {
            return Err(CheckpointError::Config("cannot snapshot an empty pool".into()));
        }
        fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create the snapshot directory", e))?;
        for name in list(dir)?.temporaries {
            let path = dir.join(name);
            tracing::warn!("removing {}, left by a snapshot that never finished", path.display());
            fs::remove_file(&path).map_err(|e| io_err(&path, "cannot remove", e))?;
        }
        let same_dir = |r: &Restored| fs::canonicalize(&r.dir).ok() == fs::canonicalize(dir).ok();
        let restored = restored.filter(|r| same_dir(r));
        if let Some(r) = restored {
            if r.states.len() as u64 != pool_size.div_ceil(r.block_size) {
                return Err(CheckpointError::Config(format!(
                    "snapshot {} is of another pool size than {pool_size} bytes",
                    r.seq
                )));
            }
            // Snapshots newer than the one restored belong to a timeline given up: out of the
            // way, so that no later restore picks them.
            for (seq, path) in list(dir)?.snapshots.into_iter().filter(|(seq, _)| *seq > r.seq) {
                let aside = dir.join(format!("{ABANDONED}{}", file_name(seq)));
                tracing::warn!(
                    "{} is newer than the snapshot restored ({}): renamed {}, deleted at the next full snapshot",
                    path.display(),
                    r.seq,
                    aside.display()
                );
                fs::rename(&path, &aside).map_err(|e| io_err(&path, "cannot set aside", e))?;
            }
        }
        let listed = list(dir)?.snapshots;
        let newest = listed.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
        if restored.is_none() && newest > 0 {
            tracing::warn!(
                "{} holds snapshots up to {newest}, but the pool was not restored from it: the next snapshot (a full \
                 one of this pool) becomes the newest",
                dir.display()
            );
        }
        let base = restored.filter(|r| r.block_size == block_size as u64).map(|r| Base {
            seq: r.seq,
            states: r.states.clone(),
            chain: r.chain.len() as u32 - 1,
        });
        Ok(Checkpointer { dir: dir.to_owned(), pool_size, block_size: block_size as u64, newest, base })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest sequence number in the directory (0: none yet).
    pub fn newest(&self) -> u64 {
        self.newest
    }

    /// Snapshots `pool` (its length must be the pool size given to [`Checkpointer::open`]).
    pub fn checkpoint(&mut self, pool: &[u8], take: Take) -> Result<Report, CheckpointError> {
        let start = Instant::now();
        if pool.len() as u64 != self.pool_size {
            return Err(CheckpointError::Config(format!(
                "the pool is {} bytes, but this directory's snapshots are of {} bytes",
                pool.len(),
                self.pool_size
            )));
        }
        let seq = take.seq.unwrap_or(self.newest.saturating_add(1));
        if seq <= self.newest || seq == u64::MAX {
            return Err(CheckpointError::Sequence { dir: self.dir.clone(), asked: seq, newest: self.newest });
        }
        let base = self.base.as_ref().filter(|b| !take.full && b.chain < MAX_CHAIN);
        let header = Header {
            seq,
            parent: base.map(|b| b.seq),
            pool_size: self.pool_size,
            block_size: self.block_size,
            pinned: take.seq.is_some(),
        };
        let file = self.dir.join(file_name(seq));
        let tmp = self.dir.join(format!(".{}.tmp", file_name(seq)));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_err(&tmp, "cannot create", e))?;
            let wrote = |e| io_err(&tmp, "cannot write", e);
            header.write_to(&mut f).map_err(wrote)?;
            let (mut f, states, mut table, data_blocks, zero_blocks) =
                write_blocks(f, pool, self.block_size as usize, base.map(|b| &b.states[..])).map_err(wrote)?;
            let footer = Footer { seq, entries: data_blocks + zero_blocks, table_hash: xxh3_64(&table) };
            footer.write_to(&mut table).map_err(wrote)?;
            f.write_all(&table).map_err(wrote)?;
            f.sync_all().map_err(|e| io_err(&tmp, "cannot fsync", e))?;
            let bytes = f.metadata().map_err(|e| io_err(&tmp, "cannot stat", e))?.len();
            Ok::<_, CheckpointError>((states, data_blocks, zero_blocks, bytes))
        })();
        let (states, data_blocks, zero_blocks, bytes) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &file) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&file, "cannot rename the finished snapshot into place", e));
        }
        sync_dir(&self.dir)?;
        let kind = if header.parent.is_some() { Kind::Incremental } else { Kind::Full };
        let chain = base.map_or(0, |b| b.chain + 1);
        let previous = self.base.replace(Base { seq, states, chain }).map(|b| b.seq);
        self.newest = seq;
        if kind == Kind::Full {
            // The snapshot is on disk: a failure to delete old ones is not a failed snapshot.
            if let Err(e) = self.prune(seq, previous) {
                tracing::warn!("snapshot {seq} is written, but pruning the older ones failed: {e}");
            }
        }
        Ok(Report {
            seq,
            kind,
            parent: header.parent,
            data_blocks,
            zero_blocks,
            bytes,
            scanned: pool.len() as u64,
            duration: start.elapsed(),
            file,
        })
    }

    /// After full snapshot `new`: deletes every snapshot outside three chains, that of `new`,
    /// that of `previous` (the snapshot taken or restored before it: the chain it replaces),
    /// and that of the newest pinned snapshot (asked for by number, as a DSM checkpoint is),
    /// and the snapshots set aside after a restore. Files whose header cannot be read stay.
    fn prune(&self, new: u64, previous: Option<u64>) -> Result<(), CheckpointError> {
        let mut headers = std::collections::BTreeMap::new();
        let listing = list(&self.dir)?;
        for (seq, path) in &listing.snapshots {
            if let Ok(h) = read_header(path, *seq) {
                headers.insert(*seq, (h, path.clone()));
            }
        }
        let pinned = headers.iter().rev().find(|(_, (h, _))| h.pinned).map(|(seq, _)| *seq);
        let mut keep = std::collections::BTreeSet::new();
        for start in [Some(new), previous, pinned].into_iter().flatten() {
            let mut next = Some(start);
            while let Some(seq) = next.filter(|s| keep.insert(*s)) {
                next = headers.get(&seq).and_then(|(h, _)| h.parent);
            }
        }
        for (seq, (_, path)) in &headers {
            if !keep.contains(seq) {
                fs::remove_file(path).map_err(|e| io_err(path, "cannot remove an old snapshot", e))?;
            }
        }
        for name in &listing.abandoned {
            let path = self.dir.join(name);
            fs::remove_file(&path).map_err(|e| io_err(&path, "cannot remove a snapshot set aside", e))?;
        }
        sync_dir(&self.dir)
    }
}

/// What [`write_blocks`] wrote: the file, every block's state, the table of the blocks in the
/// file, and how many of them hold data and zeros.
type Written = (File, Vec<BlockState>, Vec<u8>, u64, u64);

/// Writes the data of the blocks of `pool` whose state differs from `base` (all, without one)
/// to `f`, and builds their table. Blocks are copied into a buffer one after the other (copied
/// first, then hashed: the bytes written are the bytes hashed, even while a client writes the
/// block) and written a buffer at a time by a second thread, so hashing the next buffer
/// overlaps writing this one: one copy of each byte before the kernel's, as `dd` makes.
fn write_blocks(f: File, pool: &[u8], block_size: usize, base: Option<&[BlockState]>) -> io::Result<Written> {
    let buffer = IO_BUFFER.max(block_size) / block_size * block_size;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        empty_tx.send(vec![0; buffer]).expect("the receiver is here");
    }
    let stopped = || io::Error::other("the writing thread stopped");
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<File> {
            let mut f = f;
            for (buf, n) in full_rx {
                f.write_all(&buf[..n])?;
                let _ = empty_tx.send(buf); // gone only when filling is over
            }
            Ok(f)
        });
        let filled = (|| {
            let mut states = Vec::with_capacity(pool.len().div_ceil(block_size));
            let mut table = Vec::new();
            let (mut data_blocks, mut zero_blocks) = (0, 0);
            let mut buf = empty_rx.recv().map_err(|_| stopped())?;
            let mut filled = 0;
            for (index, block) in pool.chunks(block_size).enumerate() {
                if filled + block.len() > buf.len() {
                    full_tx.send((buf, filled)).map_err(|_| stopped())?;
                    buf = empty_rx.recv().map_err(|_| stopped())?;
                    filled = 0;
                }
                let copy = &mut buf[filled..filled + block.len()];
                copy.copy_from_slice(block);
                let state = BlockState::of(copy);
                states.push(state);
                if base.is_some_and(|b| b[index] == state) {
                    continue;
                }
                Entry { index: index as u64, state }.put(&mut table);
                match state {
                    BlockState::Data(_) => {
                        filled += block.len();
                        data_blocks += 1;
                    }
                    BlockState::Zeros => zero_blocks += 1,
                }
            }
            full_tx.send((buf, filled)).map_err(|_| stopped())?;
            Ok::<_, io::Error>((states, table, data_blocks, zero_blocks))
        })();
        drop(full_tx);
        // The writer's own error says more than "stopped".
        let f = writer.join().map_err(|_| io::Error::other("the writing thread panicked"))??;
        let (states, table, data_blocks, zero_blocks) = filled?;
        Ok((f, states, table, data_blocks, zero_blocks))
    })
}

/// Loads the newest snapshot of `dir` that is whole (or, with `seq`, that one) into `pool`,
/// whose length must be the snapshotted pool's. On an error `pool` may hold part of a snapshot.
pub fn restore(dir: &Path, pool: &mut [u8], seq: Option<u64>) -> Result<Restored, CheckpointError> {
    let start = Instant::now();
    let listing = list(dir)?;
    let mut headers: Vec<Listed> = listing
        .snapshots
        .into_iter()
        .map(|(seq, path)| {
            let header = read_header(&path, seq);
            (seq, path, header)
        })
        .collect();
    headers.sort_by_key(|(seq, ..)| std::cmp::Reverse(*seq));
    let mut skipped = Vec::new();
    let candidates: Vec<u64> = match seq {
        Some(s) if headers.iter().any(|(q, ..)| *q == s) => vec![s],
        Some(s) => {
            return Err(CheckpointError::Config(format!(
                "snapshot {s} is not in {} (there: {:?})",
                dir.display(),
                headers.iter().map(|(q, ..)| *q).rev().collect::<Vec<_>>()
            )));
        }
        None => headers.iter().map(|(q, ..)| *q).collect(),
    };
    for candidate in candidates {
        match restore_chain(&headers, candidate, pool) {
            Ok(Applied { chain, states, block_size, bytes_read }) => {
                return Ok(Restored {
                    seq: candidate,
                    chain,
                    skipped,
                    bytes_read,
                    duration: start.elapsed(),
                    dir: dir.to_owned(),
                    block_size,
                    states,
                });
            }
            Err(reason) => {
                if seq.is_some() {
                    return Err(reason);
                }
                skipped.push(Skipped { seq: candidate, reason });
            }
        }
    }
    Err(CheckpointError::NoSnapshot { dir: dir.to_owned(), skipped })
}

type Listed = (u64, PathBuf, Result<Header, CheckpointError>);

/// What applying a chain did.
struct Applied {
    /// The snapshots applied, the full one first.
    chain: Vec<u64>,
    states: Vec<BlockState>,
    block_size: u64,
    bytes_read: u64,
}

/// Applies `seq`'s chain to `pool`.
fn restore_chain(headers: &[Listed], seq: u64, pool: &mut [u8]) -> Result<Applied, CheckpointError> {
    // The chain, newest first, back to its full snapshot.
    let mut chain: Vec<(&Path, Header)> = Vec::new();
    let mut next = Some(seq);
    while let Some(s) = next {
        let Some((_, path, header)) = headers.iter().find(|(q, ..)| *q == s) else {
            let (path, _) = chain.last().expect("the first one is listed");
            return Err(corrupt(path, None, format!("its parent, snapshot {s}, is missing")));
        };
        let header = match header {
            Ok(h) => *h,
            Err(e) => return Err(corrupt(path, None, e.to_string_without_path())),
        };
        if header.pool_size != pool.len() as u64 {
            return Err(corrupt(
                path,
                None,
                format!("it is a snapshot of a pool of {} bytes; this pool is {} bytes", header.pool_size, pool.len()),
            ));
        }
        if let Some((_, first)) = chain.first() {
            if header.block_size != first.block_size {
                return Err(corrupt(path, None, "its block size differs from its child's".into()));
            }
        }
        next = header.parent;
        chain.push((path, header));
    }
    chain.reverse();
    let blocks = chain[0].1.blocks() as usize;
    let mut states = vec![BlockState::Zeros; blocks];
    let mut bytes_read = 0;
    // Incremental snapshots are checked whole before any of them is applied, so that a
    // damaged one is found before the pool holds a mix; the full one (which overwrites every
    // block anyway) is checked as it is applied.
    for (path, header) in &chain[1..] {
        apply(path, header, None, &mut states)?;
    }
    for (path, header) in &chain {
        bytes_read += apply(path, header, Some(pool), &mut states)?;
    }
    let block_size = chain[0].1.block_size;
    Ok(Applied { chain: chain.iter().map(|(_, h)| h.seq).collect(), states, block_size, bytes_read })
}

/// Reads one snapshot, checking everything, into `pool` if given (otherwise only checks);
/// records its blocks' states. Returns the bytes read.
fn apply(
    path: &Path,
    header: &Header,
    mut pool: Option<&mut [u8]>,
    states: &mut [BlockState],
) -> Result<u64, CheckpointError> {
    // Unbuffered: blocks are read straight into the pool (a buffer would copy them once more).
    let mut r = File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
    let len = r.metadata().map_err(|e| io_err(path, "cannot stat", e))?.len();
    let read = |e: io::Error| io_err(path, "cannot read", e);
    if len < (HEADER_LEN + FOOTER_LEN) as u64 {
        return Err(corrupt(path, None, format!("it is {len} bytes, shorter than a header and footer")));
    }
    // Footer and table first: which blocks the data holds, and in which order.
    r.seek(SeekFrom::Start(len - FOOTER_LEN as u64)).map_err(read)?;
    let mut fb = [0u8; FOOTER_LEN];
    r.read_exact(&mut fb).map_err(read)?;
    let footer = Footer::parse(&fb).map_err(|w| corrupt(path, None, w))?;
    if footer.seq != header.seq {
        return Err(corrupt(
            path,
            None,
            format!("its footer is of snapshot {}, its header of {}", footer.seq, header.seq),
        ));
    }
    let table_len =
        footer.entries.checked_mul(ENTRY_LEN as u64).filter(|&t| t <= len - (HEADER_LEN + FOOTER_LEN) as u64);
    let Some(table_len) = table_len else {
        return Err(corrupt(
            path,
            None,
            format!("its footer counts {} blocks, more than the file holds", footer.entries),
        ));
    };
    r.seek(SeekFrom::Start(len - FOOTER_LEN as u64 - table_len)).map_err(read)?;
    let mut table = vec![0u8; table_len as usize];
    r.read_exact(&mut table).map_err(read)?;
    if xxh3_64(&table) != footer.table_hash {
        return Err(corrupt(path, None, "its block table is corrupt (checksum mismatch)".into()));
    }
    let entries: Vec<Entry> =
        table.chunks_exact(ENTRY_LEN).map(Entry::get).collect::<Result<_, _>>().map_err(|w| corrupt(path, None, w))?;
    let bs = header.block_size;
    let block_len = |index: u64| (header.pool_size - index * bs).min(bs) as usize;
    let mut data_len = 0u64;
    let mut last = None;
    for e in &entries {
        if e.index >= header.blocks() || last.is_some_and(|l| e.index <= l) {
            return Err(corrupt(path, Some(e.index), format!("block {} is out of order or past the pool", e.index)));
        }
        last = Some(e.index);
        if matches!(e.state, BlockState::Data(_)) {
            data_len += block_len(e.index) as u64;
        }
    }
    if header.parent.is_none() && entries.len() as u64 != header.blocks() {
        return Err(corrupt(
            path,
            None,
            format!("a full snapshot of {} blocks holds {}", header.blocks(), entries.len()),
        ));
    }
    if HEADER_LEN as u64 + data_len + table_len + FOOTER_LEN as u64 != len {
        return Err(corrupt(path, None, format!("it is {len} bytes, but its table accounts for a different size")));
    }
    // The data, block by block, each checked against its hash.
    r.seek(SeekFrom::Start(HEADER_LEN as u64)).map_err(read)?;
    let mut check = vec![0u8; if pool.is_some() { 0 } else { bs.min(header.pool_size) as usize }];
    for e in &entries {
        let n = block_len(e.index);
        let at = (e.index * bs) as usize;
        let target: &mut [u8] = match pool.as_deref_mut() {
            Some(pool) => &mut pool[at..at + n],
            None => &mut check[..n],
        };
        match e.state {
            BlockState::Zeros => target.fill(0),
            BlockState::Data(hash) => {
                r.read_exact(target).map_err(read)?;
                if xxh3_64(target) != hash {
                    return Err(corrupt(
                        path,
                        Some(e.index),
                        format!("block {} (pool bytes {at}..{}) does not match its checksum", e.index, at + n),
                    ));
                }
            }
        }
        states[e.index as usize] = e.state;
    }
    Ok(len)
}

/// The header of snapshot file `path`, which its name says is snapshot `seq`.
fn read_header(path: &Path, seq: u64) -> Result<Header, CheckpointError> {
    let mut f = File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
    let h = Header::read_from(&mut f).map_err(|w| corrupt(path, None, w))?;
    if h.seq != seq {
        return Err(corrupt(path, None, format!("its header says it is snapshot {}, its name {seq}", h.seq)));
    }
    Ok(h)
}

impl CheckpointError {
    /// The message without the file name (for one that is wrapped with another file's name).
    fn to_string_without_path(&self) -> String {
        match self {
            CheckpointError::Corrupt { what, .. } => what.clone(),
            e => e.to_string(),
        }
    }
}

/// The files of a snapshot directory.
struct Listing {
    snapshots: Vec<(u64, PathBuf)>,
    temporaries: Vec<String>,
    /// Snapshots set aside after a restore of an older one.
    abandoned: Vec<String>,
}

/// The prefix of a snapshot set aside: newer than the one restored, of a timeline given up.
const ABANDONED: &str = "abandoned-";

fn list(dir: &Path) -> Result<Listing, CheckpointError> {
    let mut listing = Listing { snapshots: Vec::new(), temporaries: Vec::new(), abandoned: Vec::new() };
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir, "cannot list the snapshot directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, "cannot list the snapshot directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".snapshot-") && name.ends_with(".tmp") {
            listing.temporaries.push(name);
        } else if name.starts_with(ABANDONED) {
            listing.abandoned.push(name);
        } else if let Some(seq) = name.strip_prefix("snapshot-").and_then(|n| n.strip_suffix(".rdmem")) {
            // Only the exact name: "snapshot-5.rdmem" is not snapshot 5's file.
            if let Some(seq) = seq.parse::<u64>().ok().filter(|&seq| name == file_name(seq)) {
                listing.snapshots.push((seq, entry.path()));
            }
        }
    }
    Ok(listing)
}

/// The file name of snapshot `seq`.
pub fn file_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.rdmem")
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, "cannot fsync the snapshot directory", e))
}

fn io_err(path: &Path, context: &'static str, source: io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_owned(), context, source }
}

fn corrupt(file: &Path, block: Option<u64>, what: String) -> CheckpointError {
    CheckpointError::Corrupt { file: file.to_owned(), block, what }
}
