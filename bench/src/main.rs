//! `rdmem-bench`: rdmem's benchmarks, as programs that print figures (a table, or JSON lines
//! with `--json`), compared with perftest on the same device in the same run.
//!
//! ```sh
//! soft-roce-setup/vm-run rdmem-bench verbs --compare-perftest --json   # on Soft-RoCE
//! soft-roce-setup/vm-run rdmem-bench alloc --json
//! soft-roce-setup/vm-run rdmem-bench lock --json
//! rdmem-bench verbs --memnode 10.0.0.1:7471                             # on real hardware
//! ```

mod alloc;
mod harness;
mod lock;
mod perftest;
mod report;
mod tsc;
mod verbs;

use clap::{Parser, Subcommand};

/// rdmem's benchmarks.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Latency and throughput of one-sided READ, WRITE, CAS and FAA (and perftest's, with
    /// --compare-perftest).
    Verbs(verbs::VerbsArgs),
    /// Remote allocation throughput and network operations per alloc+free pair.
    Alloc(alloc::AllocArgs),
    /// Distributed locks (CAS spinlock vs cohort lock) and barrier.
    Lock(lock::LockArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.bench {
        Bench::Verbs(args) => verbs::run(args),
        Bench::Alloc(args) => alloc::run(args),
        Bench::Lock(args) => lock::run(args),
    };
    if let Err(e) = result {
        eprintln!("rdmem-bench: error: {e}");
        std::process::exit(1);
    }
}
