//! `rdmem-bench alloc`: allocation throughput and network operations per alloc+free pair.
//!
//! Each thread has its own `ThreadAlloc` (own endpoint and arenas) and repeats: allocate a
//! window of blocks, then free them all. Mops counts alloc+free pairs per second over the whole
//! run; `rdma_ops_per_op` is the network operations the allocators issued divided by the pairs
//! (the fast path issues none; refills, chunk releases and the first format do).
//!
//! **Scaling** (`--pool-sizes`, `--nodes`, `--fill`): for each pool size and node count the
//! benchmark starts that many memory nodes of that size itself, and each round holds `--fill`
//! of all their memory in blocks before freeing them (so chunk claims and bitmap scans grow
//! with the pool, as they do for a real working set). Rows then carry `pool_bytes` (per node)
//! and `nodes`; the allocator places blocks round-robin across the nodes.

use std::alloc::Layout;
use std::sync::Arc;

use clap::Args;
use rdmem_allocator::{Allocator, AllocatorOptions};
use rdmem_transport_rdma::RdmaTransport;

use crate::harness;
use crate::report::{Printer, Row};

/// Options of `rdmem-bench alloc`.
#[derive(Args, Debug)]
pub(crate) struct AllocArgs {
    /// Memory node `host:port` (repeatable; default: RDMEM_MEMNODES or the config file, else a
    /// memory node started on the same device).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Block sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,256,4096")]
    sizes: Vec<usize>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    threads: Vec<usize>,
    /// Alloc+free pairs per thread per point.
    #[arg(long, default_value_t = 100_000)]
    pairs: u64,
    /// Blocks allocated before they are freed again.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Chunk size for a pool this run formats.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_size: u64,
    /// Scaling: pool sizes per memory node (e.g. `32M,64M,128M`), each a sweep point with nodes
    /// this run starts (not with --memnode). Their sum over `--nodes` must fit the huge pages.
    #[arg(long, value_delimiter = ',', value_parser = rdmem_core::config::parse_size)]
    pool_sizes: Vec<u64>,
    /// Scaling: memory node counts, each a sweep point (with --pool-sizes; default 1).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    nodes: Vec<usize>,
    /// Scaling: the share of all the nodes' memory each round holds in blocks (0 to 0.9; with
    /// --pool-sizes; replaces --window).
    #[arg(long, default_value_t = 0.5)]
    fill: f64,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &AllocArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !args.pool_sizes.is_empty() {
        return scaling(args);
    }
    let harness::Cluster { transport, memnode: _memnode } = harness::connect(&args.memnodes, 256 << 20)?;
    let transport = Arc::new(transport);
    let options = AllocatorOptions { chunk_size: args.chunk_size, ..Default::default() };
    let allocator = Allocator::new(transport, options)?;
    let mut out = Printer::new(args.json);
    for &size in &args.sizes {
        for &threads in &args.threads {
            out.print(&measured_row(&allocator, size, threads, args.pairs, args.window)?);
        }
    }
    Ok(())
}

/// The scaling sweep: pool sizes by node counts, each with nodes of its own.
fn scaling(args: &AllocArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !args.memnodes.is_empty() {
        return Err("--pool-sizes starts its own memory nodes: leave out --memnode".into());
    }
    if !(args.fill > 0.0 && args.fill <= 0.9) {
        return Err(format!("--fill is {}; it must be above 0 and at most 0.9", args.fill).into());
    }
    if args.nodes.contains(&0) {
        return Err("--nodes: a count of 0 memory nodes".into());
    }
    let mut out = Printer::new(args.json);
    for &nodes in &args.nodes {
        for &pool in &args.pool_sizes {
            let cluster = harness::start_nodes(nodes, pool)?;
            let transport = Arc::new(cluster.transport);
            let options = AllocatorOptions { chunk_size: args.chunk_size, ..Default::default() };
            let allocator = Allocator::new(transport, options)?;
            for &size in &args.sizes {
                for &threads in &args.threads {
                    let held = args.fill * (pool as f64 * nodes as f64) / (size as f64 * threads as f64);
                    let window = (held as usize).max(1);
                    let mut row = measured_row(&allocator, size, threads, args.pairs, window)?;
                    row.pool_bytes = Some(pool);
                    row.nodes = Some(nodes);
                    row.note = Some(format!(
                        "{nodes} node(s) of {} MiB; {} of them held per round ({window} blocks per thread)",
                        pool >> 20,
                        args.fill
                    ));
                    out.print(&row);
                }
            }
            drop(allocator);
            drop(cluster.memnodes); // after the transport (in the allocator): nodes go last
        }
    }
    Ok(())
}

/// One point's row: alloc+free pairs per second and network operations per pair.
fn measured_row(
    allocator: &Allocator<RdmaTransport>,
    size: usize,
    threads: usize,
    pairs: u64,
    window: usize,
) -> Result<Row, Box<dyn std::error::Error>> {
    let (pairs, ops, seconds) = measure(allocator, size, threads, pairs, window)?;
    let mut row = Row::throughput("alloc", "rdmem", "alloc_free", size, threads, 1, pairs, seconds);
    row.gbps = None;
    row.rdma_ops_per_op = Some(ops as f64 / pairs as f64);
    Ok(row)
}

/// Returns (pairs, network operations, seconds).
fn measure(
    allocator: &Allocator<RdmaTransport>,
    size: usize,
    threads: usize,
    pairs: u64,
    window: usize,
) -> Result<(u64, u64, f64), Box<dyn std::error::Error>> {
    let layout = Layout::from_size_align(size, 8)?;
    let rounds = pairs.div_ceil(window as u64);
    let (elapsed, results) = harness::timed(threads, |_, start| -> Result<u64, rdmem_allocator::AllocError> {
        let alloc = allocator.thread()?;
        let mut held = Vec::with_capacity(window);
        start.wait();
        let before = alloc.network_ops();
        for _ in 0..rounds {
            for _ in 0..window {
                held.push(alloc.alloc(layout)?);
            }
            for addr in held.drain(..) {
                alloc.free(addr)?;
            }
        }
        Ok(alloc.network_ops() - before)
    });
    let mut ops = 0;
    for r in results {
        ops += r?;
    }
    Ok((rounds * window as u64 * threads as u64, ops, elapsed.as_secs_f64()))
}
