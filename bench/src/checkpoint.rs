//! `rdmem-bench checkpoint`: how fast a memory node writes snapshots of its pool and how fast
//! one is read back, next to the disk's own sequential write speed in the same run.
//!
//! It starts its own memory node with `--checkpoint-dir` in `--dir`, fills the pool over RDMA
//! with data that has no zero blocks, and then, each round: a full snapshot; 1 % of the blocks
//! changed (one word each) and an incremental snapshot; the newest chain restored into memory
//! with [`rdmem_checkpoint::restore`] (every block's checksum checked, as a node's `--restore`
//! does); and the disk measured as `dd conv=fsync` would, by writing as many bytes as the pool
//! holds in 1 MiB writes and an fsync. Rows (medians of the rounds):
//! - `full`, `incremental`: the snapshot file's `bytes`, the node's `seconds` (reading and
//!   hashing the whole pool, writing, fsync, rename), `mb_per_s` written, and `ratio_vs_disk`,
//!   `mb_per_s` over the disk's; `scanned_mb_per_s` is the pool's size over the time;
//! - `restore`: bytes read from the chain's files, seconds, `mb_per_s`;
//! - `disk_write`: the disk's own figure.
//!
//! Where `--dir` is a tmpfs (the VM's /tmp), "disk" means memory; give a directory on a real
//! disk for disk figures.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};
use serde::Serialize;

use crate::harness;
use crate::report::median;

/// Options of `rdmem-bench checkpoint`.
#[derive(clap::Args, Debug)]
pub(crate) struct CheckpointArgs {
    /// The memory node's pool, with an optional K, M or G suffix.
    #[arg(long, default_value = "128M", value_parser = rdmem_core::config::parse_size)]
    pool_size: u64,
    /// Snapshot block size (the unit of change of incremental snapshots).
    #[arg(long, default_value = "64K", value_parser = rdmem_core::config::parse_size)]
    block_size: u64,
    /// Where the snapshots (and the disk probe) go: a fresh directory is made inside it
    /// (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rounds; the figures are their medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

/// One result row.
#[derive(Debug, Serialize)]
struct Row {
    bench: &'static str,
    op: &'static str,
    bytes: u64,
    seconds: f64,
    mb_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scanned_mb_per_s: Option<f64>,
    disk_mb_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_vs_disk: Option<f64>,
    pool_bytes: u64,
    block_size: u64,
    rounds: u64,
    dir: String,
}

/// Per round: bytes and seconds.
#[derive(Default)]
struct Samples {
    bytes: Vec<f64>,
    seconds: Vec<f64>,
}

impl Samples {
    fn push(&mut self, bytes: u64, seconds: f64) {
        self.bytes.push(bytes as f64);
        self.seconds.push(seconds);
    }

    fn mb_per_s(&self) -> f64 {
        let rates: Vec<f64> = self.bytes.iter().zip(&self.seconds).map(|(b, s)| b / s / 1e6).collect();
        median(&rates)
    }
}

pub(crate) fn run(args: &CheckpointArgs) -> Result<(), Box<dyn std::error::Error>> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new().prefix("rdmem-bench-checkpoint.").tempdir_in(&base)?;
    let dir_arg = dir.path().to_str().ok_or("the directory's name is not UTF-8")?.to_owned();
    let block = args.block_size.to_string();
    let cluster =
        harness::connect_with(&[], args.pool_size, &["--checkpoint-dir", &dir_arg, "--checkpoint-block-size", &block])?;
    let transport = &cluster.transport;
    let node = NodeId(0);
    let pool = transport.nodes()[0].pool_size;
    let mut ep = transport.endpoint()?;
    fill(&mut ep, pool)?;
    let (mut full, mut incremental, mut restored, mut disk) =
        (Samples::default(), Samples::default(), Samples::default(), Samples::default());
    let blocks = pool.div_ceil(args.block_size);
    let changed = (blocks / 100).max(1);
    let mut scratch = vec![0u8; pool as usize];
    for round in 0..args.rounds {
        let f = transport.checkpoint(node, None, true)?;
        full.push(f.bytes, f.duration.as_secs_f64());
        for k in 0..changed {
            let block = (k * 100 + round) % blocks;
            let at = GlobalAddr::new(node, block * args.block_size).expect("in the pool");
            ep.write_u64(at, 0x5eed_0000 + round * changed + k)?;
        }
        let i = transport.checkpoint(node, None, false)?;
        incremental.push(i.bytes, i.duration.as_secs_f64());
        let r = rdmem_checkpoint::restore(dir.path(), &mut scratch, None)?;
        restored.push(r.bytes_read, r.duration.as_secs_f64());
        let (bytes, seconds) = disk_write(dir.path(), pool)?;
        disk.push(bytes, seconds);
    }
    let disk_rate = disk.mb_per_s();
    let row = |op: &'static str, s: &Samples, scanned: bool| Row {
        bench: "checkpoint",
        op,
        bytes: median(&s.bytes) as u64,
        seconds: median(&s.seconds),
        mb_per_s: s.mb_per_s(),
        scanned_mb_per_s: scanned.then(|| pool as f64 / median(&s.seconds) / 1e6),
        disk_mb_per_s: disk_rate,
        ratio_vs_disk: (op != "disk_write").then(|| s.mb_per_s() / disk_rate),
        pool_bytes: pool,
        block_size: args.block_size,
        rounds: args.rounds,
        dir: base.display().to_string(),
    };
    let rows = [
        row("full", &full, true),
        row("incremental", &incremental, true),
        row("restore", &restored, false),
        row("disk_write", &disk, false),
    ];
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "\ncheckpoints of a {} MiB pool in {} KiB blocks, in {} (medians of {} rounds; incremental: {changed} blocks changed)",
        pool >> 20,
        args.block_size >> 10,
        base.display(),
        args.rounds
    );
    println!("{:<12} {:>12} {:>10} {:>10} {:>12} {:>9}", "op", "bytes", "seconds", "MB/s", "scanned MB/s", "vs disk");
    for r in &rows {
        let scanned = r.scanned_mb_per_s.map_or("-".into(), |s| format!("{s:.1}"));
        let ratio = r.ratio_vs_disk.map_or("-".into(), |x| format!("{x:.3}"));
        println!("{:<12} {:>12} {:>10.4} {:>10.1} {:>12} {:>9}", r.op, r.bytes, r.seconds, r.mb_per_s, scanned, ratio);
    }
    Ok(())
}

/// Fills the pool with words that are never zero (so no block is stored as zeros), 1 MiB per
/// WRITE.
fn fill(ep: &mut impl Endpoint, pool: u64) -> Result<(), Box<dyn std::error::Error>> {
    const PIECE: u64 = 1 << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut piece = vec![0u8; PIECE as usize];
    let mut at = 0;
    while at < pool {
        let n = PIECE.min(pool - at) as usize;
        for word in piece[..n].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&(x | 1).to_le_bytes());
        }
        ep.write(GlobalAddr::new(NodeId(0), at).expect("in the pool"), &piece[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `bytes` bytes in 1 MiB writes and fsyncs, as `dd bs=1M conv=fsync` does: the
/// directory's own sequential write speed. Returns the bytes and the seconds.
fn disk_write(dir: &std::path::Path, bytes: u64) -> Result<(u64, f64), Box<dyn std::error::Error>> {
    let path = dir.join("disk-probe.tmp");
    let piece = vec![0xa5u8; 1 << 20];
    let started = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        f.write_all(&piece[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((bytes, seconds))
}
