//! `rdmem-pools`: look at and exercise the memory nodes' pools, one-sided.
//!
//! ```sh
//! rdmem-pools usage  --memnode 10.0.0.1:7471 --memnode 10.0.0.2:7471   # chunks used per node
//! rdmem-pools stress --threads 2 --steps 5000 --seed 1                  # checked random alloc/free
//! rdmem-pools reclaim                                                   # free dead clients' chunks
//! rdmem-pools checkpoint [--seq N] [--full]                             # snapshot every pool
//! soft-roce-setup/vm-run sh -c 'rdmem-memnode --pool-size 64M & sleep 1; rdmem-pools stress --memnode 127.0.0.1'
//! ```
//! `usage` reads the pool headers (formatting a fresh pool first, as any client would).
//! `stress` runs a random workload that checks every block's bytes before freeing it and ends
//! with the pools' usage back where it started; it exits non-zero on any violation. `reclaim`
//! returns the chunks of dead clients (exited, or heartbeat stopped for two leases; it waits
//! that long) to the pools: everything they allocated is freed. `checkpoint` asks each memory
//! node (started with `--checkpoint-dir`) for a snapshot of its pool, all with the same sequence
//! number (`--seq`, default: each node's next), and prints what each wrote; it needs no RDMA
//! device, and the snapshots are a consistent cut only while no client writes. Memory
//! nodes, token and device also come from RDMEM_* variables or RDMEM_CONFIG.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rdmem_allocator::{Allocator, AllocatorOptions, Mode, Placement};
use rdmem_core::ClusterConfig;
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

/// Look at and exercise the memory nodes' pools, one-sided.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Memory node `host:port` (repeatable; default: RDMEM_MEMNODES or the config file).
    #[arg(long = "memnode", global = true)]
    memnodes: Vec<String>,
    /// Chunk size for pools this command formats (a power of two of at least 4096).
    #[arg(long, global = true, default_value_t = 1 << 20)]
    chunk_size: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print each node's pool usage.
    Usage,
    /// Run a checked random alloc/free workload.
    Stress {
        /// Threads, each with its own endpoint and arenas.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Steps per thread.
        #[arg(long, default_value_t = 5000)]
        steps: usize,
        /// Seed of the random scripts.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Free the chunks of dead clients (waits two of the longest client lease first).
    Reclaim,
    /// Ask every memory node for a snapshot of its pool (nodes need --checkpoint-dir).
    Checkpoint {
        /// The snapshots' sequence number, the same on every node (default: each node's next).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        seq: Option<u64>,
        /// Full snapshots, even where an incremental one would do.
        #[arg(long)]
        full: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdmem-pools: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ClusterConfig::load(None)?;
    if !cli.memnodes.is_empty() {
        config.memnodes = cli.memnodes.clone();
    }
    let options = RdmaOptions::from_config(&config)?;
    if let Command::Checkpoint { seq, full } = cli.command {
        // Control connections only: no device, no queue pair.
        println!("{:<22} {:>5} {:>6} {:>12} {:>12} {:>10}", "memnode", "node", "seq", "kind", "bytes", "seconds");
        for peer in &options.memnodes {
            let done = rdmem_transport_rdma::control::checkpoint(peer, &options.token, seq, full)?;
            let kind = done.parent.map_or("full".to_owned(), |p| format!("on {p}"));
            let secs = done.duration.as_secs_f64();
            println!("{peer:<22} {:>5} {:>6} {kind:>12} {:>12} {secs:>10.3}", done.node.0, done.seq, done.bytes);
        }
        return Ok(());
    }
    let transport = Arc::new(RdmaTransport::connect(options)?);
    let options = AllocatorOptions {
        chunk_size: cli.chunk_size,
        placement: Placement::RoundRobin,
        mode: Mode::Stealing,
        ..AllocatorOptions::default()
    };
    let allocator = Allocator::new(transport, options)?;
    match cli.command {
        Command::Usage => {
            println!(
                "{:<8} {:>12} {:>10} {:>10} {:>14} {:>14}",
                "node", "chunk size", "chunks", "used", "bytes used", "bytes total"
            );
            for u in allocator.thread()?.usage()? {
                println!(
                    "{:<8} {:>12} {:>10} {:>10} {:>14} {:>14}",
                    u.node.0,
                    u.chunk_size,
                    u.chunks_total,
                    u.chunks_used,
                    u.bytes_used(),
                    u.bytes_total()
                );
            }
        }
        Command::Reclaim => {
            let done = allocator.reclaim_dead_clients_now()?;
            let chunks: u64 = done.chunks.iter().map(|(_, n)| n).sum();
            println!("reclaimed {} dead client(s) {:?} and {chunks} chunk(s):", done.clients.len(), done.clients);
            for (node, n) in done.chunks {
                println!("  {node}: {n} chunk(s) returned");
            }
        }
        Command::Checkpoint { .. } => unreachable!("handled before connecting"),
        Command::Stress { threads, steps, seed } => {
            let counts = rdmem_allocator::stress::stress(&allocator, threads, steps, seed)?;
            println!(
                "stress passed: {} allocations, {} frees ({} handed between threads), {} refused for lack of memory",
                counts.allocs, counts.frees, counts.handed_over, counts.out_of_memory
            );
        }
    }
    Ok(())
}
