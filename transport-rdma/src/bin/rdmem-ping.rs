//! `rdmem-ping`: check that memory nodes are reachable, one one-sided operation at a time.
//!
//! ```sh
//! rdmem-ping --memnode 10.0.0.1:7471 --count 5            # READ 8 bytes at offset 0
//! rdmem-ping --memnode 10.0.0.1:7471 --op faa --offset 64  # fetch-and-add, forever
//! ```
//! Prints "connected to ..." once connected, then one line per operation with its latency
//! (unless --quiet), like ping. Memory nodes, token and device also come from RDMEM_* variables
//! or RDMEM_CONFIG.

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rdmem_core::{ClusterConfig, Endpoint, GlobalAddr, NodeId, Transport};
use rdmem_transport_rdma::{RdmaOptions, RdmaTransport};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Op {
    /// READ 8 bytes (changes nothing).
    Read,
    /// Fetch-and-add 1 on the 8-byte word.
    Faa,
}

/// Check that memory nodes are reachable, one one-sided operation at a time.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Memory node `host:port` (repeat for several; default: RDMEM_MEMNODES or the config file).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Which node of the cluster to ping (its node id).
    #[arg(long, default_value_t = 0)]
    node: u16,
    /// Operation to send.
    #[arg(long, value_enum, default_value_t = Op::Read)]
    op: Op,
    /// Pool offset to operate on (8-byte aligned).
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Operations to do; 0 means until killed.
    #[arg(long, default_value_t = 4)]
    count: u64,
    /// Pause between operations, in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Print only the connection line and the summary.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("rdmem-ping: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), rdmem_core::Error> {
    let mut config = ClusterConfig::load(None)?;
    if !args.memnodes.is_empty() {
        config.memnodes = args.memnodes.clone();
    }
    let transport = RdmaTransport::connect(RdmaOptions::from_config(&config)?)?;
    let mut ep = transport.endpoint()?;
    let addr = GlobalAddr::new(NodeId(args.node), args.offset)
        .ok_or_else(|| rdmem_core::Error::Config(format!("offset {} is past 2^48", args.offset)))?;
    println!("connected to {} node(s) through {}", transport.nodes().len(), transport.device().name());
    let (mut done, mut total) = (0u64, Duration::ZERO);
    while args.count == 0 || done < args.count {
        let started = Instant::now();
        let value = match args.op {
            Op::Read => ep.read_u64(addr)?,
            Op::Faa => ep.faa(addr, 1)?,
        };
        let took = started.elapsed();
        total += took;
        done += 1;
        if !args.quiet {
            println!("{:?} {addr}: value {value}, {:.1} us", args.op, took.as_secs_f64() * 1e6);
        }
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    println!("{done} operations, mean {:.1} us", total.as_secs_f64() * 1e6 / done.max(1) as f64);
    Ok(())
}
