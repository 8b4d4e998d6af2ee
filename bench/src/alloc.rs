//! `rdmem-bench alloc`: allocation throughput and network operations per alloc+free pair.
//!
//! Each thread has its own `ThreadAlloc` (own endpoint and arenas) and repeats: allocate a
//! window of blocks, then free them all. Mops counts alloc+free pairs per second over the whole
//! run; `rdma_ops_per_op` is the network operations the allocators issued divided by the pairs
//! (the fast path issues none; refills, chunk releases and the first format do).

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
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &AllocArgs) -> Result<(), Box<dyn std::error::Error>> {
    let harness::Cluster { transport, memnode: _memnode } = harness::connect(&args.memnodes, 256 << 20)?;
    let transport = Arc::new(transport);
    let options = AllocatorOptions { chunk_size: args.chunk_size, ..Default::default() };
    let allocator = Allocator::new(transport, options)?;
    let mut out = Printer::new(args.json);
    for &size in &args.sizes {
        for &threads in &args.threads {
            let (pairs, ops, seconds) = measure(&allocator, size, threads, args.pairs, args.window)?;
            let mut row = Row::throughput("alloc", "rdmem", "alloc_free", size, threads, 1, pairs, seconds);
            row.gbps = None;
            row.rdma_ops_per_op = Some(ops as f64 / pairs as f64);
            out.print(&row);
        }
    }
    Ok(())
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
