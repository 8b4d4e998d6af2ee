//! `rdmem-bench connect`: what connection setup costs. Each round opens a transport to the
//! memory node (RDMA-CM address and route resolution, the MACed connect request, the node's
//! checks and accept, the queue pair moved to RTS, established), takes its endpoint and makes
//! one FAA through it, then drops it (a disconnect). Rows: connections per second over the
//! whole run, and the p50/p99/max of one connection's setup to its first completed operation.

use std::time::Instant;

use rdmem_core::{Endpoint, GlobalAddr, NodeId, Transport};
use rdmem_transport_rdma::RdmaTransport;
use serde::Serialize;

use crate::harness;
use crate::report::new_histogram;

/// Options of `rdmem-bench connect`.
#[derive(clap::Args, Debug)]
pub(crate) struct ConnectArgs {
    /// Connections to open, one after another.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// A memory node to connect to (`HOST:PORT`; default: RDMEM_MEMNODES, else one started here).
    #[arg(long)]
    memnode: Vec<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    bench: &'static str,
    connections: u64,
    connects_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

pub(crate) fn run(args: &ConnectArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = harness::connect(&args.memnode, 16 << 20)?;
    let options = cluster.transport.options().clone();
    let word = GlobalAddr::new(NodeId(0), 4096).expect("a valid address");
    let mut histogram = new_histogram()?;
    let began = Instant::now();
    for _ in 0..args.count {
        let started = Instant::now();
        let transport = RdmaTransport::connect(options.clone())?;
        transport.endpoint()?.faa(word, 1)?;
        histogram.record(started.elapsed().as_micros() as u64)?;
    }
    let seconds = began.elapsed().as_secs_f64();
    let row = Row {
        bench: "connect",
        connections: args.count,
        connects_per_s: args.count as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&row)?);
    } else {
        println!("{:<12} {:>12} {:>10} {:>10} {:>10}", "connections", "connects/s", "p50 us", "p99 us", "max us");
        println!(
            "{:<12} {:>12.1} {:>10} {:>10} {:>10}",
            row.connections, row.connects_per_s, row.p50_us, row.p99_us, row.max_us
        );
    }
    Ok(())
}
