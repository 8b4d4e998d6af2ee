//! `rdmem-bench`: rdmem's benchmarks, as programs that print figures (a table, or JSON lines
//! with `--json`), compared with perftest on the same device in the same run.
//!
//! ```sh
//! soft-roce-setup/vm-run rdmem-bench suite                              # everything, on Soft-RoCE
//! soft-roce-setup/vm-run rdmem-bench suite --json > r.jsonl; rdmem-bench plot r.jsonl --out charts
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
mod connect;
mod harness;
mod lock;
mod perftest;
mod plot;
mod report;
mod swap;
mod tmem;
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
    /// Connection setup: connections per second, and each one's setup to its first operation.
    Connect(connect::ConnectArgs),
    /// Memory-node snapshots: full, incremental and restore, next to the disk's write speed.
    Checkpoint(checkpoint::CheckpointArgs),
    /// The page store: put and get by page content, compressed or not, local or remote tier.
    Tmem(tmem::TmemArgs),
    /// Swap: a workload three times its memory limit on rdmem-swap, on zram, and unlimited
    /// (root, nbd and zram: the VM has them).
    Swap(swap::SwapArgs),
    /// Everything: verbs (next to perftest), alloc, lock, cache. The headline points with
    /// each benchmark's rounds (about 5 minutes on this project's Soft-RoCE VM); `--full`
    /// for every benchmark's whole sweep (about 12).
    Suite(SuiteArgs),
    /// SVG charts of a run's JSON lines.
    Plot(plot::PlotArgs),
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
    /// Every benchmark's whole default sweep (all transfer sizes, batch sizes 1 to 64), not
    /// only the headline points.
    #[arg(long)]
    full: bool,
    /// Print one JSON object per result instead of tables.
    #[arg(long)]
    json: bool,
}

/// The verbs points `suite` measures without `--full`: 8-byte latency of the four operations
/// and READ at 4 KiB, throughput of 8-byte operations at 1, 16 and 64 per doorbell on 1 and 2
/// threads, each compared point with the benchmark's default rounds.
const QUICK_VERBS: [&str; 8] =
    ["--sizes", "8,4096", "--batches", "1,16,64", "--throughput-sizes", "8", "--threads", "1,2"];

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
    if !args.full {
        verbs_words.extend(QUICK_VERBS.iter().map(|w| w.to_string()));
    }
    let progress = report::Progress::start(&["verbs", "alloc", "lock", "cache"]);
    progress.part("verbs");
    verbs::run(&args_of(&verbs_words))?;
    progress.part("alloc");
    alloc::run(&args_of(&common))?;
    progress.part("lock");
    lock::run(&args_of(&common))?;
    progress.part("cache");
    cache::run(&args_of(&common))?;
    progress.finish();
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.bench {
        Bench::Verbs(args) => verbs::run(args),
        Bench::Alloc(args) => alloc::run(args),
        Bench::Lock(args) => lock::run(args),
        Bench::Cache(args) => cache::run(args),
        Bench::Connect(args) => connect::run(args),
        Bench::Checkpoint(args) => checkpoint::run(args),
        Bench::Tmem(args) => tmem::run(args),
        Bench::Swap(args) => swap::run(args),
        Bench::Suite(args) => suite(args),
        Bench::Plot(args) => plot::run(args),
        Bench::PerftestServer { listen } => perftest::serve(listen),
        Bench::BarrierWorker(args) => lock::barrier_worker(args),
        Bench::LockWorker(args) => lock::lock_worker(args),
    };
    if let Err(e) = result {
        eprintln!("rdmem-bench: error: {e}");
        std::process::exit(1);
    }
}
