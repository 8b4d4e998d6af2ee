//! `rdmem-bench`: rdmem's benchmarks, as programs that print figures (a table, or JSON lines
//! with `--json`), compared with perftest on the same device in the same run.
//!
//! ```sh
//! soft-roce-setup/vm-run rdmem-bench suite                              # everything, on Soft-RoCE
//! soft-roce-setup/vm-run rdmem-bench verbs --compare-perftest --json
//! soft-roce-setup/vm-run rdmem-bench verbs --async --json              # async face vs sync
//! soft-roce-setup/vm-run rdmem-bench alloc --json
//! soft-roce-setup/vm-run rdmem-bench lock --json
//! soft-roce-setup/vm-run rdmem-bench cache --json
//! soft-roce-setup/vm-run rdmem-bench checkpoint --json                # snapshots vs the disk
//! rdmem-bench verbs --memnode 10.0.0.1:7471                             # on real hardware
//! ```

mod alloc;
mod cache;
mod checkpoint;
mod harness;
mod lock;
mod perftest;
mod report;
mod tsc;
mod verbs;
mod verbs_async;

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
    /// Page cache: hit and miss latency (next to a raw READ), hit ratio under a zipfian load.
    Cache(cache::CacheArgs),
    /// Memory-node snapshots: full, incremental and restore, next to the disk's write speed.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Everything, with each benchmark's defaults: verbs (next to perftest), alloc, lock, cache.
    Suite(SuiteArgs),
    /// Starts perftest servers on this machine on request, for `verbs --perftest-server` on
    /// another machine (cross-machine comparisons).
    PerftestServer {
        /// Where to listen, `HOST:PORT`.
        #[arg(long, default_value = "0.0.0.0:18400")]
        listen: String,
    },
    /// One participant of the cross-process barrier measurement (started by `lock`).
    #[command(hide = true)]
    BarrierWorker(lock::BarrierWorkerArgs),
    /// One process of the cross-process contended lock measurement (started by `lock`).
    #[command(hide = true)]
    LockWorker(lock::LockWorkerArgs),
}

/// Options of `rdmem-bench suite`.
#[derive(clap::Args, Debug)]
struct SuiteArgs {
    /// Memory node `host:port` (default: RDMEM_MEMNODES or the config file, else one started
    /// on the same device for each benchmark).
    #[arg(long = "memnode")]
    memnodes: Vec<String>,
    /// Skip the perftest comparison of the verbs benchmark.
    #[arg(long)]
    no_perftest: bool,
    /// Print one JSON object per result instead of tables.
    #[arg(long)]
    json: bool,
}

/// Parses one benchmark's options from words, as if given on the command line.
fn args_of<A: clap::Args>(words: &[String]) -> A {
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    Wrap::<A>::parse_from(std::iter::once("rdmem-bench".to_owned()).chain(words.iter().cloned())).args
}

fn suite(args: &SuiteArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut common: Vec<String> = args.memnodes.iter().flat_map(|m| ["--memnode".to_owned(), m.clone()]).collect();
    if args.json {
        common.push("--json".into());
    }
    let mut verbs_words = common.clone();
    if !args.no_perftest {
        verbs_words.push("--compare-perftest".into());
    }
    verbs::run(&args_of(&verbs_words))?;
    alloc::run(&args_of(&common))?;
    lock::run(&args_of(&common))?;
    cache::run(&args_of(&common))
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.bench {
        Bench::Verbs(args) => verbs::run(args),
        Bench::Alloc(args) => alloc::run(args),
        Bench::Lock(args) => lock::run(args),
        Bench::Cache(args) => cache::run(args),
        Bench::Checkpoint(args) => checkpoint::run(args),
        Bench::Suite(args) => suite(args),
        Bench::PerftestServer { listen } => perftest::serve(listen),
        Bench::BarrierWorker(args) => lock::barrier_worker(args),
        Bench::LockWorker(args) => lock::lock_worker(args),
    };
    if let Err(e) = result {
        eprintln!("rdmem-bench: error: {e}");
        std::process::exit(1);
    }
}
